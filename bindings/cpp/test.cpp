// Tests of the C++ wrapper (bindings/cpp/postflow.hpp); run by tests/c/Makefile.
#include "postflow.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>

static int failures = 0;
#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) {                                                    \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                   \
        }                                                                 \
    } while (0)

static std::string fixture(const char *name) {
    const char *root = std::getenv("POSTFLOW_FIXTURES");
    return std::string(root && *root ? root : "tests/fixtures/bundles") + "/" + name;
}

template <class F>
static void expect_error(F f, pf_status status, const char *substr) {
    try {
        f();
        std::fprintf(stderr, "FAIL: expected %s\n", pf_status_string(status));
        failures++;
    } catch (const postflow::Error &e) {
        if (e.status() != status || std::strstr(e.what(), substr) == nullptr) {
            std::fprintf(stderr, "FAIL: got %s / \"%s\", expected %s / \"%s\"\n", pf_status_string(e.status()), e.what(),
                         pf_status_string(status), substr);
            failures++;
        }
    }
}

int main() {
    static_assert(!std::is_copy_constructible<postflow::Model>::value, "Model is move-only");
    static_assert(std::is_nothrow_move_constructible<postflow::Model>::value, "Model moves");
    CHECK(postflow::version() == PF_VERSION_STRING);

    expect_error([] { postflow::Model m("/nonexistent/bundle"); }, PF_ERR_IO, "/nonexistent/bundle");

    postflow::Model cls(fixture("affine_cls"));
    CHECK(cls.is_classification() && cls.weight_dim() == 17 && cls.input_dim() == 2 && cls.output_dim() == 2);

    postflow::SampleOptions o;
    o.seed = 42;
    o.trace = PF_TRACE_HUTCHINSON;
    o.probes = 4;
    postflow::Samples s = cls.sample(6, o);
    CHECK(s.theta.size() == 6 * 17 && s.log_density.size() == 6 && s.stderr_.size() == 6);

    // Same as the C API directly.
    std::vector<float> theta(6 * 17), logd(6);
    CHECK(pf_sample(cls.get(), &o, 6, theta.data(), theta.size(), logd.data(), 6, nullptr, 0) == PF_OK);
    CHECK(theta == s.theta && logd == s.log_density);

    postflow::SampleOptions ex;
    ex.trace = PF_TRACE_EXACT;
    ex.seed = 42;
    postflow::Samples se = cls.sample(6, ex);
    std::vector<float> lp = cls.log_prob(se.theta, 6, ex);
    CHECK(lp.size() == 6 && se.theta == s.theta);
    for (std::size_t i = 0; i < 6; i++) CHECK(std::fabs(lp[i] - se.log_density[i]) < 1e-2f);
    // Standard errors: those of pf_log_prob for the same probes, zeros for the exact trace.
    std::vector<float> lp_se(3, -1.0f);
    CHECK(cls.log_prob(se.theta, 6, ex, &lp_se) == lp && lp_se == std::vector<float>(6, 0.0f));
    std::vector<float> c_lp(6), c_se(6);
    CHECK(pf_log_prob(cls.get(), &o, s.theta.data(), 6, s.theta.size(), c_lp.data(), 6, c_se.data(), 6) == PF_OK);
    CHECK(cls.log_prob(s.theta, 6, o, &lp_se) == c_lp && lp_se == c_se);
    CHECK(c_se[0] > 0.0f);  // four Rademacher probes: a nonzero spread

    // Start time: the bundle's default unless set; 1 returns the stored draws (no density).
    postflow::Model anchored(fixture("affine_anchored"));
    CHECK(anchored.default_start_time() == 0.5 && anchored.anchor_count() == 24);
    CHECK(anchored.default_refine_start_time() == 0.5); // no refinement: the flow's default
    CHECK(cls.default_start_time() == 0.0 && cls.anchor_count() == 0);
    postflow::SampleOptions at;
    CHECK(at.start_time == PF_START_TIME_BUNDLE);
    at.seed = 9;
    postflow::Samples by_default = anchored.sample(4, at);
    at.start_time = 0.5;  // the fixture's default
    CHECK(anchored.sample(4, at).theta == by_default.theta);
    at.start_time = 0.9;
    CHECK(anchored.sample(4, at).theta != by_default.theta);
    at.start_time = 1.0;
    at.trace = PF_TRACE_EXACT;
    expect_error([&] { anchored.sample(2, at); }, PF_ERR_INVALID_ARGUMENT, "no density");

    std::vector<float> x = {0.5f, -1.0f, 1.5f, 0.25f};
    // The log-weights path, fed with the flow's own log q only because it is at hand and uneven:
    // these are not importance weights (those are log p - log q, p the target posterior).
    postflow::Prediction p = cls.predict(x, 2, s.theta, 6, &s.log_density);
    CHECK(p.mean.size() == 4 && p.total.size() == 2 && p.ess > 1.0 && p.ess < 6.0);
    CHECK(std::fabs(p.mean[0] + p.mean[1] - 1.0f) < 1e-5f);
    const std::vector<float> equal(6, -3.0f);  // equal log-weights: the unweighted average
    postflow::Prediction pe = cls.predict(x, 2, s.theta, 6, &equal);
    CHECK(pe.mean == cls.predict(x, 2, s.theta, 6).mean && std::fabs(pe.ess - 6.0) < 1e-9);
    postflow::Prediction q = cls.sample_predict(8, x, 2, o);
    CHECK(q.mean.size() == 4 && std::fabs(q.ess - 8.0) < 1e-9);

    // Errors carry status and message.
    expect_error([&] { cls.predict(x, 3, s.theta, 6); }, PF_ERR_INVALID_ARGUMENT, "x_len is 4");
    expect_error([&] { cls.sample(0, o); }, PF_ERR_INVALID_ARGUMENT, "n_samples is 0");
    postflow::SampleOptions none;
    expect_error([&] { cls.log_prob(s.theta, 6, none); }, PF_ERR_INVALID_ARGUMENT, "PF_TRACE_NONE");

    // Absurd sizes are postflow::Error, raised before the wrapper sizes any buffer from them
    // (not std::bad_alloc / std::length_error, nor a wrapped product).
    const std::size_t wraps = SIZE_MAX / 17 + 2;        // n x 17 overflows size_t
    const std::size_t too_big = SIZE_MAX / 17 / 2;      // n x 17 floats exceed PTRDIFF_MAX bytes
    expect_error([&] { cls.sample(wraps, o); }, PF_ERR_INVALID_ARGUMENT, "n_samples x weight_dim");
    expect_error([&] { cls.sample(too_big, o); }, PF_ERR_INVALID_ARGUMENT, "is too large");
    expect_error([&] { cls.sample(too_big, none); }, PF_ERR_INVALID_ARGUMENT, "is too large");
    const std::size_t huge = std::size_t(1) << 40;
    expect_error([&] { cls.predict(x, huge, s.theta, 6); }, PF_ERR_INVALID_ARGUMENT, "x_len is 4");
    expect_error([&] { cls.predict(x, SIZE_MAX, s.theta, 6); }, PF_ERR_INVALID_ARGUMENT, "is too large");
    expect_error([&] { cls.sample_predict(8, x, huge, o); }, PF_ERR_INVALID_ARGUMENT, "x_len is 4");
    expect_error([&] { cls.log_prob(se.theta, huge, ex); }, PF_ERR_INVALID_ARGUMENT, "theta_len is 102");
    expect_error([&] { cls.log_prob(se.theta, wraps, ex); }, PF_ERR_INVALID_ARGUMENT, "is too large");

    // Moves transfer ownership; the moved-from object frees nothing and reports no dimensions.
    postflow::Model moved(std::move(cls));
    CHECK(cls.get() == nullptr && moved.get() != nullptr && moved.weight_dim() == 17);
    CHECK(cls.weight_dim() == 0 && cls.input_dim() == 0 && cls.output_dim() == 0 && cls.uncertainty_dim() == 0);
    CHECK(cls.info().struct_size == 0);
    expect_error([&] { cls.sample(2, o); }, PF_ERR_INVALID_ARGUMENT, "moved from");
    expect_error([&] { cls.predict(x, 2, s.theta, 6); }, PF_ERR_INVALID_ARGUMENT, "moved from");
    postflow::Model reg(fixture("affine_reg"));
    CHECK(reg.weight_dim() == 13);
    reg = std::move(moved);
    CHECK(reg.is_classification() && reg.weight_dim() == 17);
    CHECK(moved.get() == nullptr && moved.weight_dim() == 0 && moved.input_dim() == 0);

    // One model, several threads.
    std::vector<postflow::Samples> results(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; i++) threads.emplace_back([&, i] { results[i] = reg.sample(6, o); });
    for (auto &t : threads) t.join();
    for (auto &r : results) CHECK(r.theta == s.theta);

    if (failures) {
        std::fprintf(stderr, "test_cpp: %d failures\n", failures);
        return 1;
    }
    std::printf("test_cpp: all checks passed\n");
    return 0;
}
