/* C tests of the postflow C API: every function, every error path with its
 * message, and results equal to the Rust API's (reference numbers written by
 * `cargo test --test ffi -- --ignored write_c_reference`).
 *
 * usage: test_postflow [REFERENCE_FILE] [--quick]
 *   POSTFLOW_FIXTURES  folder of the fixture bundles (default tests/fixtures/bundles)
 *   --quick            skip the heavier reference cases (for valgrind); every function still runs
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#define PF_TEST_REFERENCE
#include "common.h"

/* Inputs shared with tests/ffi.rs (CLS_X, REG_X). */
static const float CLS_X[8] = {0.5f, -1.0f, 1.5f, 0.25f, -0.75f, 2.0f, 0.0f, 0.0f};
static const float REG_X[3] = {-1.0f, 0.2f, 1.7f};
#define SENTINEL 12345.0f

/* ---- small helpers ---------------------------------------------------------- */

static pf_sample_options sample_opts(uint64_t seed, pf_solver solver, uint32_t steps, pf_trace trace, uint32_t probes) {
    pf_sample_options o;
    pf_sample_options_default(&o);
    o.seed = seed;
    o.solver = solver;
    o.steps = steps;
    o.trace = trace;
    o.probes = probes;
    return o;
}

static pf_prediction prediction(float *mean, size_t mean_len, float *total, float *ale, float *epi, size_t u_len) {
    pf_prediction p;
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    p.mean = mean;
    p.mean_len = mean_len;
    p.total = total;
    p.total_len = u_len;
    p.aleatoric = ale;
    p.aleatoric_len = u_len;
    p.epistemic = epi;
    p.epistemic_len = u_len;
    return p;
}

static int copy_file(const char *from, const char *to, long keep_bytes /* -1 = all */) {
    FILE *in = fopen(from, "rb");
    if (!in) return 0;
    FILE *out = fopen(to, "wb");
    if (!out) {
        fclose(in);
        return 0;
    }
    char buf[65536];
    long written = 0;
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, in)) > 0) {
        size_t take = got;
        if (keep_bytes >= 0 && written + (long)got > keep_bytes) take = (size_t)(keep_bytes - written);
        fwrite(buf, 1, take, out);
        written += (long)take;
        if (keep_bytes >= 0 && written >= keep_bytes) break;
    }
    fclose(in);
    fclose(out);
    return 1;
}

/* ---- tests ------------------------------------------------------------------- */

static void test_version_and_status_strings(void) {
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", PF_VERSION_MAJOR, PF_VERSION_MINOR, PF_VERSION_PATCH);
    CHECK(strcmp(pf_version(), want) == 0, "pf_version() = %s, header says %s", pf_version(), want);
    CHECK(strcmp(pf_version(), PF_VERSION_STRING) == 0, "PF_VERSION_STRING %s", PF_VERSION_STRING);
    const char *names[] = {"PF_OK", "PF_ERR_INVALID_ARGUMENT", "PF_ERR_IO", "PF_ERR_BUNDLE",
                           "PF_ERR_RUNTIME", "PF_ERR_NUMERIC", "PF_ERR_UNSUPPORTED", "PF_ERR_PANIC"};
    for (uint32_t s = 0; s < 8; s++) {
        CHECK(strcmp(pf_status_string((pf_status)s), names[s]) == 0, "status %u -> %s", s, pf_status_string((pf_status)s));
    }
    CHECK(strcmp(pf_status_string((pf_status)99), "PF_UNKNOWN_STATUS") == 0, "status 99");
    CHECK(strcmp(pf_status_string((pf_status)0xFFFFFFFFu), "PF_UNKNOWN_STATUS") == 0, "status max");
    CHECK(sizeof(pf_status) == 4 && sizeof(pf_trace) == 4, "enums are 32-bit");
}

