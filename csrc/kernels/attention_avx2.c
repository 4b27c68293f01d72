/* attention_avx2.c — AVX2 + FMA + F16C tile kernel for flash attention (see attention.h).
 *
 * Same steps as attention_avx512.c on 8-lane vectors: keys/values of a block converted to
 * fp32 rows Kf, Vf[BK, Dp] (the D tail scalar), S[R, BK] = Q Kf^T by 2x4 (or 1x8) blocks
 * reduced with an hadd tree, softcap, mask and online softmax with a vector exp, then
 * O[R, Dp] = alpha * O + P Vf by 4-row x 16-column blocks. Single-threaded; the driver in
 * attention.c owns OpenMP.
 */
#include <immintrin.h>
#include <math.h>

#include "attention.h"

#define BK QN_ATTN_BK
#define BQ QN_ATTN_BQ

/* exp(x), x clamped to [-87.3, 88.3]: Cody-Waite reduction, degree-6 polynomial, 2^n by
 * exponent bits. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 tanh256(__m256 x) {
    __m256 e = exp256(_mm256_add_ps(x, x));
    return _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

/* lane i of the result = sum of the 8 lanes of a[i] */
static inline __m256 reduce8(const __m256 a[8]) {
    __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

static inline float load_scalar(const void *src, int dt, int64_t i) {
    switch (dt) {
    case QN_A_F16: return qn_f16_to_f32(((const uint16_t *)src)[i]);
    case QN_A_BF16: return qn_bf16_to_f32(((const uint16_t *)src)[i]);
    case QN_A_I8: return (float)((const int8_t *)src)[i];
    case QN_A_FP8: return qn_attn_fp8_to_f32(((const uint8_t *)src)[i]) * (1.0f / 256.0f);
    default: return ((const float *)src)[i];
    }
}

static inline __m256 load_kv8(const void *src, int dt, int64_t i, __m256 sc) {
    switch (dt) {
    case QN_A_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
    case QN_A_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))), 16));
    case QN_A_I8:
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)src + i)))), sc);
    case QN_A_FP8: {
        __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)((const uint8_t *)src + i)));
        __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
        return _mm256_mul_ps(_mm256_cvtph_ps(h), sc);
    }
    default: return _mm256_loadu_ps((const float *)src + i);
    }
}

/* Rows of a block (n tokens, ld_tok apart) for nh heads (ld_head apart) into
 * dst[nh, BK, Dp] fp32, zero past D; token by token, so the source is read in order. */
static inline void convert_rows(float *dst, const void *base, int dt, int64_t off, int64_t ld_tok, int n, int nh,
                                int64_t ld_head, int64_t D, const int64_t Dp, const float *scales) {
    int es = dt == QN_A_F32 ? 4 : (dt == QN_A_F16 || dt == QN_A_BF16) ? 2 : 1;
    int64_t D8 = D & ~(int64_t)7;
    for (int i = 0; i < n; i++)
        for (int hh = 0; hh < nh; hh++) {
            const char *src = (const char *)base + (off + i * ld_tok + hh * ld_head) * es;
            float s0 = scales ? scales[hh] : 1.0f;
            float s = dt == QN_A_FP8 ? s0 * 256.0f : s0; /* fp8 decodes to value / 256 */
            __m256 sc = _mm256_set1_ps(s);
            float *drow = dst + ((int64_t)hh * BK + i) * Dp;
            int64_t d = 0;
            for (; d < D8; d += 8) _mm256_store_ps(drow + d, load_kv8(src, dt, d, sc));
            for (; d < D; d++) drow[d] = dt >= QN_A_I8 ? load_scalar(src, dt, d) * s : load_scalar(src, dt, d);
            for (; d < Dp; d++) drow[d] = 0.0f;
        }
}

