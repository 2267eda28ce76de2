/* 8 threads share one pf_model: each draws samples with log-densities and
 * predicts, several times, and must get exactly the single-threaded results.
 * Each thread also checks that its last-error message is its own. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>

#include "common.h"

#define THREADS 8
#define ROUNDS 3
#define N 16
#define D 17
#define NX 4

static const float CLS_X[NX * 2] = {0.5f, -1.0f, 1.5f, 0.25f, -0.75f, 2.0f, 0.0f, 0.0f};

typedef struct {
    float theta[N * D];
    float logd[N];
    float se[N];
    float mean[NX * 2];
    float total[NX], ale[NX], epi[NX];
    float sp_mean[NX * 2];
} result;

typedef struct {
    const pf_model *model;
    int id;
    const result *expected;
    int failures;
} job;

static pf_status run(const pf_model *m, uint64_t seed, result *r) {
    pf_sample_options o;
    pf_sample_options_default(&o);
    o.seed = seed;
    o.trace = PF_TRACE_HUTCHINSON;
    o.probes = 2;
    o.batch_size = 5;
    pf_status st = pf_sample(m, &o, N, r->theta, N * D, r->logd, N, r->se, N);
    if (st != PF_OK) return st;
    pf_prediction p;
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    p.mean = r->mean;
    p.mean_len = NX * 2;
    p.total = r->total;
    p.total_len = NX;
    p.aleatoric = r->ale;
    p.aleatoric_len = NX;
    p.epistemic = r->epi;
    p.epistemic_len = NX;
    st = pf_predict(m, CLS_X, NX, NX * 2, r->theta, N, N * D, r->logd, &p);
    if (st != PF_OK) return st;
    pf_prediction q;
    memset(&q, 0, sizeof q);
    q.struct_size = sizeof q;
    q.mean = r->sp_mean;
    q.mean_len = NX * 2;
    return pf_sample_predict(m, &o, N, CLS_X, NX, NX * 2, &q);
}

static void *worker(void *arg) {
    job *j = (job *)arg;
    for (int round = 0; round < ROUNDS; round++) {
        result r;
        pf_status st = run(j->model, 100 + (uint64_t)j->id, &r);
        if (st != PF_OK) {
            fprintf(stderr, "thread %d: %s: %s\n", j->id, pf_status_string(st), pf_last_error_message());
            j->failures++;
            continue;
        }
        if (memcmp(&r, j->expected, sizeof r) != 0) {
            fprintf(stderr, "thread %d round %d: results differ from single-threaded\n", j->id, round);
            j->failures++;
        }
        /* A failure of this thread's own, with its id in the message. */
        float t[1];
        char want[128];
        snprintf(want, sizeof want, "theta_out_len is %d, too small", j->id);
        st = pf_sample(j->model, NULL, 1, t, (size_t)j->id, NULL, 0, NULL, 0);
        if (st != PF_ERR_INVALID_ARGUMENT || strstr(pf_last_error_message(), want) == NULL) {
            fprintf(stderr, "thread %d: wrong error %s: %s\n", j->id, pf_status_string(st), pf_last_error_message());
            j->failures++;
        }
    }
    return NULL;
}

int main(void) {
    pf_model *m = load_fixture("affine_cls");
    static result expected[THREADS];
    for (int i = 0; i < THREADS; i++) {
        pf_status st = run(m, 100 + (uint64_t)i, &expected[i]);
        CHECK(st == PF_OK, "single-threaded run %d: %s", i, pf_last_error_message());
    }
    CHECK(memcmp(expected[0].theta, expected[1].theta, sizeof expected[0].theta) != 0, "seeds must differ");

    pthread_t threads[THREADS];
    job jobs[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i].model = m;
        jobs[i].id = i;
        jobs[i].expected = &expected[i];
        jobs[i].failures = 0;
        CHECK(pthread_create(&threads[i], NULL, worker, &jobs[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        CHECK(jobs[i].failures == 0, "thread %d had %d failures", i, jobs[i].failures);
    }
    pf_model_free(m);
    return finish("test_threads");
}
