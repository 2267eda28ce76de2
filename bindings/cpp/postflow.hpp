// postflow C++17 wrapper: header-only RAII over the C API in postflow.h.
//
//   postflow::Model model("bundle_dir");
//   postflow::SampleOptions opts;            // = pf_sample_options_init(&opts, sizeof opts)
//   opts.trace = PF_TRACE_HUTCHINSON;        // log q(theta) of each draw
//   postflow::Samples s = model.sample(100, opts);
//   postflow::Prediction p = model.predict(x, n_inputs, s.theta, s.n);   // equal weights
//
//   // Importance weights are log p(theta) - log q(theta), with log p your target's
//   // (unnormalised) log posterior; weighting by log q alone would be wrong.
//   std::vector<float> log_w(s.n);
//   for (std::size_t i = 0; i < s.n; i++) log_w[i] = log_target(&s.theta[i * s.weight_dim]) - s.log_density[i];
//   postflow::Prediction pw = model.predict(x, n_inputs, s.theta, s.n, &log_w);
//
// Failures throw postflow::Error (status() and what() = the C message), sizes the
// wrapper cannot allocate buffers for included. Model is move-only; one Model may be
// used from many threads at once.
#ifndef POSTFLOW_HPP
#define POSTFLOW_HPP

#include <postflow.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace postflow {