static void test_options_init(void) {
    pf_model_options mo;
    memset(&mo, 0xAB, sizeof mo);
    pf_model_options_default(&mo);
    CHECK(mo.struct_size == sizeof mo, "model options struct_size %u", mo.struct_size);
    CHECK(mo.device == PF_DEVICE_CPU && mo.device_id == 0 && mo.intra_op_threads == 0 && mo.onnxruntime_path == NULL &&
              mo.max_sessions == 0 && mo.flags == 0,
          "model option defaults");
    (pf_model_options_default)(NULL); /* the exported symbol ignores NULL (the macro needs an lvalue) */
    /* The exported symbol (what binaries built against older headers call) writes only the first layout. */
    memset(&mo, 0xAB, sizeof mo);
    (pf_model_options_default)(&mo);
    CHECK(mo.struct_size == 24 && mo.max_sessions == 0xABABABABu, "exported default: first layout only");

    pf_sample_options so;
    memset(&so, 0xAB, sizeof so);
    pf_sample_options_default(&so);
    CHECK(so.struct_size == sizeof so, "sample options struct_size %u", so.struct_size);
    CHECK(so.seed == 0 && so.solver == PF_SOLVER_DEFAULT && so.steps == 0 && so.rtol == 0.0 && so.atol == 0.0 &&
              so.trace == PF_TRACE_NONE && so.probes == 0 && so.max_steps == 0 && so.batch_size == 0 &&
              so.start_time == PF_START_TIME_BUNDLE && so.project_to_slice == 0 &&
              so.refine_transitions == PF_REFINE_BUNDLE && so.first_index == 0 &&
              so.refine_kernel == PF_REFINE_KERNEL_BUNDLE && so.refine_leapfrog == 0,
          "sample option defaults");
    /* The layouts docs/c-api.md publishes (64-bit): first_index (0.7) at offset 80, refine_kernel
     * and refine_leapfrog (0.8) at 88 and 92, 96 bytes. */
    CHECK(sizeof(void *) != 8 || (offsetof(pf_sample_options, refine_transitions) == 72 &&
                                  offsetof(pf_sample_options, first_index) == 80 &&
                                  offsetof(pf_sample_options, refine_kernel) == 88 &&
                                  offsetof(pf_sample_options, refine_leapfrog) == 92 && sizeof so == 96),
          "pf_sample_options layout");
    (pf_sample_options_default)(NULL);
    memset(&so, 0xAB, sizeof so);
    (pf_sample_options_default)(&so);
    CHECK(so.struct_size == 48 && so.probes == 0 && so.max_steps == 0xABABABABu, "exported default: first layout only");

    /* The layout-safe init functions. */
    memset(&so, 0xAB, sizeof so);
    EXPECT_OK(pf_sample_options_init(&so, sizeof so));
    CHECK(so.struct_size == sizeof so && so.trace == PF_TRACE_NONE && so.batch_size == 0, "init full");
    memset(&so, 0xAB, sizeof so);
    EXPECT_OK(pf_sample_options_init(&so, 48)); /* the oldest layout: fields up to probes */
    CHECK(so.struct_size == 48 && so.probes == 0, "init 48");
    CHECK(so.max_steps == 0xABABABABu && so.batch_size == 0xABABABABu, "init 48 must not write past 48 bytes");
    EXPECT_ERR(pf_sample_options_init(NULL, sizeof so), PF_ERR_INVALID_ARGUMENT, "pf_sample_options_init: out is NULL");
    EXPECT_ERR(pf_sample_options_init(&so, 0), PF_ERR_INVALID_ARGUMENT, "struct_size 0 is not a known pf_sample_options size");
    char known[64];
    snprintf(known, sizeof known, "between 48 and %zu bytes", sizeof so);
    EXPECT_ERR(pf_sample_options_init(&so, 4096), PF_ERR_INVALID_ARGUMENT, known);
    memset(&mo, 0xAB, sizeof mo);
    EXPECT_OK(pf_model_options_init(&mo, 24));
    CHECK(mo.struct_size == 24 && mo.onnxruntime_path == NULL && mo.max_sessions == 0xABABABABu, "model init 24");
    EXPECT_OK(pf_model_options_init(&mo, sizeof mo));
    CHECK(mo.max_sessions == 0, "model init full");
    EXPECT_ERR(pf_model_options_init(NULL, sizeof mo), PF_ERR_INVALID_ARGUMENT, "pf_model_options_init: out is NULL");
    EXPECT_ERR(pf_model_options_init(&mo, 8), PF_ERR_INVALID_ARGUMENT, "not a known pf_model_options size");
}

