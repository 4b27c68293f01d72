/* act.h — elementwise activations of the MLP blocks.
 *
 * silu_mul: out[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + exp(-g)), float32.
 * One plain-C loop compiled per ISA (our own exp, vectorized by the compiler, the same results everywhere);
 * float16 / bfloat16 inputs through qn_silu_mul_any.
 *
 * gelu_tanh_mul: out[n] = gelu_tanh(gate[n]) * up[n] (GeGLU, Gemma's gelu_pytorch_tanh),
 *   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
 *                = g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3))),
 * float32 / float16 / bfloat16 inputs, float32 out. A _ref row kernel and AVX2 / AVX-512 ones
 * (in-register conversion, the same exp step by step without FMA: bit-identical to _ref),
 * picked by the dispatch table; qn_gelu_tanh_mul_any splits n over OpenMP threads.
 */
#ifndef QN_ACT_H
#define QN_ACT_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Constants of the exp shared by the scalar and vector kernels (Cephes expf: x log2(e)
 * rounded with the 1.5 * 2^23 trick, ln 2 in two parts, degree-6 polynomial); one copy so the
 * paths cannot drift apart. */
#define QN_EXP_LO (-87.0f)
#define QN_EXP_HI 88.0f
#define QN_EXP_LOG2E 1.44269504088896341f
#define QN_EXP_ROUND 12582912.0f /* 1.5 * 2^23 */
#define QN_EXP_LN2_HI 0.693359375f
#define QN_EXP_LN2_LO (-2.12194440e-4f)
#define QN_EXP_P0 1.9875691500e-4f
#define QN_EXP_P1 1.3981999507e-3f
#define QN_EXP_P2 8.3334519073e-3f
#define QN_EXP_P3 4.1665795894e-2f
#define QN_EXP_P4 1.6666665459e-1f
#define QN_EXP_P5 5.0000001201e-1f

/* gelu_tanh(g) = g / (1 + exp(g (K0 + K1 g^2))) */
#define QN_GELU_K0 (-1.59576912160573071f)  /* -2 sqrt(2 / pi) */
#define QN_GELU_K1 (-0.0713548162726002527f) /* -2 sqrt(2 / pi) * 0.044715 */

/* out[n] = silu(gate[n]) * up[n]; out may alias gate or up (exactly, not shifted).
 * Dispatched to the _ref / _avx2 / _avx512 twins, which give identical bits. */
void qn_silu_mul(float *out, const float *gate, const float *up, int64_t n);
typedef void (*qn_silu_mul_fn)(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_ref(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n);
void qn_silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n);

/* Rows of out[M, N] (stride ldo) = silu(gate[M, N] (stride ldg)) * up[M, N] (stride ldu),
 * rows split over OpenMP threads. */
qn_status qn_silu_mul_rows(float *out, const float *gate, const float *up, int64_t M, int64_t N, int64_t ldo,
                           int64_t ldg, int64_t ldu);

/* y[n] = silu(gate[n]) * up[n] for gate and up in float32 (0), float16 (1) or bfloat16 (2);
 * y float32; the same values as qn_silu_mul on the converted inputs. */
qn_status qn_silu_mul_any(float *QN_RESTRICT y, const void *gate, const void *up, int dtype, int64_t n);

/* Row kernel of gelu_tanh_mul: out[n] float32; gate[n], up[n] in dtype 0 (float32),
 * 1 (float16) or 2 (bfloat16); out may alias gate or up only when dtype is float32. */
typedef void (*qn_gelu_mul_fn)(float *out, const void *gate, const void *up, int dtype, int64_t n);
void qn_gelu_tanh_mul_ref(float *out, const void *gate, const void *up, int dtype, int64_t n);
void qn_gelu_tanh_mul_avx2(float *out, const void *gate, const void *up, int dtype, int64_t n);
void qn_gelu_tanh_mul_avx512(float *out, const void *gate, const void *up, int dtype, int64_t n);

/* y[n] = gelu_tanh(gate[n]) * up[n] through the dispatched row kernel, slices of n split over
 * OpenMP threads (results independent of the thread count). */
qn_status qn_gelu_tanh_mul_any(float *y, const void *gate, const void *up, int dtype, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
