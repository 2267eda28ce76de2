/* Helpers shared by the C tests: checks that count failures, and fixture paths. */
#ifndef POSTFLOW_TEST_COMMON_H
#define POSTFLOW_TEST_COMMON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "postflow.h"

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        g_checks++;                                                        \
        if (!(cond)) {                                                     \
            g_failures++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* A call that must fail with `status` and leave a message containing `substr`. */
#define EXPECT_ERR(call, status, substr)                                                             \
    do {                                                                                             \
        pf_status st_ = (call);                                                                      \
        const char *msg_ = pf_last_error_message();                                                  \
        CHECK(st_ == (status), "%s returned %s, expected %s (message: %s)", #call,                   \
              pf_status_string(st_), pf_status_string(status), msg_);                                \
        CHECK(msg_ != NULL && strstr(msg_, (substr)) != NULL, "%s: message \"%s\" lacks \"%s\"", #call, \
              msg_ ? msg_ : "(null)", (substr));                                                     \
    } while (0)

/* A call that must succeed. */
#define EXPECT_OK(call)                                                                               \
    do {                                                                                              \
        pf_status st_ = (call);                                                                       \
        CHECK(st_ == PF_OK, "%s returned %s: %s", #call, pf_status_string(st_), pf_last_error_message()); \
    } while (0)

static inline const char *fixture_root(void) {
    const char *root = getenv("POSTFLOW_FIXTURES");
    return root && *root ? root : "tests/fixtures/bundles";
}

static inline void fixture_path(char *buf, size_t len, const char *name) {
    snprintf(buf, len, "%s/%s", fixture_root(), name);
}

static inline pf_model *load_fixture(const char *name) {
    char path[4096];
    pf_model *m = NULL;
    fixture_path(path, sizeof path, name);
    pf_status st = pf_model_load(path, NULL, &m);
    if (st != PF_OK) {
        fprintf(stderr, "cannot load %s: %s: %s\n", path, pf_status_string(st), pf_last_error_message());
        exit(2);
    }
    return m;
}

static inline int all_equal_to(const float *a, size_t n, float v) {
    for (size_t i = 0; i < n; i++) {
        if (a[i] != v) return 0;
    }
    return 1;
}

static inline void fill(float *a, size_t n, float v) {
    for (size_t i = 0; i < n; i++) a[i] = v;
}

static inline int finish(const char *name) {
    if (g_failures) {
        fprintf(stderr, "%s: %d of %d checks FAILED\n", name, g_failures, g_checks);
        return 1;
    }
    printf("%s: all %d checks passed\n", name, g_checks);
    return 0;
}

#ifdef PF_TEST_REFERENCE
#include <errno.h>

/* ---- reference numbers (for tests that define PF_TEST_REFERENCE first) ---- */

typedef struct {
    char name[64];
    size_t n;
    double *v;
} ref_array;

static ref_array g_refs[64];
static size_t g_nrefs = 0;

static inline int load_reference(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "cannot open reference %s: %s\n", path, strerror(errno));
        return 0;
    }
    while (g_nrefs < 64) {
        ref_array *r = &g_refs[g_nrefs];
        if (fscanf(f, "%63s %zu", r->name, &r->n) != 2) break;
        r->v = (double *)malloc((r->n ? r->n : 1) * sizeof(double));
        for (size_t i = 0; i < r->n; i++) {
            if (fscanf(f, "%lf", &r->v[i]) != 1) {
                fprintf(stderr, "reference %s: bad value %zu of %s\n", path, i, r->name);
                fclose(f);
                return 0;
            }
        }
        g_nrefs++;
    }
    fclose(f);
    return 1;
}

static inline void free_reference(void) {
    for (size_t i = 0; i < g_nrefs; i++) free(g_refs[i].v);
    g_nrefs = 0;
}

/* Compare `n` floats with the reference array `name` (relative 1e-6). */
static inline void check_ref(const char *name, const float *got, size_t n) {
    const ref_array *r = NULL;
    for (size_t i = 0; i < g_nrefs; i++) {
        if (strcmp(g_refs[i].name, name) == 0) r = &g_refs[i];
    }
    CHECK(r != NULL, "reference %s missing", name);
    if (!r) return;
    CHECK(r->n == n, "reference %s has %zu values, C produced %zu", name, r->n, n);
    if (r->n != n) return;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double want = r->v[i];
        if (!(fabs((double)got[i] - want) <= 1e-6 * fmax(1.0, fabs(want)))) {
            if (bad++ < 3) fprintf(stderr, "  %s[%zu]: C %.9g, Rust %.9g\n", name, i, (double)got[i], want);
        }
    }
    CHECK(bad == 0, "%s: %zu of %zu values differ from the Rust API", name, bad, n);
}


#endif /* PF_TEST_REFERENCE */

#endif /* POSTFLOW_TEST_COMMON_H */
