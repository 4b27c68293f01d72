/* test_matmul.c — every ISA path of qn_matmul against the _ref path, bitwise, on odd shapes,
 * all 9 dtype pairs, padded strides and 1-3 threads; a float64 bound; the error statuses.
 * Build and run from the repository root (add -fsanitize=address,undefined to F for ASan):
 *   mkdir -p tests/c/build && cd tests/c/build && F="-std=c11 -O2 -g -fopenmp -ffp-contract=off -I../../../csrc" &&
 *   for f in ../../../csrc/[a-z]*.c ../../../csrc/kernels/[a-z]*.c; do case $f in *_avx2.c) X="-mavx2 -mfma -mf16c";; *_avx512.c) X="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni";; *) X="";; esac; gcc $F $X -c $f -o $(basename $f .c).o || break; done &&
 *   gcc $F ../test_matmul.c *.o -lm -o test_matmul && ./test_matmul
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "dispatch.h"
#include "kernels/matmul.h"
#include "qn_common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int g_fail = 0, g_checks = 0;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        g_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            g_fail++;                                                                              \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                            \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static float frand(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static int64_t esize(int dt) { return dt == QN_MM_F32 ? 4 : 2; }

static float get(const void *p, int dt, int64_t i) {
    if (dt == QN_MM_F16) return qn_f16_to_f32(((const uint16_t *)p)[i]);
    if (dt == QN_MM_BF16) return qn_bf16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* rows x cols random values in dt, row stride ld (padding holds NaN-ish garbage). */
static void *make(int dt, int64_t rows, int64_t cols, int64_t ld) {
    int64_t n = rows > 0 ? (rows - 1) * ld + cols : 0;
    void *p = malloc((size_t)(n > 0 ? n : 1) * (size_t)esize(dt));
    for (int64_t i = 0; i < n; i++) {
        int pad = i % ld >= cols;
        float v = pad ? NAN : frand();
        if (dt == QN_MM_F16) ((uint16_t *)p)[i] = qn_f32_to_f16(v);
        else if (dt == QN_MM_BF16) ((uint16_t *)p)[i] = qn_f32_to_bf16(v);
        else ((float *)p)[i] = v;
    }
    return p;
}

static float *run(int isa, int nth, const void *x, int xdt, const void *w, int wdt, int64_t M, int64_t N,
                  int64_t K, int64_t ldx, int64_t ldw, int64_t ldy) {
    qn_dispatch_set_isa(isa);
#ifdef _OPENMP
    omp_set_num_threads(nth);
#endif
    int64_t ny = M > 0 ? (M - 1) * ldy + N : 1;
    float *y = malloc((size_t)ny * 4);
    for (int64_t i = 0; i < ny; i++) y[i] = -12345.0f;
    int64_t wsb = qn_matmul_workspace_size(M, N, K, xdt, wdt, nth);
    void *ws = aligned_alloc(64, (size_t)qn_round_up(wsb, 64));
    qn_status st = qn_matmul(y, x, xdt, w, wdt, M, N, K, ldx, ldw, ldy, ws, wsb);
    CHECK(st == QN_OK, "status %d (%s) for M=%lld N=%lld K=%lld", st, qn_last_error(), (long long)M, (long long)N,
          (long long)K);
    free(ws);
    return y;
}