static void test_load_errors(void) {
    char path[4096], tmpl[] = "/tmp/postflow-c-test-XXXXXX", file[4200], from[4200];
    pf_model *sentinel = (pf_model *)(uintptr_t)0x10;
    pf_model *m = sentinel;
    fixture_path(path, sizeof path, "affine_cls");

    EXPECT_ERR(pf_model_load(NULL, NULL, &m), PF_ERR_INVALID_ARGUMENT, "pf_model_load: bundle_dir is NULL");
    EXPECT_ERR(pf_model_load(path, NULL, NULL), PF_ERR_INVALID_ARGUMENT, "pf_model_load: out is NULL");
    EXPECT_ERR(pf_model_load("", NULL, &m), PF_ERR_INVALID_ARGUMENT, "bundle_dir is an empty string");
    EXPECT_ERR(pf_model_load("/nonexistent/postflow-bundle", NULL, &m), PF_ERR_IO, "/nonexistent/postflow-bundle");
    CHECK(m == sentinel, "out written on failure");

    pf_model_options mo;
    pf_model_options_default(&mo);
    mo.struct_size = 0;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "options->struct_size is 0");
    mo.struct_size = sizeof mo + 8;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "larger than this library's pf_model_options");
    mo.struct_size = 12;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "smaller than the oldest pf_model_options layout");
    pf_model_options_default(&mo);
    mo.device = (pf_device)7;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "options->device is 7, not a pf_device");
    mo.device = PF_DEVICE_CUDA;
    mo.device_id = -1;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "options->device_id is -1");
    CHECK(m == sentinel, "out written on failure");
    /* CUDA: unsupported in a CPU build (or without a CUDA ONNX Runtime); loads only where it is available. */
    mo.device_id = 0;
    pf_status cuda = pf_model_load(path, &mo, &m);
    if (cuda == PF_OK) {
        pf_model_free(m);
        m = sentinel;
    } else {
        CHECK(cuda == PF_ERR_UNSUPPORTED || cuda == PF_ERR_RUNTIME, "CUDA load: %s", pf_status_string(cuda));
        CHECK(strstr(pf_last_error_message(), "CUDA") != NULL || strstr(pf_last_error_message(), "cuda") != NULL,
              "CUDA message: %s", pf_last_error_message());
        CHECK(m == sentinel, "out written on failure");
    }

    /* A corrupt bundle: a copy of affine_cls whose manifest is cut in half. */
    CHECK(mkdtemp(tmpl) != NULL, "mkdtemp: %s", strerror(errno));
    const char *files[] = {"flow.onnx", "flow_jvp.onnx", "net.onnx", "tensors.safetensors", "postflow.json"};
    for (int i = 0; i < 5; i++) {
        snprintf(from, sizeof from, "%s/%s", path, files[i]);
        snprintf(file, sizeof file, "%s/%s", tmpl, files[i]);
        CHECK(copy_file(from, file, i == 4 ? 200 : -1), "copy %s", from);
    }
    EXPECT_ERR(pf_model_load(tmpl, NULL, &m), PF_ERR_BUNDLE, "pf_model_load: manifest: not valid JSON");
    CHECK(m == sentinel, "out written on failure");
    /* A bundle missing a graph file. */
    snprintf(from, sizeof from, "%s/postflow.json", path);
    snprintf(file, sizeof file, "%s/postflow.json", tmpl);
    CHECK(copy_file(from, file, -1), "copy manifest");
    snprintf(file, sizeof file, "%s/net.onnx", tmpl);
    unlink(file);
    pf_status st = pf_model_load(tmpl, NULL, &m);
    CHECK(st == PF_ERR_IO || st == PF_ERR_BUNDLE, "missing net.onnx: %s", pf_status_string(st));
    CHECK(strstr(pf_last_error_message(), "net.onnx") != NULL, "message %s", pf_last_error_message());
    CHECK(m == sentinel, "out written on failure");
    for (int i = 0; i < 5; i++) {
        snprintf(file, sizeof file, "%s/%s", tmpl, files[i]);
        unlink(file);
    }
    rmdir(tmpl);

    /* An older caller's options (24 bytes: no max_sessions) still load. */
    pf_model_options_default(&mo);
    mo.struct_size = 24;
    mo.intra_op_threads = 1;
    m = NULL;
    EXPECT_OK(pf_model_load(path, &mo, &m));
    CHECK(m != NULL, "model");
    pf_model_free(m);
    /* Full options with an explicit ONNX Runtime path (already loaded: the first load wins). */
    pf_model_options_default(&mo);
    mo.onnxruntime_path = getenv("POSTFLOW_ORT_LIB");
    mo.max_sessions = 2;
    mo.flags = PF_MODEL_FLAG_ALLOW_SPINNING;
    m = NULL;
    EXPECT_OK(pf_model_load(path, &mo, &m));
    pf_model_free(m);
    mo.flags = 6;
    m = sentinel;
    EXPECT_ERR(pf_model_load(path, &mo, &m), PF_ERR_INVALID_ARGUMENT, "options->flags is 0x6: unknown bits");
    CHECK(m == sentinel, "out written on failure");
    pf_model_free(NULL); /* fine */
}

static void test_info(pf_model *cls, pf_model *reg, pf_model *het) {
    pf_model_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_OK(pf_model_get_info(cls, &info));
    CHECK(info.task == PF_TASK_CLASSIFICATION && info.input_dim == 2 && info.output_dim == 2 && info.weight_dim == 17 &&
              info.uncertainty_dim == 1,
          "cls info %u %zu %zu %zu %zu", info.task, info.input_dim, info.output_dim, info.weight_dim, info.uncertainty_dim);
    EXPECT_OK(pf_model_get_info(reg, &info));
    CHECK(info.task == PF_TASK_REGRESSION && info.input_dim == 1 && info.output_dim == 1 && info.weight_dim == 13 &&
              info.uncertainty_dim == 1,
          "reg info");
    EXPECT_OK(pf_model_get_info(het, &info));
    CHECK(info.task == PF_TASK_REGRESSION && info.weight_dim == 18 && info.output_dim == 1, "het info");
    /* What sampling does by default (0.4): no stored draws, fresh samples, the bundle's probes. */
    CHECK(info.default_start_time == 0.0 && info.anchor_count == 0, "het default start");
    CHECK(info.hutchinson_trace == PF_TRACE_HUTCHINSON && info.hutchinson_probes >= 1, "het hutchinson");

    /* A 0.3 caller: struct_size stops at uncertainty_dim; nothing after it is written. */
    memset(&info, 0xAB, sizeof info);
    info.struct_size = 40;
    EXPECT_OK(pf_model_get_info(cls, &info));
    CHECK(info.uncertainty_dim == 1 && info.anchor_count == (size_t)0xABABABABABABABABull, "0.3 layout");

    /* An older caller: struct_size covers up to weight_dim only. */
    memset(&info, 0xAB, sizeof info);
    info.struct_size = 32;
    EXPECT_OK(pf_model_get_info(cls, &info));
    CHECK(info.weight_dim == 17, "old layout weight_dim");
    CHECK(info.uncertainty_dim == (size_t)0xABABABABABABABABull, "wrote past struct_size");

    EXPECT_ERR(pf_model_get_info(NULL, &info), PF_ERR_INVALID_ARGUMENT, "pf_model_get_info: model is NULL");
    EXPECT_ERR(pf_model_get_info(cls, NULL), PF_ERR_INVALID_ARGUMENT, "pf_model_get_info: out is NULL");
    info.struct_size = 0;
    EXPECT_ERR(pf_model_get_info(cls, &info), PF_ERR_INVALID_ARGUMENT, "out->struct_size is 0");
    info.struct_size = 1000;
    EXPECT_ERR(pf_model_get_info(cls, &info), PF_ERR_INVALID_ARGUMENT, "larger than this library's pf_model_info");
    info.struct_size = 16;
    EXPECT_ERR(pf_model_get_info(cls, &info), PF_ERR_INVALID_ARGUMENT, "smaller than the oldest pf_model_info layout (32");
}