static inline void qk(float *S, const float *q, const float *Kf, int R, int n, const int64_t Dp) {
    if (R < 2) {
        for (int i0 = 0; i0 < n; i0 += 8) {
            __m256 a[8];
            for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
            for (int64_t d = 0; d < Dp; d += 8) {
                __m256 qv = _mm256_load_ps(q + d);
                for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(qv, _mm256_load_ps(Kf + (i0 + k) * Dp + d), a[k]);
            }
            _mm256_store_ps(S + i0, reduce8(a));
        }
        return;
    }
    for (int r0 = 0; r0 < R; r0 += 2)
        for (int i0 = 0; i0 < n; i0 += 4) {
            __m256 a[8];
            for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
            for (int64_t d = 0; d < Dp; d += 8) {
                __m256 k0 = _mm256_load_ps(Kf + (i0 + 0) * Dp + d), k1 = _mm256_load_ps(Kf + (i0 + 1) * Dp + d);
                __m256 k2 = _mm256_load_ps(Kf + (i0 + 2) * Dp + d), k3 = _mm256_load_ps(Kf + (i0 + 3) * Dp + d);
                __m256 q0 = _mm256_load_ps(q + r0 * Dp + d), q1 = _mm256_load_ps(q + (r0 + 1) * Dp + d);
                a[0] = _mm256_fmadd_ps(q0, k0, a[0]); a[1] = _mm256_fmadd_ps(q0, k1, a[1]);
                a[2] = _mm256_fmadd_ps(q0, k2, a[2]); a[3] = _mm256_fmadd_ps(q0, k3, a[3]);
                a[4] = _mm256_fmadd_ps(q1, k0, a[4]); a[5] = _mm256_fmadd_ps(q1, k1, a[5]);
                a[6] = _mm256_fmadd_ps(q1, k2, a[6]); a[7] = _mm256_fmadd_ps(q1, k3, a[7]);
            }
            __m256 s = reduce8(a);
            _mm_storeu_ps(S + r0 * BK + i0, _mm256_castps256_ps128(s));
            _mm_storeu_ps(S + (r0 + 1) * BK + i0, _mm256_extractf128_ps(s, 1));
        }
}

static inline __attribute__((always_inline)) void pv_block(float *o, const float *P, const float *Vf,
                                                           const float *alpha, int n, const int64_t Dp,
                                                           int64_t d0, const int RB) {
    __m256 acc[4][2];
    for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        __m256 v0 = _mm256_load_ps(Vf + i * Dp + d0), v1 = _mm256_load_ps(Vf + i * Dp + d0 + 8);
        for (int r = 0; r < RB; r++) {
            __m256 p = _mm256_broadcast_ss(P + r * BK + i);
            acc[r][0] = _mm256_fmadd_ps(p, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        __m256 al = _mm256_set1_ps(alpha[r]);
        float *dst = o + r * Dp + d0;
        _mm256_store_ps(dst, _mm256_fmadd_ps(_mm256_load_ps(dst), al, acc[r][0]));
        _mm256_store_ps(dst + 8, _mm256_fmadd_ps(_mm256_load_ps(dst + 8), al, acc[r][1]));
    }
}

/* Softcap, mask and online-softmax step for the R rows of one head over keys jb .. jb + n:
 * S[r] becomes P[r] (zero where masked), m, l are updated and alpha[r] is the factor
 * that rescales the row's earlier output. */
static inline void softmax_rows(float *S, float *alpha, float *m, float *l, const int64_t *lo, const int64_t *hi,
                                int R, int n, int64_t jb, int64_t je, float cap) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const float icap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (int r = 0; r < R; r++) {
        float *Sr = S + r * BK;
        int32_t a = (int32_t)qn_max64(qn_min64(lo[r] - jb, BK + 1), -1);
        int32_t b = (int32_t)qn_max64(qn_min64(qn_min64(hi[r], je) - jb, BK + 1), -1);
        __m256 mk[BK / 8];
        __m256 mx = _mm256_set1_ps(-INFINITY), ninf = mx;
        const int nc = (n + 7) / 8;
        for (int c = 0; c < nc; c++) {
            __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * c));
            __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(a), idx),
                                             _mm256_cmpgt_epi32(_mm256_set1_epi32(b), idx));
            mk[c] = _mm256_castsi256_ps(in);
            __m256 s = _mm256_load_ps(Sr + 8 * c);
            if (cap > 0.0f) {
                s = _mm256_mul_ps(_mm256_set1_ps(cap), tanh256(_mm256_mul_ps(s, _mm256_set1_ps(icap))));
                _mm256_store_ps(Sr + 8 * c, s);
            }
            mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, s, mk[c]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        float bmax = _mm_cvtss_f32(m4), mnew = fmaxf(m[r], bmax);
        if (mnew == -INFINITY) {
            alpha[r] = 1.0f;
            for (int c = 0; c < nc; c++) _mm256_store_ps(Sr + 8 * c, _mm256_setzero_ps());
            continue;
        }
        alpha[r] = expf(m[r] - mnew);
        __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(mnew);
        for (int c = 0; c < nc; c++) {
            __m256 p = _mm256_and_ps(mk[c], exp256(_mm256_sub_ps(_mm256_load_ps(Sr + 8 * c), mv)));
            _mm256_store_ps(Sr + 8 * c, p);
            sum = _mm256_add_ps(sum, p);
        }
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
        l[r] = l[r] * alpha[r] + _mm_cvtss_f32(s4);
        m[r] = mnew;
    }
}

