/* act_avx2.c — AVX2 row kernel of gelu_tanh_mul (see act.h).
 *
 * out[n] = g / (1 + exp(g (K0 + K1 g^2))) * u on 8 lanes; float16 inputs converted by F16C,
 * bfloat16 by a 16-bit shift, both exact. The exp repeats act.c's steps one for one with
 * separate multiplies and adds (no FMA), so the output equals the _ref kernel's bit for bit.
 * The n % 8 tail goes through the same vector code on a zero-padded copy. Single-threaded;
 * qn_gelu_tanh_mul_any owns OpenMP.
 */
#include <immintrin.h>

#include "act.h"
#include "act_impl.h"

#define SET1 _mm256_set1_ps

static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(SET1(QN_EXP_LO), x); /* max/min return the second operand for NaN: NaN stays */
    x = _mm256_min_ps(SET1(QN_EXP_HI), x);
    __m256 kf = _mm256_add_ps(_mm256_mul_ps(x, SET1(QN_EXP_LOG2E)), SET1(QN_EXP_ROUND));
    __m256i kb = _mm256_castps_si256(kf);
    kf = _mm256_sub_ps(kf, SET1(QN_EXP_ROUND));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(kf, SET1(QN_EXP_LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(kf, SET1(QN_EXP_LN2_LO)));
    __m256 p = SET1(QN_EXP_P0);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), SET1(QN_EXP_P1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), SET1(QN_EXP_P2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), SET1(QN_EXP_P3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), SET1(QN_EXP_P4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), SET1(QN_EXP_P5));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), SET1(1.0f));
    __m256i n = _mm256_sub_epi32(kb, _mm256_set1_epi32(0x4B400000)); /* n in two's complement */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 gelu_mul8(__m256 g, __m256 u) {
    __m256 k = _mm256_add_ps(SET1(QN_GELU_K0), _mm256_mul_ps(SET1(QN_GELU_K1), _mm256_mul_ps(g, g)));
    __m256 t = _mm256_mul_ps(g, k);
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(SET1(1.0f), exp8(t))), u);
}

static inline __m256 load8(const void *p, int dtype, int64_t i) {
    if (dtype == 0) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *p, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dtype == 1 ? qn_f16_to_f32(h) : qn_bf16_to_f32(h);
}

void qn_gelu_tanh_mul_avx2(float *out, const void *gate, const void *up, int dtype, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, gelu_mul8(load8(gate, dtype, i), load8(up, dtype, i)));
    if (i < n) {
        float g[8] = {0}, u[8] = {0}, y[8];
        for (int64_t j = 0; j < n - i; j++) {
            g[j] = load1(gate, dtype, i + j);
            u[j] = load1(up, dtype, i + j);
        }
        _mm256_storeu_ps(y, gelu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
        for (int64_t j = 0; j < n - i; j++) out[i + j] = y[j];
    }
}

/* silu(gate) * up: act_impl.h's loop, vectorized for this ISA by the compiler. */
void qn_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    silu_mul_body(out, gate, up, n);
}
