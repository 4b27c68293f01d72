/* norm.h — RMSNorm (optionally fused with the residual add) and elementwise add.
 *
 * y[M, N] = v / sqrt(mean(v^2) + eps) * w[N]; inputs float32, float16 or bfloat16
 * (enum qn_attn_dtype codes 0..2), outputs float32.
 * Plain C11 loops the compiler vectorizes for the baseline ISA; the driver owns OpenMP over
 * rows (tokens); each row is computed by one thread in a fixed order, so results do not
 * depend on the thread count.
 */
#ifndef QN_NORM_H
#define QN_NORM_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y[M, N] = v / sqrt(mean(v^2) + eps) * w for each row v of x; with res != NULL, first
 * res += x and v is the updated row of res (the fused residual add of a pre-norm layer).
 * Sums of squares in double. */
qn_status qn_rmsnorm(float *QN_RESTRICT y,       /* [M, N] */
                     float *res,                 /* [M, N] residual stream updated in place, or NULL */
                     const void *x, int xdtype,  /* [M, N] */
                     const float *QN_RESTRICT w, /* [N] */
                     int64_t M, int64_t N, float eps);

/* y[n] = a[n] + b[n]; y may alias a or b. */
qn_status qn_add(float *y, const void *a, int adtype, const void *b, int bdtype, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