static void test_sample_errors(pf_model *cls) {
    float theta[2 * 17], logd[2], se[2];
    fill(theta, 34, SENTINEL);
    fill(logd, 2, SENTINEL);
    fill(se, 2, SENTINEL);
    pf_sample_options o = sample_opts(1, PF_SOLVER_DEFAULT, 0, PF_TRACE_HUTCHINSON, 2);

    EXPECT_ERR(pf_sample(NULL, &o, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "pf_sample: model is NULL");
    EXPECT_ERR(pf_sample(cls, &o, 2, NULL, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "pf_sample: theta_out is NULL");
    EXPECT_ERR(pf_sample(cls, &o, 0, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "n_samples is 0");
    EXPECT_ERR(pf_sample(cls, &o, 2, theta, 33, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT,
               "theta_out_len is 33, too small: n_samples x weight_dim = 2 x 17 needs 34");
    EXPECT_ERR(pf_sample(cls, &o, 2, theta, 34, logd, 1, se, 2), PF_ERR_INVALID_ARGUMENT,
               "log_density_out_len is 1, too small: n_samples = 2 needs 2");
    EXPECT_ERR(pf_sample(cls, &o, 2, theta, 34, logd, 2, se, 0), PF_ERR_INVALID_ARGUMENT, "stderr_out_len is 0, too small");
    EXPECT_ERR(pf_sample(cls, &o, (size_t)-1, theta, 34, NULL, 0, NULL, 0), PF_ERR_INVALID_ARGUMENT, "too large");

    pf_sample_options bad = o;
    bad.trace = PF_TRACE_NONE;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, NULL, 0), PF_ERR_INVALID_ARGUMENT,
               "log_density_out is not NULL but options->trace is PF_TRACE_NONE");
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, NULL, 0, se, 2), PF_ERR_INVALID_ARGUMENT,
               "stderr_out is not NULL but options->trace is PF_TRACE_NONE");
    bad = o;
    bad.solver = (pf_solver)99;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT,
               "options->solver is 99, not a pf_solver");
    bad = o;
    bad.trace = (pf_trace)0x80000000u;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT,
               "options->trace is 2147483648, not a pf_trace");
    bad = o;
    bad.steps = 2000000;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "steps 2000000 exceeds the limit");
    bad = o;
    bad.probes = 100000;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT,
               "probes must be in [1, 4096], got 100000");
    bad = o;
    bad.rtol = NAN;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "options->rtol is NaN");
    bad = o;
    bad.atol = INFINITY;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "options->atol is inf");
    bad = o;
    bad.struct_size = 0;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, "options->struct_size is 0");
    bad.struct_size = sizeof bad + 1;
    char larger[96];
    snprintf(larger, sizeof larger, "larger than this library's pf_sample_options (%zu bytes)", sizeof bad);
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT, larger);
    bad.struct_size = 40;
    EXPECT_ERR(pf_sample(cls, &bad, 2, theta, 34, logd, 2, se, 2), PF_ERR_INVALID_ARGUMENT,
               "smaller than the oldest pf_sample_options layout (48 bytes)");
    CHECK(all_equal_to(theta, 34, SENTINEL) && all_equal_to(logd, 2, SENTINEL) && all_equal_to(se, 2, SENTINEL),
          "pf_sample wrote outputs on failure");
}

