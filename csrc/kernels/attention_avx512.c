/* attention_avx512.c — AVX-512 tile kernel for flash attention (see attention.h).
 *
 * Per block of <= QN_ATTN_BK keys of one page: keys and values are converted (f16, bf16,
 * int8 x scale, fp8 e4m3 x scale) into fp32 rows Kf, Vf[BK, Dp]; S[R, BK] = Q Kf^T by 4x4
 * (or 1x16) register blocks of dot products reduced with a transpose tree; softcap, mask,
 * online softmax with a vector exp; O[R, Dp] = alpha * O + P Vf by 4-row x 64-column blocks.
 * Head dims 64, 80, 96, 128, 256 get compile-time-specialized copies; any other D runs the
 * same code with a runtime Dp. Single-threaded: the driver in attention.c owns OpenMP.
 */
#include <immintrin.h>
#include <math.h>

#include "attention.h"

#define BK QN_ATTN_BK
#define BQ QN_ATTN_BQ

/* exp(x) for x <= 88.7: Cody-Waite reduction, degree-6 polynomial, scalef by 2^n;
 * below -87.3 the result flushes toward 0 (callers mask what must be exactly 0). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1), exact limits +-1 for large |x| */
static inline __m512 tanh512(__m512 x) {
    __m512 e = exp512(_mm512_add_ps(x, x));
    return _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
}

/* lane i of the result = sum of the 16 lanes of a[i] */
static inline __m512 reduce16(__m512 a[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

/* One row of 16 elements of key/value j converted to fp32 (masked past D). */
static inline __m512 load_kv16(const void *src, int dt, int64_t i, __mmask16 mk, __m512 sc) {
    switch (dt) {
    case QN_A_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + i));
    case QN_A_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + i)), 16));
    case QN_A_I8:
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, (const int8_t *)src + i))), sc);
    case QN_A_FP8: {
        __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(mk, (const uint8_t *)src + i));
        __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
        return _mm512_mul_ps(_mm512_cvtph_ps(h), sc); /* sc carries the factor 256 */
    }
    default:
        return _mm512_maskz_loadu_ps(mk, (const float *)src + i);
    }
}

/* Rows of a block (n tokens, ld_tok apart) for nh heads (ld_head apart) into
 * dst[nh, BK, Dp] fp32, zero past D; token by token, so the source is read in order.
 * dt is a compile-time constant in each copy (see convert_rows). */
static inline __attribute__((always_inline)) void convert_rows_dt(float *dst, const void *base, const int dt,
                                                                  int64_t off, int64_t ld_tok, int n, int nh,
                                                                  int64_t ld_head, int64_t D, int64_t Dp,
                                                                  const float *scales) {
    const int es = dt == QN_A_F32 ? 4 : (dt == QN_A_F16 || dt == QN_A_BF16) ? 2 : 1;
    const int64_t D16 = D & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (D - D16)) - 1);
    for (int i = 0; i < n; i++)
        for (int hh = 0; hh < nh; hh++) {
            const char *src = (const char *)base + (off + i * ld_tok + hh * ld_head) * es;
            float s = scales ? scales[hh] : 1.0f;
            __m512 sc = _mm512_set1_ps(dt == QN_A_FP8 ? s * 256.0f : s);
            float *drow = dst + ((int64_t)hh * BK + i) * Dp;
            int64_t d = 0;
            for (; d < D16; d += 16) _mm512_store_ps(drow + d, load_kv16(src, dt, d, (__mmask16)0xFFFF, sc));
            if (d < Dp) { /* the D tail, zero-padded */
                _mm512_store_ps(drow + d, load_kv16(src, dt, d, tail, sc));
                for (d += 16; d < Dp; d += 16) _mm512_store_ps(drow + d, _mm512_setzero_ps());
            }
        }
}

static inline void convert_rows(float *dst, const void *base, int dt, int64_t off, int64_t ld_tok, int n, int nh,
                                int64_t ld_head, int64_t D, int64_t Dp, const float *scales) {
    switch (dt) {
    case QN_A_F16: convert_rows_dt(dst, base, QN_A_F16, off, ld_tok, n, nh, ld_head, D, Dp, scales); break;
    case QN_A_BF16: convert_rows_dt(dst, base, QN_A_BF16, off, ld_tok, n, nh, ld_head, D, Dp, scales); break;
    case QN_A_I8: convert_rows_dt(dst, base, QN_A_I8, off, ld_tok, n, nh, ld_head, D, Dp, scales); break;
    case QN_A_FP8: convert_rows_dt(dst, base, QN_A_FP8, off, ld_tok, n, nh, ld_head, D, Dp, scales); break;
    default: convert_rows_dt(dst, base, QN_A_F32, off, ld_tok, n, nh, ld_head, D, Dp, scales); break;
    }
}

