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

#endif /* POSTFLOW_TEST_COMMON_H */