static void test_sample(pf_model *cls, pf_model *reg, pf_model *het, int quick) {
    float theta[6 * 17], logd[6], se[6];
    pf_sample_options o = sample_opts(42, PF_SOLVER_DEFAULT, 0, PF_TRACE_HUTCHINSON, 4);
    EXPECT_OK(pf_sample(cls, &o, 6, theta, 6 * 17, logd, 6, se, 6));
    check_ref("cls_theta", theta, 6 * 17);
    check_ref("cls_logd", logd, 6);
    check_ref("cls_stderr", se, 6);

    /* Larger buffers than needed are fine, and extra room is not written. */
    float big[7 * 17];
    fill(big, 7 * 17, SENTINEL);
    EXPECT_OK(pf_sample(cls, &o, 6, big, 7 * 17, NULL, 0, NULL, 0));
    CHECK(memcmp(big, theta, sizeof theta) == 0 && all_equal_to(big + 6 * 17, 17, SENTINEL), "larger buffer");

    /* An older caller (struct_size 48, no max_steps/batch_size) and batch_size 1 give the same draws. */
    float theta2[6 * 17], logd2[6];
    pf_sample_options old = o;
    old.struct_size = 48;
    old.batch_size = 0xDEADBEEF; /* beyond struct_size: must be ignored */
    EXPECT_OK(pf_sample(cls, &old, 6, theta2, 6 * 17, logd2, 6, NULL, 0));
    CHECK(memcmp(theta, theta2, sizeof theta) == 0 && memcmp(logd, logd2, sizeof logd) == 0, "old layout differs");
    pf_sample_options b1 = o;
    b1.batch_size = 1;
    EXPECT_OK(pf_sample(cls, &b1, 6, theta2, 6 * 17, NULL, 0, NULL, 0));
    CHECK(memcmp(theta, theta2, sizeof theta) == 0, "batch_size changed the draws");

    /* NULL options = defaults (no log-density); one probe gives zero standard errors. */
    EXPECT_OK(pf_sample(cls, NULL, 2, theta2, 34, NULL, 0, NULL, 0));
    pf_sample_options p1 = sample_opts(3, PF_SOLVER_RK4, 8, PF_TRACE_HUTCHINSON, 1);
    fill(se, 6, SENTINEL);
    EXPECT_OK(pf_sample(cls, &p1, 2, theta2, 34, logd2, 2, se, 2));
    CHECK(se[0] == 0.0f && se[1] == 0.0f, "stderr with one probe: %g %g", (double)se[0], (double)se[1]);
    pf_sample_options pd = sample_opts(3, PF_SOLVER_HEUN, 8, PF_TRACE_HUTCHINSON, 0); /* bundle's probes */
    EXPECT_OK(pf_sample(cls, &pd, 2, theta2, 34, logd2, 2, NULL, 0));

    if (!quick) {
        float rt[4 * 13], rl[4], rs[4];
        pf_sample_options e = sample_opts(11, PF_SOLVER_EULER, 10, PF_TRACE_HUTCHINSON_GAUSSIAN, 2);
        EXPECT_OK(pf_sample(reg, &e, 4, rt, 4 * 13, rl, 4, rs, 4));
        check_ref("reg_euler_theta", rt, 4 * 13);
        check_ref("reg_euler_logd", rl, 4);
        check_ref("reg_euler_stderr", rs, 4);

        float ht[3 * 18], hl[3], hs[3];
        pf_sample_options d5 = sample_opts(9, PF_SOLVER_DOPRI5, 0, PF_TRACE_EXACT, 0);
        d5.rtol = 1e-6;
        d5.atol = 1e-6;
        fill(hs, 3, SENTINEL);
        EXPECT_OK(pf_sample(het, &d5, 3, ht, 3 * 18, hl, 3, hs, 3));
        check_ref("het_dopri5_theta", ht, 3 * 18);
        check_ref("het_dopri5_logd", hl, 3);
        CHECK(all_equal_to(hs, 3, 0.0f), "exact trace stderr must be zeros");
        /* dopri5 giving up after max_steps is a numeric/argument failure, not a crash. */
        d5.max_steps = 1;
        d5.rtol = 1e-12;
        d5.atol = 1e-12;
        pf_status st = pf_sample(het, &d5, 3, ht, 3 * 18, hl, 3, NULL, 0);
        CHECK(st != PF_OK && *pf_last_error_message() != '\0', "max_steps 1: %s", pf_status_string(st));
    }
}