/* S[r, i] = q_r . k_i for rows r < R (rounded up to 4) and keys i < n (rounded up) */
static inline void qk(float *S, const float *q, const float *Kf, int R, int n, const int64_t Dp) {
    if (R < 4) {
        for (int r = 0; r < R; r++)
            for (int i0 = 0; i0 < n; i0 += 16) {
                __m512 a[16];
                for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
                for (int64_t d = 0; d < Dp; d += 16) {
                    __m512 qv = _mm512_load_ps(q + r * Dp + d);
                    for (int k = 0; k < 16; k++) a[k] = _mm512_fmadd_ps(qv, _mm512_load_ps(Kf + (i0 + k) * Dp + d), a[k]);
                }
                _mm512_store_ps(S + r * BK + i0, reduce16(a));
            }
        return;
    }
    for (int r0 = 0; r0 < R; r0 += 4)
        for (int i0 = 0; i0 < n; i0 += 4) {
            __m512 a[16];
            for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
            for (int64_t d = 0; d < Dp; d += 16) {
                __m512 k0 = _mm512_load_ps(Kf + (i0 + 0) * Dp + d), k1 = _mm512_load_ps(Kf + (i0 + 1) * Dp + d);
                __m512 k2 = _mm512_load_ps(Kf + (i0 + 2) * Dp + d), k3 = _mm512_load_ps(Kf + (i0 + 3) * Dp + d);
                for (int rr = 0; rr < 4; rr++) {
                    __m512 qv = _mm512_load_ps(q + (r0 + rr) * Dp + d);
                    a[rr * 4 + 0] = _mm512_fmadd_ps(qv, k0, a[rr * 4 + 0]);
                    a[rr * 4 + 1] = _mm512_fmadd_ps(qv, k1, a[rr * 4 + 1]);
                    a[rr * 4 + 2] = _mm512_fmadd_ps(qv, k2, a[rr * 4 + 2]);
                    a[rr * 4 + 3] = _mm512_fmadd_ps(qv, k3, a[rr * 4 + 3]);
                }
            }
            __m512 s = reduce16(a); /* lane rr * 4 + c = S[r0 + rr, i0 + c] */
            _mm_storeu_ps(S + (r0 + 0) * BK + i0, _mm512_castps512_ps128(s));
            _mm_storeu_ps(S + (r0 + 1) * BK + i0, _mm512_extractf32x4_ps(s, 1));
            _mm_storeu_ps(S + (r0 + 2) * BK + i0, _mm512_extractf32x4_ps(s, 2));
            _mm_storeu_ps(S + (r0 + 3) * BK + i0, _mm512_extractf32x4_ps(s, 3));
        }
}

/* O[r] = alpha[r] * O[r] + sum_i P[r, i] Vf[i] for a block of RB rows x DV vectors of 16 */
static inline __attribute__((always_inline)) void pv_block(float *o, const float *P, const float *Vf,
                                                           const float *alpha, int n, const int64_t Dp,
                                                           int64_t d0, const int RB, const int DV) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < DV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        __m512 v[4];
        for (int c = 0; c < DV; c++) v[c] = _mm512_load_ps(Vf + i * Dp + d0 + 16 * c);
        for (int r = 0; r < RB; r++) {
            __m512 p = _mm512_set1_ps(P[r * BK + i]);
            for (int c = 0; c < DV; c++) acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RB; r++) {
        __m512 al = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < DV; c++) {
            float *dst = o + r * Dp + d0 + 16 * c;
            _mm512_store_ps(dst, _mm512_fmadd_ps(_mm512_load_ps(dst), al, acc[r][c]));
        }
    }
}

static inline __attribute__((always_inline)) void pv(float *o, const float *P, const float *Vf, const float *alpha,
                                                     int R, int n, const int64_t Dp) {
    int r = 0;
    for (; r + 4 <= R; r += 4) {
        int64_t d = 0;
        for (; d + 64 <= Dp; d += 64) pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 4, 4);
        switch ((Dp - d) / 16) {
        case 3: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 4, 3); break;
        case 2: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 4, 2); break;
        case 1: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 4, 1); break;
        default: break;
        }
    }
    for (; r < R; r++) {
        int64_t d = 0;
        for (; d + 64 <= Dp; d += 64) pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 1, 4);
        switch ((Dp - d) / 16) {
        case 3: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 1, 3); break;
        case 2: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 1, 2); break;
        case 1: pv_block(o + r * Dp, P + r * BK, Vf, alpha + r, n, Dp, d, 1, 1); break;
        default: break;
        }
    }
}

/* Softcap, mask and online-softmax step for the R rows of one head over keys jb .. jb + n:
 * S[r] becomes P[r] (zero where masked), m, l are updated and alpha[r] is the factor
 * that rescales the row's earlier output. */
