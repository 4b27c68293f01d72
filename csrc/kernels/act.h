/* act.h — SiLU-gated product of an MLP: y[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + e^-g).
 *
 * Inputs float32, float16 or bfloat16 (enum qn_attn_dtype codes 0..2), output float32.
 * Plain C11 loops the compiler vectorizes for the baseline ISA; the driver owns OpenMP over
 * rows (tokens); each row is computed by one thread in a fixed order, so results do not
 * depend on the thread count.
 */
#ifndef QN_ACT_H
#define QN_ACT_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + exp(-g)). */
qn_status qn_silu_mul(float *QN_RESTRICT y, const void *gate, const void *up, int dtype, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