/// A failed call: the pf_status and the library's message.
class Error : public std::runtime_error {
public:
    Error(pf_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    pf_status status() const noexcept { return status_; }

private:
    pf_status status_;
};

namespace detail {
inline void check(pf_status status) {
    if (status != PF_OK) {
        throw Error(status, std::string(pf_status_string(status)) + ": " + pf_last_error_message());
    }
}

[[noreturn]] inline void invalid(const std::string &message) {
    throw Error(PF_ERR_INVALID_ARGUMENT, std::string(pf_status_string(PF_ERR_INVALID_ARGUMENT)) + ": " + message);
}

// a x b floats, checked as the C API checks it (a * b * sizeof(float) <= PTRDIFF_MAX):
// the wrapper allocates before the library sees the sizes, and an unchecked product
// would wrap or throw std::length_error instead of postflow::Error.
inline std::size_t checked_mul(std::size_t a, std::size_t b, const char *what) {
    const std::size_t max = static_cast<std::size_t>(PTRDIFF_MAX) / sizeof(float);
    if (b != 0 && a > max / b) {
        invalid(std::string(what) + " = " + std::to_string(a) + " x " + std::to_string(b) + " is too large");
    }
    return a * b;
}

// v.resize(count), with an allocation failure reported as postflow::Error (an absurd count).
inline void allocate(std::vector<float> &v, std::size_t count, const char *what) {
    try {
        v.resize(count);
    } catch (const std::bad_alloc &) {
        invalid("cannot allocate " + std::to_string(count) + " floats for " + what);
    } catch (const std::length_error &) {
        invalid("cannot allocate " + std::to_string(count) + " floats for " + what);
    }
}

// x must hold exactly n_inputs x input_dim floats: checked before the outputs are sized from n_inputs.
inline void check_x(const char *fn, std::size_t x_len, std::size_t n_inputs, std::size_t input_dim) {
    if (checked_mul(n_inputs, input_dim, "n_inputs x input_dim") != x_len) {
        invalid(std::string(fn) + ": x_len is " + std::to_string(x_len) + ", but n_inputs x input_dim = " +
                std::to_string(n_inputs) + " x " + std::to_string(input_dim) + " needs exactly " +
                std::to_string(n_inputs * input_dim));
    }
}
}  // namespace detail

/// Library version at run time (e.g. "0.4.0").
inline std::string version() { return pf_version(); }

/// pf_model_options with the defaults filled in.
struct ModelOptions : pf_model_options {
    ModelOptions() : pf_model_options() { detail::check(pf_model_options_init(this, sizeof(pf_model_options))); }
};

/// pf_sample_options with the defaults filled in.
struct SampleOptions : pf_sample_options {
    SampleOptions() : pf_sample_options() { detail::check(pf_sample_options_init(this, sizeof(pf_sample_options))); }
};

/// Draws: theta is n x weight_dim (row-major); log_density/stderr_ have n entries when a trace mode was set.
struct Samples {
    std::size_t n = 0;
    std::size_t weight_dim = 0;
    std::vector<float> theta;
    std::vector<float> log_density;
    std::vector<float> stderr_;
};

/// A BMA prediction: mean is N x output_dim, the uncertainties N x uncertainty_dim.
struct Prediction {
    std::size_t n_inputs = 0;
    std::vector<float> mean, total, aleatoric, epistemic;
    double ess = 0.0;
};

class Model {
public:
    explicit Model(const std::string &bundle_dir, const pf_model_options *options = nullptr) {
        detail::check(pf_model_load(bundle_dir.c_str(), options, &handle_));
        info_.struct_size = sizeof(info_);
        try {
            detail::check(pf_model_get_info(handle_, &info_));
        } catch (...) {
            pf_model_free(handle_);
            throw;
        }
    }
    ~Model() { pf_model_free(handle_); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    // A moved-from Model holds no model: its info is zeroed too, not the old dimensions.
    Model(Model &&other) noexcept
        : handle_(std::exchange(other.handle_, nullptr)), info_(std::exchange(other.info_, pf_model_info{})) {}
    Model &operator=(Model &&other) noexcept {
        if (this != &other) {
            pf_model_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
            info_ = std::exchange(other.info_, pf_model_info{});
        }
        return *this;
    }

    /// The C handle (still owned by this object); NULL after a move (and info() all zeros).
    const pf_model *get() const noexcept { return handle_; }
    const pf_model_info &info() const noexcept { return info_; }
    std::size_t weight_dim() const noexcept { return info_.weight_dim; }
    std::size_t input_dim() const noexcept { return info_.input_dim; }
    std::size_t output_dim() const noexcept { return info_.output_dim; }
    std::size_t uncertainty_dim() const noexcept { return info_.uncertainty_dim; }
    /// The start time PF_START_TIME_BUNDLE selects for unrefined draws and draws with
    /// log-densities (0: fresh flow samples; 1: the stored draws).
    double default_start_time() const noexcept { return info_.default_start_time; }
    /// Stored draws the bundle carries (start times above 0 need them).
    std::size_t anchor_count() const noexcept { return info_.anchor_count; }
    /// HMC transitions on the posterior that PF_REFINE_BUNDLE runs after drawing without a
    /// log-density (0: the bundle has no refinement).
    std::uint32_t default_refine_transitions() const noexcept { return info_.default_refine_transitions; }
    /// The start time PF_START_TIME_BUNDLE selects for refined samples (1: the stored draws).
    double default_refine_start_time() const noexcept { return info_.default_refine_start_time; }
    bool is_classification() const noexcept { return info_.task == PF_TASK_CLASSIFICATION; }

    /// Draw n samples; log-densities (and standard errors) when options.trace != PF_TRACE_NONE.
    Samples sample(std::size_t n, const SampleOptions &options = SampleOptions()) const {
        require_model();
        Samples s;
        s.n = n;
        s.weight_dim = info_.weight_dim;
        detail::allocate(s.theta, detail::checked_mul(n, info_.weight_dim, "n_samples x weight_dim"), "theta");
        const bool dens = options.trace != PF_TRACE_NONE;
        if (dens) {
            detail::allocate(s.log_density, n, "log_density");
            detail::allocate(s.stderr_, n, "stderr_");
        }
        detail::check(pf_sample(handle_, &options, n, s.theta.data(), s.theta.size(), dens ? s.log_density.data() : nullptr,
                                s.log_density.size(), dens ? s.stderr_.data() : nullptr, s.stderr_.size()));
        return s;
    }

    /// log q(theta) of n_samples rows (theta.size() must be n_samples x weight_dim).
    /// With `stderr_out`, also the standard error of each Hutchinson estimate (zeros with
    /// one probe or the exact trace).
    std::vector<float> log_prob(const std::vector<float> &theta, std::size_t n_samples, const SampleOptions &options,
                                std::vector<float> *stderr_out = nullptr) const {
        require_model();
        // theta's length bounds n_samples before the output is sized from it.
        if (detail::checked_mul(n_samples, info_.weight_dim, "n_samples x weight_dim") != theta.size()) {
            detail::invalid("Model::log_prob: theta_len is " + std::to_string(theta.size()) +
                            ", but n_samples x weight_dim = " + std::to_string(n_samples) + " x " +
                            std::to_string(info_.weight_dim) + " needs exactly " +
                            std::to_string(n_samples * info_.weight_dim));
        }
        std::vector<float> out, se;
        detail::allocate(out, n_samples, "log_density");
        if (stderr_out) detail::allocate(se, n_samples, "stderr");
        detail::check(pf_log_prob(handle_, &options, theta.data(), n_samples, theta.size(), out.data(), out.size(),
                                  stderr_out ? se.data() : nullptr, se.size()));
        if (stderr_out) *stderr_out = std::move(se);  // written only on success, as the C API does
        return out;
    }

    /// BMA at x (n_inputs x input_dim) over theta (n_samples x weight_dim), optional log-weights.
    Prediction predict(const std::vector<float> &x, std::size_t n_inputs, const std::vector<float> &theta,
                       std::size_t n_samples, const std::vector<float> *log_weights = nullptr) const {
        if (log_weights && log_weights->size() != n_samples) {
            throw Error(PF_ERR_INVALID_ARGUMENT, "PF_ERR_INVALID_ARGUMENT: log_weights must have n_samples entries");
        }
        require_model();
        detail::check_x("Model::predict", x.size(), n_inputs, info_.input_dim);
        Prediction p;
        pf_prediction out = prepare(p, n_inputs);
        detail::check(pf_predict(handle_, x.data(), n_inputs, x.size(), theta.data(), n_samples, theta.size(),
                                 log_weights ? log_weights->data() : nullptr, &out));
        p.ess = out.ess;
        return p;
    }

    /// Draw n_samples and average at x in one call.
    Prediction sample_predict(std::size_t n_samples, const std::vector<float> &x, std::size_t n_inputs,
                              const SampleOptions &options = SampleOptions()) const {
        require_model();
        detail::check_x("Model::sample_predict", x.size(), n_inputs, info_.input_dim);
        Prediction p;
        pf_prediction out = prepare(p, n_inputs);
        detail::check(pf_sample_predict(handle_, &options, n_samples, x.data(), n_inputs, x.size(), &out));
        p.ess = out.ess;
        return p;
    }

private:
    // Before the size checks, which would otherwise report a moved-from Model's zeroed dimensions.
    void require_model() const {
        if (handle_ == nullptr) detail::invalid("this postflow::Model was moved from: it holds no model");
    }

    pf_prediction prepare(Prediction &p, std::size_t n_inputs) const {
        p.n_inputs = n_inputs;
        const std::size_t u = detail::checked_mul(n_inputs, info_.uncertainty_dim, "n_inputs x uncertainty_dim");
        detail::allocate(p.mean, detail::checked_mul(n_inputs, info_.output_dim, "n_inputs x output_dim"), "mean");
        detail::allocate(p.total, u, "total");
        detail::allocate(p.aleatoric, u, "aleatoric");
        detail::allocate(p.epistemic, u, "epistemic");
        pf_prediction out{};
        out.struct_size = sizeof(out);
        out.mean = p.mean.data();
        out.mean_len = p.mean.size();
        out.total = p.total.data();
        out.total_len = p.total.size();
        out.aleatoric = p.aleatoric.data();
        out.aleatoric_len = p.aleatoric.size();
        out.epistemic = p.epistemic.data();
        out.epistemic_len = p.epistemic.size();
        return out;
    }

    pf_model *handle_ = nullptr;
    pf_model_info info_{};
};

}  // namespace postflow

#endif  // POSTFLOW_HPP