static inline void softmax_rows(float *S, float *alpha, float *m, float *l, const int64_t *lo, const int64_t *hi,
                                int R, int n, int64_t jb, int64_t je, float cap) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float icap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (int r = 0; r < R; r++) {
        float *Sr = S + r * BK;
        /* visible lanes: lo <= jb + i < hi and i < n, in block-relative int32 */
        int32_t a = (int32_t)qn_max64(qn_min64(lo[r] - jb, BK + 1), -1);
        int32_t b = (int32_t)qn_max64(qn_min64(qn_min64(hi[r], je) - jb, BK + 1), -1);
        __mmask16 mk[BK / 16];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < (n + 15) / 16; c++) {
            __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * c));
            mk[c] = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(a)) & _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(b));
            __m512 s = _mm512_load_ps(Sr + 16 * c);
            if (cap > 0.0f) {
                s = _mm512_mul_ps(_mm512_set1_ps(cap), tanh512(_mm512_mul_ps(s, _mm512_set1_ps(icap))));
                _mm512_store_ps(Sr + 16 * c, s);
            }
            mx = _mm512_mask_max_ps(mx, mk[c], mx, s);
        }
        float bmax = _mm512_reduce_max_ps(mx), mnew = fmaxf(m[r], bmax);
        if (mnew == -INFINITY) { /* nothing visible yet: keep O, zero P */
            alpha[r] = 1.0f;
            for (int c = 0; c < (n + 15) / 16; c++) _mm512_store_ps(Sr + 16 * c, _mm512_setzero_ps());
            continue;
        }
        alpha[r] = expf(m[r] - mnew);
        __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mnew);
        for (int c = 0; c < (n + 15) / 16; c++) {
            __m512 pv = _mm512_maskz_mov_ps(mk[c], exp512(_mm512_sub_ps(_mm512_load_ps(Sr + 16 * c), mv)));
            _mm512_store_ps(Sr + 16 * c, pv);
            sum = _mm512_add_ps(sum, pv);
        }
        l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        m[r] = mnew;
    }
}

static inline __attribute__((always_inline)) void tile_body(const qn_attn_tile *t, const int64_t Dp) {
    float *Kf = t->scratch, *Vf = Kf + t->nh * BK * Dp, *S = Vf + t->nh * BK * Dp, *alpha = S + BQ * BK;
    const int R = t->R;
    for (int r = 0; r < t->nh * R; r++) {
        t->m[r] = -INFINITY;
        t->l[r] = 0.0f;
        for (int64_t d = 0; d < Dp; d += 16) _mm512_store_ps(t->o + r * Dp + d, _mm512_setzero_ps());
    }
    const float cap = t->softcap;
    for (int64_t jb = t->j0, je; jb < t->j1; jb = je) {
        int64_t pg = t->table ? jb / t->bs : 0, row = t->table ? jb % t->bs : jb;
        je = qn_min64(t->j1, jb + BK);
        if (t->table) je = qn_min64(je, (pg + 1) * t->bs);
        const int n = (int)(je - jb);
        const int64_t page = t->table ? t->table[pg] : 0;
        int any = 0;
        for (int r = 0; r < t->nh * R && !any; r++) any = qn_max64(t->lo[r], jb) < qn_min64(t->hi[r], je);
        if (!any) continue;
        qn_attn_prefetch_next(t, je);
        const int64_t off = page * t->ld_page + row * t->ld_tok;
        convert_rows(Kf, t->k, t->kvdtype, off, t->ld_tok, n, t->nh, t->ld_head, t->D, Dp,
                     t->kscale ? t->kscale + page * t->ld_scale : NULL);
        convert_rows(Vf, t->v, t->kvdtype, off, t->ld_tok, n, t->nh, t->ld_head, t->D, Dp,
                     t->vscale ? t->vscale + page * t->ld_scale : NULL);
        for (int hh = 0; hh < t->nh; hh++) {
            const int64_t *lo = t->lo + hh * R, *hi = t->hi + hh * R;
            float *m = t->m + hh * R, *l = t->l + hh * R;
            any = 0;
            for (int r = 0; r < R && !any; r++) any = qn_max64(lo[r], jb) < qn_min64(hi[r], je);
            if (!any) continue;
            qk(S, t->q + hh * R * Dp, Kf + hh * BK * Dp, R, n, Dp);
            softmax_rows(S, alpha, m, l, lo, hi, R, n, jb, je, cap);
            pv(t->o + hh * R * Dp, S, Vf + hh * BK * Dp, alpha, R, n, Dp);
        }
    }
}

void qn_attn_tile_avx512(const qn_attn_tile *t) {
    switch (t->Dp) {
    case 64: tile_body(t, 64); break;
    case 80: tile_body(t, 80); break;
    case 96: tile_body(t, 96); break;
    case 128: tile_body(t, 128); break;
    case 256: tile_body(t, 256); break;
    default: tile_body(t, t->Dp); break;
    }
}