static void test_shape(int64_t M, int64_t N, int64_t K, int xdt, int wdt, int64_t xpad, int64_t ypad) {
    int64_t ldx = K + xpad, ldw = K + (K % 3), ldy = N + ypad;
    void *x = make(xdt, M, K, ldx), *w = make(wdt, N, K, ldw);
    float *ref = run(QN_ISA_REF, 1, x, xdt, w, wdt, M, N, K, ldx, ldw, ldy);
    /* sanity: float64 oracle with a loose bound (the bitwise checks below are the real test) */
    double worst = 0.0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0.0, a = 0.0;
            for (int64_t k = 0; k < K; k++) {
                double p = (double)get(x, xdt, m * ldx + k) * (double)get(w, wdt, n * ldw + k);
                s += p;
                a += fabs(p);
            }
            double e = fabs(s - (double)ref[m * ldy + n]) / (a + 1e-30);
            worst = e > worst ? e : worst;
        }
    CHECK(worst < 1e-5, "ref error %.3g too large M=%lld N=%lld K=%lld", worst, (long long)M, (long long)N, (long long)K);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = N; n < ldy && m < M - 1; n++)
            CHECK(ref[m * ldy + n] == -12345.0f, "padding of y written at (%lld, %lld)", (long long)m, (long long)n);
    int hw = qn_cpu_best_isa();
    for (int isa = QN_ISA_AVX2; isa <= hw; isa++) {
        for (int nth = 1; nth <= 3; nth += 1 + (isa == QN_ISA_AVX2)) {
            float *y = run(isa, nth, x, xdt, w, wdt, M, N, K, ldx, ldw, ldy);
            int64_t ny = M > 0 ? (M - 1) * ldy + N : 0, bad = -1;
            for (int64_t i = 0; i < ny && bad < 0; i++)
                if (memcmp(&y[i], &ref[i], 4) != 0) bad = i;
            CHECK(bad < 0, "%s x%d differs from ref: M=%lld N=%lld K=%lld x=%d w=%d at (%lld, %lld): %.9g vs %.9g",
                  qn_isa_name(isa), nth, (long long)M, (long long)N, (long long)K, xdt, wdt, (long long)(bad / ldy),
                  (long long)(bad % ldy), bad >= 0 ? y[bad] : 0.0, bad >= 0 ? ref[bad] : 0.0);
            free(y);
        }
    }
    free(ref);
    free(x);
    free(w);
}

static void test_errors(void) {
    qn_dispatch_set_isa(QN_ISA_AVX512);
    float x[64] = {0}, w[64] = {0}, y[64];
    char ws[256 + 64];
    int64_t wsb = qn_matmul_workspace_size(2, 2, 4, QN_MM_F32, QN_MM_F32, 64);
    CHECK(wsb <= 256, "tiny dot workspace is %lld bytes", (long long)wsb);
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 2, 0, 4, 4, 4, 2, ws, 256) == QN_EINVAL, "N=0 accepted");
    CHECK(strstr(qn_last_error(), "matmul") != NULL, "message lacks the op: %s", qn_last_error());
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 2, 2, 0, 4, 4, 2, ws, 256) == QN_EINVAL, "K=0 accepted");
    CHECK(qn_matmul(y, x, 3, w, QN_MM_F32, 2, 2, 4, 4, 4, 2, ws, 256) == QN_EINVAL, "x dtype 3 accepted");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, -1, 2, 2, 4, 4, 4, 2, ws, 256) == QN_EINVAL, "w dtype -1 accepted");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 2, 2, 4, 3, 4, 2, ws, 256) == QN_EINVAL, "ldx < K accepted");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 2, 2, 4, 4, 4, 1, ws, 256) == QN_EINVAL, "ldy < N accepted");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 40, 1, 1, 1, 1, 1, ws, 256) == QN_EINVAL, "small workspace accepted");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 0, 2, 4, 4, 4, 2, NULL, 0) == QN_OK, "M=0 refused");
    CHECK(qn_matmul(y, x, QN_MM_F32, w, QN_MM_F32, 2, 2, 4, 4, 4, 2, ws, 256) == QN_OK, "valid call refused: %s",
          qn_last_error());
}

int main(void) {
    qn_dispatch_init();
    printf("best ISA: %s\n", qn_isa_name(qn_cpu_best_isa()));
    test_errors();
    /* dot formulation up to M = 32 (blocks of 4 x rows, 6 or 8 w rows, tails of each),
     * gemm above (8-row micro-kernels and their 1..7-row tails, several K blocks and tiles) */
    static const int64_t shapes[][3] = {
        {1, 1, 1},     {1, 7, 5},      {1, 64, 16},   {1, 131, 257}, {2, 67, 33},    {3, 50, 100},
        {4, 19, 31},   {5, 37, 47},    {7, 129, 15},  {8, 65, 513},  {13, 1, 300},   {30, 17, 16},
        {31, 49, 17},  {32, 48, 256},  {33, 97, 255}, {39, 385, 129}, {45, 13, 1030}, {61, 400, 61},
        {270, 41, 37}, {100, 101, 3},
    };
    int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
    for (int s = 0; s < nshapes; s++)
        test_shape(shapes[s][0], shapes[s][1], shapes[s][2], QN_MM_F32, QN_MM_F32, s % 3 ? 0 : 5, s % 2 ? 3 : 0);
    for (int xdt = 0; xdt < 3; xdt++)
        for (int wdt = 0; wdt < 3; wdt++)
            for (int s = 0; s < nshapes; s += 3) test_shape(shapes[s][0], shapes[s][1], shapes[s][2], xdt, wdt, 2, 1);
    printf("%d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
