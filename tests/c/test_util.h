/* test_util.h — the shared harness of the plain-C kernel tests: a CHECK that counts
 * failures and prints where, and a seeded xorshift generator (uniform and normal). */
#ifndef QN_TEST_UTIL_H
#define QN_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

static int failures = 0;
#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            failures++;                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

static uint64_t rng_state = 88172645463325252ull;
static inline double urand(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static inline float nrand(void) {
    return (float)(sqrt(-2.0 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()));
}

#ifdef QN_FORMATS_H
#include <string.h>
/* A format descriptor; lut formats get an evenly spaced table in [-1, 1). */
static inline qn_format fmt(int bits, int group, int kind, int offset, int scale) {
    qn_format f;
    memset(&f, 0, sizeof f);
    f.bits = bits; f.group = group; f.kind = kind; f.offset = offset; f.scale = scale;
    if (kind == QN_LUT)
        for (int i = 0; i < (1 << bits); i++) f.lut[i] = (float)(i - (1 << (bits - 1))) / (float)(1 << (bits - 1));
    return f;
}
#endif

#endif
