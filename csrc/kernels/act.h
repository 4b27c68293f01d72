/* act.h — elementwise activations of the MLP blocks.
 *
 * silu_mul: out[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + exp(-g)), float32.
 * One plain-C path (our own exp, vectorized by the compiler, the same results everywhere);
 * float16 / bfloat16 inputs through qn_silu_mul_any.
 */
#ifndef QN_ACT_H
#define QN_ACT_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[n] = silu(gate[n]) * up[n]; out may alias gate or up (exactly, not shifted).
 * Dispatched to the _ref / _avx2 / _avx512 twins, which give identical bits. */
void qn_silu_mul(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_ref(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n);
typedef void (*qn_silu_mul_fn)(float *out, const float *gate, const float *up, int64_t n);

/* Rows of out[M, N] (stride ldo) = silu(gate[M, N] (stride ldg)) * up[M, N] (stride ldu),
 * rows split over OpenMP threads. */
qn_status qn_silu_mul_rows(float *out, const float *gate, const float *up, int64_t M, int64_t N, int64_t ldo,
                           int64_t ldg, int64_t ldu);

/* y[n] = silu(gate[n]) * up[n] for gate and up in float32 (0), float16 (1) or bfloat16 (2);
 * y float32; the same values as qn_silu_mul on the converted inputs. */
qn_status qn_silu_mul_any(float *QN_RESTRICT y, const void *gate, const void *up, int dtype, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