static void test_log_prob(pf_model *cls) {
    float theta[6 * 17], lp[6], se[6];
    pf_sample_options o = sample_opts(42, PF_SOLVER_DEFAULT, 0, PF_TRACE_HUTCHINSON, 4);
    EXPECT_OK(pf_sample(cls, &o, 6, theta, 6 * 17, NULL, 0, NULL, 0));
    pf_sample_options ex = sample_opts(0, PF_SOLVER_DEFAULT, 0, PF_TRACE_EXACT, 0);
    fill(se, 6, SENTINEL);
    EXPECT_OK(pf_log_prob(cls, &ex, theta, 6, 6 * 17, lp, 6, se, 6));
    check_ref("cls_logprob_exact", lp, 6);
    CHECK(all_equal_to(se, 6, 0.0f), "exact stderr zeros");
    /* Hutchinson log_prob of a sample reproduces its log-density (same seed, same probes). */
    float logd[6];
    EXPECT_OK(pf_sample(cls, &o, 6, theta, 6 * 17, logd, 6, NULL, 0));
    EXPECT_OK(pf_log_prob(cls, &o, theta, 6, 6 * 17, lp, 6, se, 6));
    for (int i = 0; i < 6; i++) CHECK(fabs((double)(lp[i] - logd[i])) < 1e-2, "log_prob %g vs sample %g", (double)lp[i], (double)logd[i]);

    fill(lp, 6, SENTINEL);
    EXPECT_ERR(pf_log_prob(NULL, &ex, theta, 6, 102, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "pf_log_prob: model is NULL");
    EXPECT_ERR(pf_log_prob(cls, NULL, theta, 6, 102, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "pf_log_prob: options is NULL");
    EXPECT_ERR(pf_log_prob(cls, &ex, NULL, 6, 102, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "pf_log_prob: theta is NULL");
    EXPECT_ERR(pf_log_prob(cls, &ex, theta, 6, 102, NULL, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "log_density_out is NULL");
    EXPECT_ERR(pf_log_prob(cls, &ex, theta, 0, 0, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "n_samples is 0");
    EXPECT_ERR(pf_log_prob(cls, &ex, theta, 6, 101, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT,
               "theta_len is 101, but n_samples x weight_dim = 6 x 17 needs exactly 102");
    EXPECT_ERR(pf_log_prob(cls, &ex, theta, 6, 102, lp, 5, NULL, 0), PF_ERR_INVALID_ARGUMENT, "log_density_out_len is 5, too small");
    EXPECT_ERR(pf_log_prob(cls, &ex, theta, 6, 102, lp, 6, se, 2), PF_ERR_INVALID_ARGUMENT, "stderr_out_len is 2, too small");
    pf_sample_options none = sample_opts(0, PF_SOLVER_DEFAULT, 0, PF_TRACE_NONE, 0);
    EXPECT_ERR(pf_log_prob(cls, &none, theta, 6, 102, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT,
               "options->trace is PF_TRACE_NONE");
    pf_sample_options bad = ex;
    bad.trace = (pf_trace)4;
    EXPECT_ERR(pf_log_prob(cls, &bad, theta, 6, 102, lp, 6, NULL, 0), PF_ERR_INVALID_ARGUMENT, "options->trace is 4");
    float nan_theta[17];
    memcpy(nan_theta, theta, sizeof nan_theta);
    nan_theta[3] = NAN;
    EXPECT_ERR(pf_log_prob(cls, &ex, nan_theta, 1, 17, lp, 6, NULL, 0), PF_ERR_NUMERIC, "theta: 1 sample(s) are NaN or Inf");
    CHECK(all_equal_to(lp, 6, SENTINEL), "pf_log_prob wrote outputs on failure");
}

static void test_predict(pf_model *cls) {
    float theta[6 * 17], logd[6];
    pf_sample_options o = sample_opts(42, PF_SOLVER_DEFAULT, 0, PF_TRACE_HUTCHINSON, 4);
    EXPECT_OK(pf_sample(cls, &o, 6, theta, 6 * 17, logd, 6, NULL, 0));

    float mean[8], total[4], ale[4], epi[4];
    pf_prediction p = prediction(mean, 8, total, ale, epi, 4);
    p.ess = -1.0;
    EXPECT_OK(pf_predict(cls, CLS_X, 4, 8, theta, 6, 6 * 17, logd, &p));
    check_ref("cls_predict_mean", mean, 8);
    check_ref("cls_predict_total", total, 4);
    check_ref("cls_predict_aleatoric", ale, 4);
    check_ref("cls_predict_epistemic", epi, 4);
    float ess = (float)p.ess;
    check_ref("cls_predict_ess", &ess, 1);
    for (int i = 0; i < 4; i++) CHECK(fabsf(mean[2 * i] + mean[2 * i + 1] - 1.0f) < 1e-5f, "probabilities sum to 1");

    /* NULL buffers are skipped; uniform weights give ESS = S; an older struct_size leaves ess alone. */
    float mean2[8];
    pf_prediction only_mean = prediction(mean2, 8, NULL, NULL, NULL, 0);
    EXPECT_OK(pf_predict(cls, CLS_X, 4, 8, theta, 6, 6 * 17, NULL, &only_mean));
    CHECK(fabs(only_mean.ess - 6.0) < 1e-9, "uniform ess %g", only_mean.ess);
    only_mean.struct_size = 72;
    only_mean.ess = -7.0;
    EXPECT_OK(pf_predict(cls, CLS_X, 4, 8, theta, 6, 6 * 17, NULL, &only_mean));
    CHECK(only_mean.ess == -7.0, "ess written beyond struct_size");

    fill(mean, 8, SENTINEL);
    fill(total, 4, SENTINEL);
    p = prediction(mean, 8, total, ale, epi, 4);
    EXPECT_ERR(pf_predict(NULL, CLS_X, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "pf_predict: model is NULL");
    EXPECT_ERR(pf_predict(cls, NULL, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "pf_predict: x is NULL");
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, NULL, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "pf_predict: theta is NULL");
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, NULL, NULL), PF_ERR_INVALID_ARGUMENT, "pf_predict: out is NULL");
    EXPECT_ERR(pf_predict(cls, CLS_X, 0, 0, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "n_inputs is 0");
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 0, 0, NULL, &p), PF_ERR_INVALID_ARGUMENT, "n_samples is 0");
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 7, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT,
               "x_len is 7, but n_inputs x input_dim = 4 x 2 needs exactly 8");
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 103, NULL, &p), PF_ERR_INVALID_ARGUMENT,
               "theta_len is 103, but n_samples x weight_dim = 6 x 17 needs exactly 102");
    p.mean_len = 3;
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT,
               "out->mean_len is 3, too small: n_inputs x output_dim = 4 x 2 needs 8");
    p.mean_len = 8;
    p.epistemic_len = 2;
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT,
               "out->epistemic_len is 2, too small: n_inputs x uncertainty_dim = 4 x 1 needs 4");
    p.epistemic_len = 4;
    p.struct_size = 0;
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "out->struct_size is 0");
    p.struct_size = 4096;
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT,
               "larger than this library's pf_prediction");
    p.struct_size = sizeof p;
    float nan_x[8];
    memcpy(nan_x, CLS_X, sizeof nan_x);
    nan_x[5] = NAN;
    EXPECT_ERR(pf_predict(cls, nan_x, 4, 8, theta, 6, 102, NULL, &p), PF_ERR_INVALID_ARGUMENT, "input row 2 has a NaN");
    float bad_lw[6] = {0, 0, NAN, 0, 0, 0};
    EXPECT_ERR(pf_predict(cls, CLS_X, 4, 8, theta, 6, 102, bad_lw, &p), PF_ERR_INVALID_ARGUMENT, "log-weights are NaN");
    CHECK(all_equal_to(mean, 8, SENTINEL) && all_equal_to(total, 4, SENTINEL), "pf_predict wrote outputs on failure");
}

