/* test_act.c — gelu_tanh_mul from C alone: the _ref kernel against the float64 formula
 * 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * u, every ISA path against _ref bit for bit
 * (float32 / float16 / bfloat16 inputs, lengths around the 8- and 16-lane widths, extreme and
 * NaN gates), the threaded driver against one thread, out aliasing gate, guard values after
 * the output, and invalid arguments returning QN_EINVAL. Run: make -C tests/c run */
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "dispatch.h"
#include "kernels/act.h"

#include "test_util.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define GUARD 32
static const float GUARD_VAL = -12345.0f;

/* n values of dtype dt (0 f32, 1 f16, 2 bf16) from float32 v */
static void *encode(const float *v, int dt, int64_t n) {
    void *p = malloc((size_t)(n > 0 ? n : 1) * (dt == 0 ? 4 : 2));
    for (int64_t i = 0; i < n; i++) {
        if (dt == 0) ((float *)p)[i] = v[i];
        else ((uint16_t *)p)[i] = dt == 1 ? qn_f32_to_f16(v[i]) : qn_f32_to_bf16(v[i]);
    }
    return p;
}

static float decode(const void *p, int dt, int64_t i) {
    if (dt == 0) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == 1 ? qn_f16_to_f32(h) : qn_bf16_to_f32(h);
}

static float *guarded(int64_t n) {
    float *p = malloc((size_t)(n + GUARD) * 4);
    for (int64_t i = 0; i < n + GUARD; i++) p[i] = GUARD_VAL;
    return p;
}

static int same_bits(float a, float b) { return memcmp(&a, &b, 4) == 0 || (isnan(a) && isnan(b)); }

/* 0.5 g (1 + tanh(y)) as g / (1 + exp(-2y)): no cancellation in 1 + tanh for y << 0 */
static double gelu64(double g) { return g / (1.0 + exp(-1.5957691216057308 * (g + 0.044715 * g * g * g))); }

static void test_length(int64_t n, int dt) {
    float *gv = malloc((size_t)(n + 1) * 4), *uv = malloc((size_t)(n + 1) * 4);
    static const float special[] = {0.0f, -0.0f, 1e4f, -1e4f, 90.0f, -90.0f, 1e30f, -1e30f, 1e-30f, NAN};
    for (int64_t i = 0; i < n; i++) {
        gv[i] = (i % 13 == 5) ? special[(i / 13) % 10] : 4.0f * nrand();
        if (dt == 1 && fabsf(gv[i]) > 6e4f) gv[i] = gv[i] > 0 ? 6e4f : -6e4f; /* inside float16's range */
        uv[i] = nrand();
    }
    void *g = encode(gv, dt, n), *u = encode(uv, dt, n);

    qn_dispatch_set_isa(QN_ISA_REF);
    float *ref = guarded(n);
    qn_gelu_tanh_mul_ref(ref, g, u, dt, n);
    double worst = 0.0, scale = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        double gd = decode(g, dt, i), ud = decode(u, dt, i);
        if (isnan(gd)) {
            CHECK(isnan(ref[i]), "n=%lld dt=%d: NaN gate gave %g at %lld", (long long)n, dt, ref[i],
                  (long long)i);
            continue;
        }
        double want = gelu64(gd) * ud;
        CHECK(isfinite(ref[i]), "n=%lld dt=%d: %g at %lld for gate %g", (long long)n, dt, ref[i],
              (long long)i, gd);
        double e = fabs((double)ref[i] - want);
        /* a few float32 roundings relative to the value, and absolutely at the float32 floor */
        if (e > 4e-7 * fabs(want) + 1e-37) worst = e > worst ? e : worst;
        scale = fabs(want) > scale ? fabs(want) : scale;
    }
    CHECK(worst / scale < 1e-6, "n=%lld dt=%d: _ref off the float64 formula by %.3g (relative to max %.3g)",
          (long long)n, dt, worst, scale);
    for (int i = 0; i < GUARD; i++)
        CHECK(ref[n + i] == GUARD_VAL, "n=%lld: _ref wrote past the end", (long long)n);

    for (int isa = QN_ISA_AVX2; isa <= qn_cpu_best_isa(); isa++) {
        qn_dispatch_set_isa(isa);
        float *y = guarded(n);
        qn_kernels.gelu_mul(y, g, u, dt, n);
        int64_t bad = -1;
        for (int64_t i = 0; i < n && bad < 0; i++)
            if (!same_bits(y[i], ref[i])) bad = i;
        CHECK(bad < 0, "%s n=%lld dt=%d differs from _ref at %lld: %.9g vs %.9g", qn_isa_name(isa),
              (long long)n, dt, (long long)bad, bad >= 0 ? y[bad] : 0.0, bad >= 0 ? ref[bad] : 0.0);
        for (int i = 0; i < GUARD; i++)
            CHECK(y[n + i] == GUARD_VAL, "%s n=%lld: wrote past the end", qn_isa_name(isa), (long long)n);
        free(y);
    }
    free(ref);
    free(g);
    free(u);
    free(gv);
    free(uv);
}

/* the threaded driver on the best path: the same bits for 1 and 3 threads, and in place */
static void test_driver(void) {
    qn_dispatch_init();
    const int64_t n = 70001;
    float *g = malloc(n * 4), *u = malloc(n * 4), *y1 = malloc(n * 4), *y3 = malloc(n * 4);
    for (int64_t i = 0; i < n; i++) {
        g[i] = 3.0f * nrand();
        u[i] = nrand();
    }
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    CHECK(qn_gelu_tanh_mul_any(y1, g, u, 0, n) == QN_OK, "driver refused a valid call: %s", qn_last_error());
#ifdef _OPENMP
    omp_set_num_threads(3);
#endif
    CHECK(qn_gelu_tanh_mul_any(y3, g, u, 0, n) == QN_OK, "driver refused a valid call: %s", qn_last_error());
    CHECK(memcmp(y1, y3, n * 4) == 0, "1 and 3 threads differ");
    CHECK(qn_gelu_tanh_mul_any(g, g, u, 0, n) == QN_OK, "in-place call refused");
    CHECK(memcmp(g, y1, n * 4) == 0, "out == gate differs from a separate out");
    CHECK(qn_gelu_tanh_mul_any(y1, g, u, 0, 0) == QN_OK, "n = 0 refused");
    CHECK(qn_gelu_tanh_mul_any(y1, g, u, 3, 4) == QN_EINVAL, "dtype 3 accepted");
    CHECK(strstr(qn_last_error(), "gelu_mul") != NULL, "message lacks the op: %s", qn_last_error());
    CHECK(qn_gelu_tanh_mul_any(y1, g, u, -1, 4) == QN_EINVAL, "dtype -1 accepted");
    CHECK(qn_gelu_tanh_mul_any(y1, g, u, 0, -1) == QN_EINVAL, "n = -1 accepted");
    free(g);
    free(u);
    free(y1);
    free(y3);
}

int main(void) {
    qn_dispatch_init();
    printf("best path: %s\n", qn_isa_name(qn_cpu_best_isa()));
    static const int64_t lengths[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 1000, 4099};
    for (int dt = 0; dt < 3; dt++)
        for (size_t k = 0; k < sizeof lengths / sizeof lengths[0]; k++) test_length(lengths[k], dt);
    test_driver();
    printf("test_act: %s (%d failures)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
