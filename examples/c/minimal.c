/* Minimal postflow program: load a bundle, draw 100 weight samples with
 * log-densities, and print the Bayesian model average at the first inputs.
 *
 *   cc minimal.c $(pkg-config --cflags --libs postflow) -o minimal
 *   ./minimal path/to/bundle
 */
#include <postflow.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, pf_status st) {
    fprintf(stderr, "%s failed: %s: %s\n", what, pf_status_string(st), pf_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s BUNDLE_DIR\n", argv[0]);
        return 2;
    }
    pf_model *model = NULL;
    pf_status st = pf_model_load(argv[1], NULL, &model); /* NULL options: CPU, defaults */
    if (st != PF_OK) return fail("pf_model_load", st);

    pf_model_info info = {.struct_size = sizeof info};
    pf_model_get_info(model, &info);
    printf("postflow %s: %s, %zu inputs, %zu outputs, %zu weights\n", pf_version(),
           info.task == PF_TASK_CLASSIFICATION ? "classification" : "regression", info.input_dim, info.output_dim,
           info.weight_dim);

    /* 100 samples with Hutchinson log-densities (the bundle's probe count). */
    const size_t n = 100;
    float *theta = malloc(n * info.weight_dim * sizeof *theta);
    float *log_density = malloc(n * sizeof *log_density);
    pf_sample_options opts;
    pf_sample_options_init(&opts, sizeof opts);
    opts.seed = 7;
    opts.start_time = 0; /* fresh flow samples: at a bundle's default start time 1 (moons)
                            sampling returns stored draws, which have no log-density */
    opts.trace = PF_TRACE_HUTCHINSON;
    st = pf_sample(model, &opts, n, theta, n * info.weight_dim, log_density, n, NULL, 0);
    if (st != PF_OK) return fail("pf_sample", st);
    printf("sample 0: log q = %.3f\n", (double)log_density[0]);

    /* Average the network over the samples at three inputs (all features 0, 0.5, 1). */
    const size_t n_inputs = 3;
    float *x = malloc(n_inputs * info.input_dim * sizeof *x);
    for (size_t i = 0; i < n_inputs; i++)
        for (size_t j = 0; j < info.input_dim; j++) x[i * info.input_dim + j] = 0.5f * (float)i;
    float *mean = malloc(n_inputs * info.output_dim * sizeof *mean);
    float *epistemic = malloc(n_inputs * info.uncertainty_dim * sizeof *epistemic);
    pf_prediction pred = {0};
    pred.struct_size = sizeof pred;
    pred.mean = mean;
    pred.mean_len = n_inputs * info.output_dim;
    pred.epistemic = epistemic;
    pred.epistemic_len = n_inputs * info.uncertainty_dim;
    st = pf_predict(model, x, n_inputs, n_inputs * info.input_dim, theta, n, n * info.weight_dim, NULL, &pred);
    if (st != PF_OK) return fail("pf_predict", st);
    for (size_t i = 0; i < n_inputs; i++)
        printf("input %zu: mean[0] = %.4f, epistemic[0] = %.4f\n", i, (double)mean[i * info.output_dim],
               (double)epistemic[i * info.uncertainty_dim]);

    free(x);
    free(mean);
    free(epistemic);
    free(theta);
    free(log_density);
    pf_model_free(model);
    return 0;
}