static void test_sample_predict(pf_model *cls, pf_model *reg) {
    float mean[3], total[3], ale[3], epi[3];
    pf_prediction p = prediction(mean, 3, total, ale, epi, 3);
    pf_sample_options o = sample_opts(5, PF_SOLVER_DEFAULT, 0, PF_TRACE_NONE, 0);
    EXPECT_OK(pf_sample_predict(reg, &o, 8, REG_X, 3, 3, &p));
    check_ref("reg_sample_predict_mean", mean, 3);
    check_ref("reg_sample_predict_total", total, 3);
    check_ref("reg_sample_predict_aleatoric", ale, 3);
    check_ref("reg_sample_predict_epistemic", epi, 3);
    for (int i = 0; i < 3; i++) CHECK(fabsf(total[i] - ale[i] - epi[i]) < 1e-5f, "total = aleatoric + epistemic");

    /* Equal to pf_sample then pf_predict with the same seed. */
    float theta[8 * 13], mean2[3];
    EXPECT_OK(pf_sample(reg, &o, 8, theta, 8 * 13, NULL, 0, NULL, 0));
    pf_prediction p2 = prediction(mean2, 3, NULL, NULL, NULL, 0);
    EXPECT_OK(pf_predict(reg, REG_X, 3, 3, theta, 8, 8 * 13, NULL, &p2));
    CHECK(memcmp(mean, mean2, sizeof mean) == 0, "sample_predict != sample + predict");
    /* A trace mode is accepted (and not needed). */
    pf_sample_options t = sample_opts(5, PF_SOLVER_DEFAULT, 0, PF_TRACE_EXACT, 0);
    EXPECT_OK(pf_sample_predict(reg, &t, 8, REG_X, 3, 3, &p2));
    CHECK(memcmp(mean, mean2, sizeof mean) == 0, "trace mode changed the draws");
    EXPECT_OK(pf_sample_predict(reg, NULL, 2, REG_X, 3, 3, &p2));

    fill(mean, 3, SENTINEL);
    EXPECT_ERR(pf_sample_predict(NULL, &o, 8, REG_X, 3, 3, &p), PF_ERR_INVALID_ARGUMENT, "pf_sample_predict: model is NULL");
    EXPECT_ERR(pf_sample_predict(reg, &o, 0, REG_X, 3, 3, &p), PF_ERR_INVALID_ARGUMENT, "n_samples is 0");
    EXPECT_ERR(pf_sample_predict(reg, &o, 8, NULL, 3, 3, &p), PF_ERR_INVALID_ARGUMENT, "pf_sample_predict: x is NULL");
    EXPECT_ERR(pf_sample_predict(reg, &o, 8, REG_X, 3, 3, NULL), PF_ERR_INVALID_ARGUMENT, "pf_sample_predict: out is NULL");
    EXPECT_ERR(pf_sample_predict(reg, &o, 8, REG_X, 3, 2, &p), PF_ERR_INVALID_ARGUMENT, "x_len is 2");
    EXPECT_ERR(pf_sample_predict(cls, &o, 8, CLS_X, 4, 8, &p), PF_ERR_INVALID_ARGUMENT,
               "out->mean_len is 3, too small: n_inputs x output_dim = 4 x 2 needs 8");
    pf_sample_options bad = o;
    bad.solver = (pf_solver)5;
    EXPECT_ERR(pf_sample_predict(reg, &bad, 8, REG_X, 3, 3, &p), PF_ERR_INVALID_ARGUMENT, "options->solver is 5");
    CHECK(all_equal_to(mean, 3, SENTINEL), "pf_sample_predict wrote outputs on failure");
}

