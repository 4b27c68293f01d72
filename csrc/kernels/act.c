/* act.c — SiLU-gated product y[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + exp(-g)), for
 * the MLP of Llama-style decoders (gate and up [M, F] flattened to n = M * F).
 *
 * Chunks of the flat range run under `omp parallel for`; each element's value does not
 * depend on the thread count. Plain C the compiler vectorizes for the baseline ISA.
 */
#include "act.h"

#include <math.h>

static inline float load_f(const void *x, int dt, int64_t i) {
    switch (dt) {
    case 1: return qn_f16_to_f32(((const uint16_t *)x)[i]);
    case 2: return qn_bf16_to_f32(((const uint16_t *)x)[i]);
    default: return ((const float *)x)[i];
    }
}

qn_status qn_silu_mul(float *QN_RESTRICT y, const void *gate, const void *up, int dtype, int64_t n) {
    if (n < 0 || dtype < 0 || dtype > 2)
        return qn_set_error(QN_EINVAL, "silu_mul: bad arguments n=%lld dtype=%d", (long long)n, dtype);
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c += chunk) {
        int64_t e = qn_min64(n, c + chunk);
        for (int64_t i = c; i < e; i++) {
            float g = load_f(gate, dtype, i);
            /* exp(-g) overflows to inf for g < -88: g / inf = -0, the correct limit */
            y[i] = g / (1.0f + expf(-g)) * load_f(up, dtype, i);
        }
    }
    return QN_OK;
}
