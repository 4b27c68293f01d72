/* act.c — silu(gate) * up, float32, elementwise.
 *
 * out[M, N] = gate / (1 + exp(-gate)) * up, row by row. exp is our own (Cephes-style:
 * round x*log2(e) with the 1.5*2^23 trick, two-part ln2 reduction, degree-6 polynomial,
 * 2^n from bits; about 1 ulp, no libm, no float->int conversion) so the plain C loop
 * vectorizes on any ISA with identical results. Rows are split over OpenMP threads; each
 * element is computed by the same operations, so results do not depend on the thread count.
 */
#include "act.h"

#include "act_impl.h"
#include "../dispatch.h"

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
