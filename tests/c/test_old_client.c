/* A client compiled against the 0.1.0 header (tests/c/compat/postflow.h, kept as published)
 * running against this library, as an application built last month would. Its structs are
 * shorter than this library's: pf_sample_options ends before start_time. Under AddressSanitizer
 * the options live in heap blocks of exactly the old size, so a library that wrote its whole
 * struct would be caught writing past them. The fields the old client does not know take their
 * defaults: on a bundle with anchors, sampling starts at the bundle's default start time.
 *
 * usage: test_old_client REFERENCE_FILE   (built with -Icompat; see tests/c/Makefile)
 */
#define PF_TEST_REFERENCE
#include "common.h"

#if PF_VERSION_MINOR != 1
#error "test_old_client.c must be compiled against the 0.1 header in tests/c/compat"
#endif

int main(int argc, char **argv) {
    if (argc < 2 || !load_reference(argv[1])) return 2;

    /* Exactly the old sizes: 32 and 56 bytes on 64-bit targets. */
    pf_model_options *mo = (pf_model_options *)malloc(sizeof *mo);
    pf_sample_options *so = (pf_sample_options *)malloc(sizeof *so);
    CHECK(mo && so, "malloc");
    if (!mo || !so) return 2;
    memset(mo, 0xAB, sizeof *mo);
    memset(so, 0xAB, sizeof *so);
    pf_model_options_default(mo); /* the old header has no macro: this calls the exported symbol */
    pf_sample_options_default(so);
    CHECK(mo->struct_size <= sizeof *mo && so->struct_size <= sizeof *so,
          "the library wrote struct_size %u / %u, within the old sizes %zu / %zu", mo->struct_size, so->struct_size,
          sizeof *mo, sizeof *so);
    /* The old client fills in its fields, as it always did. */
    mo->struct_size = sizeof *mo;
    mo->max_sessions = 1;
    so->struct_size = sizeof *so;
    so->seed = 21;
    so->trace = PF_TRACE_HUTCHINSON;
    so->max_steps = 0;
    so->batch_size = 0;

    char path[4096];
    fixture_path(path, sizeof path, "affine_anchored");
    pf_model *m = NULL;
    EXPECT_OK(pf_model_load(path, mo, &m));
    if (!m) return finish("test_old_client");
    pf_model_info info;
    info.struct_size = sizeof info;
    EXPECT_OK(pf_model_get_info(m, &info));
    size_t d = info.weight_dim, n = 3;
    float *theta = (float *)malloc(n * d * sizeof(float));
    float logd[3];
    /* start_time is beyond this client's struct: the bundle's default (0.5) applies. */
    EXPECT_OK(pf_sample(m, so, n, theta, n * d, logd, n, NULL, 0));
    check_ref("anchored_default_theta", theta, n * d);
    check_ref("anchored_default_logd", logd, n);
    /* And with the library's defaults (NULL options), the same samples. */
    so->trace = PF_TRACE_NONE;
    float *again = (float *)malloc(n * d * sizeof(float));
    EXPECT_OK(pf_sample(m, NULL, n, again, n * d, NULL, 0, NULL, 0));
    so->seed = 0;
    EXPECT_OK(pf_sample(m, so, n, theta, n * d, NULL, 0, NULL, 0));
    CHECK(memcmp(theta, again, n * d * sizeof(float)) == 0, "old struct and NULL options agree");

    free(again);
    free(theta);
    pf_model_free(m);
    free(mo);
    free(so);
    free_reference();
    return finish("test_old_client");
}