static inline __attribute__((always_inline)) void tile_body(const qn_attn_tile *t, const int64_t Dp) {
    float *Kf = t->scratch, *Vf = Kf + t->nh * BK * Dp, *S = Vf + t->nh * BK * Dp, *alpha = S + BQ * BK;
    const int R = t->R;
    for (int r = 0; r < t->nh * R; r++) {
        t->m[r] = -INFINITY;
        t->l[r] = 0.0f;
        for (int64_t d = 0; d < Dp; d += 8) _mm256_store_ps(t->o + r * Dp + d, _mm256_setzero_ps());
    }
    const float cap = t->softcap;
    for (int64_t jb = t->j0, je; jb < t->j1; jb = je) {
        int64_t page, off;
        if (!qn_attn_block(t, jb, &je, &page, &off)) continue;
        const int n = (int)(je - jb);
        qn_attn_prefetch_next(t, je);
        convert_rows(Kf, t->k, t->kvdtype, off, t->ld_tok, n, t->nh, t->ld_head, t->D, Dp,
                     t->kscale ? t->kscale + page * t->ld_scale : NULL);
        convert_rows(Vf, t->v, t->kvdtype, off, t->ld_tok, n, t->nh, t->ld_head, t->D, Dp,
                     t->vscale ? t->vscale + page * t->ld_scale : NULL);
        for (int hh = 0; hh < t->nh; hh++) {
            const int64_t *lo = t->lo + hh * R, *hi = t->hi + hh * R;
            float *m = t->m + hh * R, *l = t->l + hh * R;
            if (!qn_attn_rows_see(lo, hi, R, jb, je)) continue;
            qk(S, t->q + hh * R * Dp, Kf + hh * BK * Dp, R, n, Dp);
            softmax_rows(S, alpha, m, l, lo, hi, R, n, jb, je, cap);
            float *o = t->o + hh * R * Dp;
            const float *Vh = Vf + hh * BK * Dp;
            int r = 0;
            for (; r + 4 <= R; r += 4)
                for (int64_t d = 0; d < Dp; d += 16) pv_block(o + r * Dp, S + r * BK, Vh, alpha + r, n, Dp, d, 4);
            for (; r < R; r++)
                for (int64_t d = 0; d < Dp; d += 16) pv_block(o + r * Dp, S + r * BK, Vh, alpha + r, n, Dp, d, 1);
        }
    }
}

void qn_attn_tile_avx2(const qn_attn_tile *t) {
    switch (t->Dp) {
    case 64: tile_body(t, 64); break;
    case 80: tile_body(t, 80); break;
    case 96: tile_body(t, 96); break;
    case 128: tile_body(t, 128); break;
    case 256: tile_body(t, 256); break;
    default: tile_body(t, t->Dp); break;
    }
}
