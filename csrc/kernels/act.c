/* act.c — silu(gate) * up and gelu_tanh(gate) * up, elementwise.
 *
 * silu: out[M, N] = gate / (1 + exp(-gate)) * up, row by row, float32. exp is our own
 * (act_impl.h; Cephes-style: round x*log2(e) with the 1.5*2^23 trick, two-part ln2
 * reduction, degree-6 polynomial, 2^n from bits; about 1 ulp, no libm, no float->int
 * conversion); the loop is compiled once per ISA (act_avx2.c, act_avx512.c) and dispatched,
 * with identical results.
 * gelu_tanh: out[n] = gate / (1 + exp(gate (K0 + K1 gate^2))) * up, the _ref row kernel here
 * (act_avx2.c / act_avx512.c repeat its steps in intrinsics) and the threaded driver.
 * Work is split over OpenMP threads; each element is computed by the same operations, so
 * results do not depend on the thread count.
 */
#include "act.h"

#include "../dispatch.h"
#include "act_impl.h"

void qn_silu_mul_ref(float *out, const float *gate, const float *up, int64_t n) {
    silu_mul_body(out, gate, up, n);
}

void qn_silu_mul(float *out, const float *gate, const float *up, int64_t n) {
    qn_kernels.silu_mul(out, gate, up, n);
}

qn_status qn_silu_mul_rows(float *out, const float *gate, const float *up, int64_t M, int64_t N, int64_t ldo,
                           int64_t ldg, int64_t ldu) {
    if (M < 0 || N < 0 || (M > 1 && (ldo < N || ldg < N || ldu < N)))
        return qn_set_error(QN_EINVAL, "silu_mul: bad sizes M=%lld N=%lld", (long long)M, (long long)N);
#pragma omp parallel for schedule(static) if (M * N >= 16384)
    for (int64_t m = 0; m < M; m++) qn_silu_mul(out + m * ldo, gate + m * ldg, up + m * ldu, N);
    return QN_OK;
}

/* Converts float16 / bfloat16 inputs in stack-sized slices, then the same float32 loop. */
qn_status qn_silu_mul_any(float *QN_RESTRICT y, const void *gate, const void *up, int dtype, int64_t n) {
    if (n < 0 || dtype < 0 || dtype > 2)
        return qn_set_error(QN_EINVAL, "silu_mul: bad arguments n=%lld dtype=%d", (long long)n, dtype);
    enum { SLICE = 1024 };
    const int64_t nslices = qn_ceil_div(n, SLICE);
#pragma omp parallel for schedule(static) if (n >= 16384)
    for (int64_t s = 0; s < nslices; s++) {
        int64_t i0 = s * SLICE, len = qn_min64(SLICE, n - i0);
        if (dtype == 0) {
            qn_silu_mul(y + i0, (const float *)gate + i0, (const float *)up + i0, len);
            continue;
        }
        float g[SLICE], u[SLICE];
        const uint16_t *gh = (const uint16_t *)gate + i0, *uh = (const uint16_t *)up + i0;
        for (int64_t i = 0; i < len; i++) {
            g[i] = dtype == 1 ? qn_f16_to_f32(gh[i]) : qn_bf16_to_f32(gh[i]);
            u[i] = dtype == 1 ? qn_f16_to_f32(uh[i]) : qn_bf16_to_f32(uh[i]);
        }
        qn_silu_mul(y + i0, g, u, len);
    }
    return QN_OK;
}

/* ---- gelu_tanh(gate) * up ---------------------------------------------------------------- */

/* 0.5 g (1 + tanh(y)) = g * sigmoid(2y) = g / (1 + exp(-2y)): one exp and a division, and no
 * cancellation in 1 + tanh for large negative y. */
QN_VEC_MATH static void gelu_tanh_mul_f32(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        float t = g * (QN_GELU_K0 + QN_GELU_K1 * (g * g));
        out[i] = g / (1.0f + exp_cephes(t)) * up[i];
    }
}

void qn_gelu_tanh_mul_ref(float *out, const void *gate, const void *up, int dtype, int64_t n) {
    if (dtype == 0) {
        gelu_tanh_mul_f32(out, (const float *)gate, (const float *)up, n);
        return;
    }
    enum { CHUNK = 256 };
    float g[CHUNK], u[CHUNK];
    const uint16_t *gh = (const uint16_t *)gate, *uh = (const uint16_t *)up;
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t len = qn_min64(CHUNK, n - i0);
        for (int64_t i = 0; i < len; i++) {
            g[i] = dtype == 1 ? qn_f16_to_f32(gh[i0 + i]) : qn_bf16_to_f32(gh[i0 + i]);
            u[i] = dtype == 1 ? qn_f16_to_f32(uh[i0 + i]) : qn_bf16_to_f32(uh[i0 + i]);
        }
        gelu_tanh_mul_f32(out + i0, g, u, len);
    }
}

qn_status qn_gelu_tanh_mul_any(float *y, const void *gate, const void *up, int dtype, int64_t n) {
    if (n < 0 || dtype < 0 || dtype > 2)
        return qn_set_error(QN_EINVAL, "gelu_mul: bad arguments n=%lld dtype=%d", (long long)n, dtype);
    enum { SLICE = 4096 };
    const int64_t es = dtype == 0 ? 4 : 2, nslices = qn_ceil_div(n, SLICE);
    const qn_gelu_mul_fn fn = qn_kernels.gelu_mul;
#pragma omp parallel for schedule(static) if (n >= 16384)
    for (int64_t s = 0; s < nslices; s++) {
        int64_t i0 = s * SLICE;
        fn(y + i0, (const char *)gate + i0 * es, (const char *)up + i0 * es, dtype, qn_min64(SLICE, n - i0));
    }
    return QN_OK;
}
