/* act_avx512.c — AVX-512 row kernel of gelu_tanh_mul (see act.h).
 *
 * out[n] = g / (1 + exp(g (K0 + K1 g^2))) * u on 16 lanes; float16 inputs converted by
 * vcvtph2ps, bfloat16 by a 16-bit shift, both exact; the n % 16 tail by masked loads and
 * stores. The exp repeats act.c's steps one for one with separate multiplies and adds (no
 * FMA), so the output equals the _ref kernel's bit for bit. Single-threaded;
 * qn_gelu_tanh_mul_any owns OpenMP.
 */
#include <immintrin.h>

#include "act.h"
#include "act_impl.h"

#define SET1 _mm512_set1_ps

static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(SET1(QN_EXP_LO), x); /* max/min return the second operand for NaN: NaN stays */
    x = _mm512_min_ps(SET1(QN_EXP_HI), x);
    __m512 kf = _mm512_add_ps(_mm512_mul_ps(x, SET1(QN_EXP_LOG2E)), SET1(QN_EXP_ROUND));
    __m512i kb = _mm512_castps_si512(kf);
    kf = _mm512_sub_ps(kf, SET1(QN_EXP_ROUND));
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(kf, SET1(QN_EXP_LN2_HI)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(kf, SET1(QN_EXP_LN2_LO)));
    __m512 p = SET1(QN_EXP_P0);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), SET1(QN_EXP_P1));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), SET1(QN_EXP_P2));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), SET1(QN_EXP_P3));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), SET1(QN_EXP_P4));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), SET1(QN_EXP_P5));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), SET1(1.0f));
    __m512i n = _mm512_sub_epi32(kb, _mm512_set1_epi32(0x4B400000)); /* n in two's complement */
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

static inline __m512 gelu_mul16(__m512 g, __m512 u) {
    __m512 k = _mm512_add_ps(SET1(QN_GELU_K0), _mm512_mul_ps(SET1(QN_GELU_K1), _mm512_mul_ps(g, g)));
    __m512 t = _mm512_mul_ps(g, k);
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(SET1(1.0f), exp16(t))), u);
}

/* lanes of m from p + i (dtype 0 float32, 1 float16, 2 bfloat16); other lanes 0 */
static inline __m512 load16(const void *p, int dtype, int64_t i, __mmask16 m) {
    if (dtype == 0) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
    if (dtype == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

void qn_gelu_tanh_mul_avx512(float *out, const void *gate, const void *up, int dtype, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, gelu_mul16(load16(gate, dtype, i, 0xFFFF), load16(up, dtype, i, 0xFFFF)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m, gelu_mul16(load16(gate, dtype, i, m), load16(up, dtype, i, m)));
    }
}

/* silu(gate) * up: act_impl.h's loop, vectorized for this ISA by the compiler. */
void qn_silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n) {
    silu_mul_body(out, gate, up, n);
}