/* Stored draws (start time 1) and the start-time checks, on the anchored fixture. */
static void test_anchored(void) {
    pf_model *m = load_fixture("affine_anchored");
    pf_model_info info;
    info.struct_size = sizeof info;
    EXPECT_OK(pf_model_get_info(m, &info));
    /* The fixture stores 24 draws and starts at 0.5 by default (tests/fixtures/bundles/README.md). */
    CHECK(info.anchor_count == 24 && info.default_start_time == 0.5, "anchored info %zu %g", info.anchor_count,
          info.default_start_time);
    CHECK(info.default_refine_start_time == 0.5, "anchored refine start %g", info.default_refine_start_time);
    size_t d = info.weight_dim, n = 5;
    float *theta = (float *)malloc(n * d * sizeof(float));
    float logd[5];
    pf_sample_options o = sample_opts(4, PF_SOLVER_DEFAULT, 0, PF_TRACE_NONE, 0);
    o.start_time = 1.0;
    EXPECT_OK(pf_sample(m, &o, n, theta, n * d, NULL, 0, NULL, 0));
    check_ref("anchored_stored_theta", theta, n * d);
    o.trace = PF_TRACE_EXACT;
    EXPECT_ERR(pf_sample(m, &o, n, theta, n * d, logd, n, NULL, 0), PF_ERR_INVALID_ARGUMENT, "no density");
    o.trace = PF_TRACE_NONE;
    o.start_time = 2.0;
    EXPECT_ERR(pf_sample(m, &o, n, theta, n * d, NULL, 0, NULL, 0), PF_ERR_INVALID_ARGUMENT, "options->start_time");
    free(theta);
    pf_model_free(m);
}

/* sphere_product bundle: samples on the slice; pf_log_prob refuses weights off it unless
 * project_to_slice is 1. In sphere_tanh the first 18 weights (layer 0: 3 units x (5 weights + bias))
 * are the three unit spheres. */
static void test_sphere(void) {
    pf_model *m = load_fixture("sphere_tanh");
    enum { D = 26, N = 2, S = 18 };
    float theta[N * D], off[N * D], logd[N], projected[N];
    pf_sample_options o = sample_opts(8, PF_SOLVER_DEFAULT, 0, PF_TRACE_EXACT, 0);
    CHECK(o.project_to_slice == 0, "project_to_slice defaults to 0");
    EXPECT_OK(pf_sample(m, &o, N, theta, N * D, logd, N, NULL, 0));
    for (int u = 0; u < 3; u++) {
        double norm = 0.0;
        for (int i = 0; i < 5; i++) norm += (double)theta[u * 5 + i] * theta[u * 5 + i];
        norm += (double)theta[15 + u] * theta[15 + u];
        CHECK(fabs(sqrt(norm) - 1.0) < 1e-5, "unit %d of sample 0 on its sphere (norm %.9f)", u, sqrt(norm));
    }
    memcpy(off, theta, sizeof off);
    for (int i = 0; i < S; i++) off[i] *= 2.0f; /* row 0's units off their spheres, the last layer unchanged */
    EXPECT_ERR(pf_log_prob(m, &o, off, N, N * D, projected, N, NULL, 0), PF_ERR_INVALID_ARGUMENT,
               "theta row 0 is off the slice");
    o.project_to_slice = 1;
    EXPECT_OK(pf_log_prob(m, &o, off, N, N * D, projected, N, NULL, 0));
    for (int i = 0; i < N; i++) CHECK(fabsf(projected[i] - logd[i]) < 1e-3f, "row %d: %g vs %g", i, projected[i], logd[i]);
    o.project_to_slice = 7;
    EXPECT_ERR(pf_log_prob(m, &o, off, N, N * D, projected, N, NULL, 0), PF_ERR_INVALID_ARGUMENT,
               "options->project_to_slice is 7");
    pf_model_free(m);
}

static void test_last_error_lifetime(void) {
    /* The message stays until the next failure, successful calls leave it alone. */
    EXPECT_ERR(pf_model_get_info(NULL, NULL), PF_ERR_INVALID_ARGUMENT, "model is NULL");
    const char *before = pf_last_error_message();
    char copy[256];
    snprintf(copy, sizeof copy, "%s", before);
    pf_sample_options o;
    EXPECT_OK(pf_sample_options_init(&o, sizeof o));
    CHECK(strcmp(pf_last_error_message(), copy) == 0, "success changed the message");
}

int main(int argc, char **argv) {
    const char *ref = NULL;
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else {
            ref = argv[i];
        }
    }
    /* Before any failure the message is empty. */
    CHECK(pf_last_error_message() != NULL && pf_last_error_message()[0] == '\0', "initial message \"%s\"",
          pf_last_error_message());
    if (ref && !load_reference(ref)) return 2;
    if (!ref) fprintf(stderr, "note: no reference file given; comparisons with the Rust API will fail\n");

    test_version_and_status_strings();
    test_options_init();
    test_load_errors();
    pf_model *cls = load_fixture("affine_cls");
    pf_model *reg = load_fixture("affine_reg");
    pf_model *het = load_fixture("affine_hetero");
    test_info(cls, reg, het);
    test_sample_errors(cls);
    test_sample(cls, reg, het, quick);
    test_log_prob(cls);
    test_predict(cls);
    test_sample_predict(cls, reg);
    test_anchored();
    test_sphere();
    test_last_error_lifetime();
    pf_model_free(cls);
    pf_model_free(reg);
    pf_model_free(het);
    free_reference();
    return finish(quick ? "test_postflow --quick" : "test_postflow");
}
