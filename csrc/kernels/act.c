/* act.c — silu(gate) * up, float32, elementwise.
 *
 * out[M, N] = gate / (1 + expf(-gate)) * up, row by row; rows are split over OpenMP
 * threads, each element computed by the same scalar operations (no SIMD exp
 * approximation), so results do not depend on the thread count.
 */
#include "act.h"

#include <math.h>

void qn_silu_mul(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

qn_status qn_silu_mul_rows(float *out, const float *gate, const float *up, int64_t M, int64_t N, int64_t ldo,
                           int64_t ldg, int64_t ldu) {
    if (M < 0 || N < 0 || (M > 1 && (ldo < N || ldg < N || ldu < N)))
        return qn_set_error(QN_EINVAL, "silu_mul: bad sizes M=%lld N=%lld", (long long)M, (long long)N);
#pragma omp parallel for schedule(static) if (M * N >= 16384)
    for (int64_t m = 0; m < M; m++) qn_silu_mul(out + m * ldo, gate + m * ldg, up + m * ldu, N);
    return QN_OK;
}
