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
#include <string.h>

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

/* Elements i .. i+15 of a key/value row as fp32, zero where mk is clear, unscaled: int8
 * codes as integers, fp8 e4m3 codes as value / 256 (their scale carries the 256). */
static inline __attribute__((always_inline)) __m512 load_raw16(const void *src, int dt, int64_t i, __mmask16 mk) {
    switch (dt) {
    case QN_A_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + i));
    case QN_A_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + i)), 16));
    case QN_A_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, (const int8_t *)src + i)));
    case QN_A_FP8: {
        __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(mk, (const uint8_t *)src + i));
        __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
        return _mm512_cvtph_ps(h);
    }
    default:
        return _mm512_maskz_loadu_ps(mk, (const float *)src + i);
    }
}

/* One row of 16 elements of key/value j converted to fp32 (masked past D); sc: the row's
 * scale for int8 / fp8 (fp8's times 256). */
static inline __m512 load_kv16(const void *src, int dt, int64_t i, __mmask16 mk, __m512 sc) {
    __m512 x = load_raw16(src, dt, i, mk);
    return dt == QN_A_I8 || dt == QN_A_FP8 ? _mm512_mul_ps(x, sc) : x;
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

/* ---- decode: keys and values dotted straight from the cache ----
 * A decode tile has a few query rows per KV head, so each key and value is used by few
 * rows: converting blocks to fp32 rows first (tile_body) costs more than the math. Here each
 * 16-element piece is loaded and converted in registers right where it is used, and the
 * per-(page, head) scales of int8 / fp8 are applied to the block's scores and to its PV sum
 * instead of to every element. Same contract and results (up to rounding) as tile_body. */

static inline __mmask16 dmask(int64_t d, int64_t D) {
    int64_t r = D - d;
    return r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1);
}

/* Rows of the next block to prefetch while this one is computed: n rows from base, ldb
 * apart (the block's own row stride), `bytes` each. Spread over the loops below so the
 * memory requests overlap the math instead of arriving in one burst. */
typedef struct qn_pf {
    const char *base;
    int n;
    int64_t bytes;
} qn_pf;

static inline void pf_bytes(const char *p, int64_t from, int64_t to) {
    for (int64_t b = from; b < to; b += 64) qn_attn_prefetch(p + b);
}

/* S[r0 + rr, i0 + c] = ks * q_rr . k_(i0 + c) for an RB x KB block (RB * KB = 16); key i is
 * the row at kb + min(i, n - 1) * ldb bytes, so nothing past the block is read. */
static inline __attribute__((always_inline)) void qk_direct_block(float *S, const float *q, const char *kb,
                                                                  int64_t ldb, const int dt, int i0, int n, float ks,
                                                                  const int64_t Dp, const int64_t D, const int full,
                                                                  const int RB, const int KB, const qn_pf *pf) {
    const char *kr[16];
    for (int c = 0; c < KB; c++) kr[c] = kb + (int64_t)(i0 + c < n ? i0 + c : n - 1) * ldb;
    if (pf)
        for (int c = 0; c < KB && i0 + c < pf->n; c++) pf_bytes(pf->base + (int64_t)(i0 + c) * ldb, 0, pf->bytes);
    __m512 a[16];
    for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dp; d += 16) {
        const __mmask16 mk = full ? (__mmask16)0xFFFF : dmask(d, D);
        __m512 kv[16];
        for (int c = 0; c < KB; c++) kv[c] = load_raw16(kr[c], dt, d, mk);
        for (int rr = 0; rr < RB; rr++) {
            __m512 qv = _mm512_load_ps(q + rr * Dp + d);
            for (int c = 0; c < KB; c++) a[rr * KB + c] = _mm512_fmadd_ps(qv, kv[c], a[rr * KB + c]);
        }
    }
    __m512 s = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(ks)); /* lane rr * KB + c */
    if (RB == 4) {
        _mm_storeu_ps(S + 0 * BK + i0, _mm512_castps512_ps128(s));
        _mm_storeu_ps(S + 1 * BK + i0, _mm512_extractf32x4_ps(s, 1));
        _mm_storeu_ps(S + 2 * BK + i0, _mm512_extractf32x4_ps(s, 2));
        _mm_storeu_ps(S + 3 * BK + i0, _mm512_extractf32x4_ps(s, 3));
    } else {
        float tmp[16];
        _mm512_storeu_ps(tmp, s);
        for (int rr = 0; rr < RB; rr++)
            for (int c = 0; c < KB; c++) S[rr * BK + i0 + c] = tmp[rr * KB + c];
    }
}

/* S[r, i] for rows r < R (rounded up: q has room) and keys i < n (rounded up to the block) */
static inline __attribute__((always_inline)) void qk_direct(float *S, const float *q, const char *kb, int64_t ldb,
                                                            const int dt, int R, int n, float ks, const int64_t Dp,
                                                            const int64_t D, const int full, const qn_pf *pf) {
    if (R < 4) {
        for (int r = 0; r < R; r++)
            for (int i0 = 0; i0 < n; i0 += 16)
                qk_direct_block(S + r * BK, q + r * Dp, kb, ldb, dt, i0, n, ks, Dp, D, full, 1, 16, r ? NULL : pf);
        return;
    }
    for (int r0 = 0; r0 < R;) {
        if (R - r0 > 4) { /* 8 rows x 2 keys: each key converted once per 8 rows */
            for (int i0 = 0; i0 < n; i0 += 2)
                qk_direct_block(S + r0 * BK, q + r0 * Dp, kb, ldb, dt, i0, n, ks, Dp, D, full, 8, 2, r0 ? NULL : pf);
            r0 += 8;
        } else {
            for (int i0 = 0; i0 < n; i0 += 4)
                qk_direct_block(S + r0 * BK, q + r0 * Dp, kb, ldb, dt, i0, n, ks, Dp, D, full, 4, 4, r0 ? NULL : pf);
            r0 += 4;
        }
    }
    if (pf) /* rows past this block's n */
        for (int i = n; i < pf->n; i++) pf_bytes(pf->base + (int64_t)i * ldb, 0, pf->bytes);
}

/* O[r] = alpha[r] * O[r] + vs * sum_i P[r, i] v_i for RB rows x DV vectors of 16 at column d0,
 * value i the row at vb + i * ldb bytes */
static inline __attribute__((always_inline)) void pv_direct_block(float *o, const float *P, const char *vb,
                                                                  int64_t ldb, const int dt, const float *alpha,
                                                                  float vs, int n, const int64_t Dp, int64_t d0,
                                                                  const int64_t D, const int full, const int RB,
                                                                  const int DV, const qn_pf *pf) {
    __m512 acc[4][4];
    const int es = dt == QN_A_F32 ? 4 : (dt == QN_A_F16 || dt == QN_A_BF16) ? 2 : 1;
    const int64_t pf0 = d0 * es, pf1 = pf ? qn_min64(pf->bytes, (d0 + 16 * DV) * es) : 0;
    __mmask16 mk[4];
    for (int c = 0; c < DV; c++) mk[c] = full ? (__mmask16)0xFFFF : dmask(d0 + 16 * c, D);
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < DV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const char *vr = vb + (int64_t)i * ldb;
        if (pf && i < pf->n) pf_bytes(pf->base + (int64_t)i * ldb, pf0, pf1);
        __m512 v[4];
        for (int c = 0; c < DV; c++) v[c] = load_raw16(vr, dt, d0 + 16 * c, mk[c]);
        for (int r = 0; r < RB; r++) {
            __m512 p = _mm512_set1_ps(P[r * BK + i]);
            for (int c = 0; c < DV; c++) acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
        }
    }
    const __m512 vsv = _mm512_set1_ps(vs);
    for (int r = 0; r < RB; r++) {
        __m512 al = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < DV; c++) {
            float *dst = o + r * Dp + d0 + 16 * c;
            _mm512_store_ps(dst, _mm512_fmadd_ps(acc[r][c], vsv, _mm512_mul_ps(_mm512_load_ps(dst), al)));
        }
    }
}

static inline __attribute__((always_inline)) void pv_direct_rows(float *o, const float *P, const char *vb, int64_t ldb,
                                                                 const int dt, const float *alpha, float vs, int n,
                                                                 const int64_t Dp, const int64_t D, const int full,
                                                                 const int RB, const qn_pf *pf) {
    int64_t d = 0;
    for (; d + 64 <= Dp; d += 64) pv_direct_block(o, P, vb, ldb, dt, alpha, vs, n, Dp, d, D, full, RB, 4, pf);
    switch ((Dp - d) / 16) {
    case 3: pv_direct_block(o, P, vb, ldb, dt, alpha, vs, n, Dp, d, D, full, RB, 3, pf); break;
    case 2: pv_direct_block(o, P, vb, ldb, dt, alpha, vs, n, Dp, d, D, full, RB, 2, pf); break;
    case 1: pv_direct_block(o, P, vb, ldb, dt, alpha, vs, n, Dp, d, D, full, RB, 1, pf); break;
    default: break;
    }
    if (pf)
        for (int i = n; i < pf->n; i++) pf_bytes(pf->base + (int64_t)i * ldb, 0, pf->bytes);
}

static inline __attribute__((always_inline)) void pv_direct(float *o, const float *P, const char *vb, int64_t ldb,
                                                            const int dt, const float *alpha, float vs, int R, int n,
                                                            const int64_t Dp, const int64_t D, const int full,
                                                            const qn_pf *pf) {
    int r = 0;
    for (; r + 4 <= R; r += 4)
        pv_direct_rows(o + r * Dp, P + r * BK, vb, ldb, dt, alpha + r, vs, n, Dp, D, full, 4, r ? NULL : pf);
    for (; r < R; r++) pv_direct_rows(o + r * Dp, P + r * BK, vb, ldb, dt, alpha + r, vs, n, Dp, D, full, 1, r ? NULL : pf);
}

/* ---- int8 caches: q . k in integers (AVX512-VNNI vpdpwssd, 32 multiply-adds each) ----
 * Each q row becomes int16 with its own scale (|q16| <= qmax, so a row's products with keys
 * of |k| <= 128 sum exactly in int32); key bytes are sign-extended to int16 in registers.
 * Rounding q to 16 bits moves a score by about 1e-5 of |q| |k|: a relative error of each p,
 * never lost probability mass. PV stays in fp32 (pv_direct): P rounded to 16 bits would
 * lose the mass of long tails of small p next to one large one. */

static inline __mmask32 dmask32(int64_t d, int64_t D) {
    int64_t r = D - d;
    return r >= 32 ? (__mmask32)0xFFFFFFFFu : r <= 0 ? (__mmask32)0 : (__mmask32)((1u << r) - 1);
}

/* q rows [rows, Dp] fp32 (zero past D) into int16 rows [rows, Dq] (Dq = Dp rounded to 32,
 * zero past D) and per-row scales qsc (q ~= qsc * q16). */
static void quantize_q16(int16_t *q16, float *qsc, const float *q, int rows, int64_t Dp, int64_t Dq) {
    const float qmax = (float)qn_min64(32767, (int64_t)(2147483647.0 / (128.0 * (double)Dq)));
    for (int r = 0; r < rows; r++) {
        __m512 mx = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dp; d += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_load_ps(q + r * Dp + d)));
        float amax = _mm512_reduce_max_ps(mx);
        float sc = amax > 0.0f ? amax / qmax : 1.0f, inv = amax > 0.0f ? qmax / amax : 0.0f;
        qsc[r] = sc;
        for (int64_t d = 0; d < Dq; d += 16) {
            __m512 x = d < Dp ? _mm512_load_ps(q + r * Dp + d) : _mm512_setzero_ps();
            __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(inv)));
            _mm256_store_si256((__m256i *)(q16 + r * Dq + d), _mm512_cvtsepi32_epi16(xi));
        }
    }
}

/* int32 version of reduce16: lane i = sum of the 16 lanes of a[i] (exact) */
static inline __m512i reduce16i(__m512i a[16]) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    __m512i w01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x44), _mm512_shuffle_i32x4(u[0], u[1], 0xEE));
    __m512i w23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x44), _mm512_shuffle_i32x4(u[2], u[3], 0xEE));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w01, w23, 0x88), _mm512_shuffle_i32x4(w01, w23, 0xDD));
}

/* S[rr, i0 + c] = ks * qsc[rr] * q16_rr . k_(i0 + c) for an RB x KB block (RB * KB = 16) */
static inline __attribute__((always_inline)) void qk_i8_block(float *S, const int16_t *q16, const float *qsc,
                                                              const char *kb, int64_t ldb, int i0, int n, float ks,
                                                              const int64_t Dq, const int64_t D, const int full,
                                                              const int RB, const int KB, const qn_pf *pf) {
    const int8_t *kr[16];
    for (int c = 0; c < KB; c++) kr[c] = (const int8_t *)(kb + (int64_t)(i0 + c < n ? i0 + c : n - 1) * ldb);
    if (pf)
        for (int c = 0; c < KB && i0 + c < pf->n; c++) pf_bytes(pf->base + (int64_t)(i0 + c) * ldb, 0, pf->bytes);
    __m512i a[16];
    for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_si512();
    for (int64_t d = 0; d < Dq; d += 32) {
        const __mmask32 mk = full ? (__mmask32)0xFFFFFFFFu : dmask32(d, D);
        __m512i kv[16];
        for (int c = 0; c < KB; c++) kv[c] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, kr[c] + d));
        for (int rr = 0; rr < RB; rr++) {
            __m512i qv = _mm512_load_si512((const void *)(q16 + rr * Dq + d));
            for (int c = 0; c < KB; c++) a[rr * KB + c] = _mm512_dpwssd_epi32(a[rr * KB + c], qv, kv[c]);
        }
    }
    float scl[16];
    for (int rr = 0; rr < RB; rr++)
        for (int c = 0; c < KB; c++) scl[rr * KB + c] = qsc[rr] * ks;
    __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(reduce16i(a)), _mm512_loadu_ps(scl)); /* lane rr * KB + c */
    float tmp[16];
    _mm512_storeu_ps(tmp, s);
    for (int rr = 0; rr < RB; rr++)
        for (int c = 0; c < KB; c++) S[rr * BK + i0 + c] = tmp[rr * KB + c];
}

static inline __attribute__((always_inline)) void qk_i8(float *S, const int16_t *q16, const float *qsc, const char *kb,
                                                        int64_t ldb, int R, int n, float ks, const int64_t Dq,
                                                        const int64_t D, const int full, const qn_pf *pf) {
    if (R < 4) {
        for (int r = 0; r < R; r++)
            for (int i0 = 0; i0 < n; i0 += 16)
                qk_i8_block(S + r * BK, q16 + r * Dq, qsc + r, kb, ldb, i0, n, ks, Dq, D, full, 1, 16, r ? NULL : pf);
    } else {
        for (int r0 = 0; r0 < R;) {
            if (R - r0 > 4) {
                for (int i0 = 0; i0 < n; i0 += 2)
                    qk_i8_block(S + r0 * BK, q16 + r0 * Dq, qsc + r0, kb, ldb, i0, n, ks, Dq, D, full, 8, 2,
                                r0 ? NULL : pf);
                r0 += 8;
            } else {
                for (int i0 = 0; i0 < n; i0 += 4)
                    qk_i8_block(S + r0 * BK, q16 + r0 * Dq, qsc + r0, kb, ldb, i0, n, ks, Dq, D, full, 4, 4,
                                r0 ? NULL : pf);
                r0 += 4;
            }
        }
    }
    if (pf)
        for (int i = n; i < pf->n; i++) pf_bytes(pf->base + (int64_t)i * ldb, 0, pf->bytes);
}

static inline __attribute__((always_inline)) void decode_body(const qn_attn_tile *t, const int dt, const int64_t Dp,
                                                              const int full) {
    float *S = t->scratch, *alpha = S + BQ * BK;
    const int R = t->R;
    const int64_t D = t->D;
    const int es = dt == QN_A_F32 ? 4 : (dt == QN_A_F16 || dt == QN_A_BF16) ? 2 : 1;
    const int64_t ldb = t->ld_tok * es;
    const float fp8 = dt == QN_A_FP8 ? 256.0f : 1.0f;
    for (int r = 0; r < t->nh * R; r++) {
        t->m[r] = -INFINITY;
        t->l[r] = 0.0f;
        for (int64_t d = 0; d < Dp; d += 16) _mm512_store_ps(t->o + r * Dp + d, _mm512_setzero_ps());
    }
    qn_attn_prefetch_next(t, t->j0); /* the first block: requested all at once, not miss by miss */
    /* int8: q rows as int16 ([nh * R + 7, Dq], the 7 zero rows that blocks of 8 may read) and
     * their scales, after S and alpha in the scratch */
    const int64_t Dq = qn_round_up(Dp, 32);
    int16_t *q16 = (int16_t *)(alpha + BQ);
    float *qsc = (float *)(q16 + (t->nh * R + 7) * Dq);
    if (dt == QN_A_I8) {
        quantize_q16(q16, qsc, t->q, t->nh * R, Dp, Dq);
        memset(q16 + t->nh * R * Dq, 0, (size_t)(7 * Dq * 2));
        memset(qsc + t->nh * R, 0, 7 * sizeof(float));
    }
    for (int64_t jb = t->j0, je; jb < t->j1; jb = je) {
        int64_t page, off;
        if (!qn_attn_block(t, jb, &je, &page, &off)) continue;
        const int n = (int)(je - jb);
        /* the next block, prefetched head by head while this one is computed */
        int64_t noff = 0;
        int nn = 0;
        if (je < t->j1) {
            int64_t nje, npage;
            qn_attn_block_at(t, je, &nje, &npage, &noff);
            nn = (int)(nje - je);
        }
        for (int hh = 0; hh < t->nh; hh++) {
            const int64_t *lo = t->lo + hh * R, *hi = t->hi + hh * R;
            float *m = t->m + hh * R, *l = t->l + hh * R;
            if (!qn_attn_rows_see(lo, hi, R, jb, je)) continue;
            const char *kb = (const char *)t->k + (off + hh * t->ld_head) * es;
            const char *vb = (const char *)t->v + (off + hh * t->ld_head) * es;
            float ks = t->kscale ? t->kscale[page * t->ld_scale + hh] * fp8 : 1.0f;
            float vs = t->vscale ? t->vscale[page * t->ld_scale + hh] * fp8 : 1.0f;
            qn_pf pk = {(const char *)t->k + (noff + hh * t->ld_head) * es, nn, D * es};
            qn_pf pv = {(const char *)t->v + (noff + hh * t->ld_head) * es, nn, D * es};
            if (dt == QN_A_I8)
                qk_i8(S, q16 + hh * R * Dq, qsc + hh * R, kb, ldb, R, n, ks, Dq, D, full, nn ? &pk : NULL);
            else
                qk_direct(S, t->q + hh * R * Dp, kb, ldb, dt, R, n, ks, Dp, D, full, nn ? &pk : NULL);
            softmax_rows(S, alpha, m, l, lo, hi, R, n, jb, je, t->softcap);
            pv_direct(t->o + hh * R * Dp, S, vb, ldb, dt, alpha, vs, R, n, Dp, D, full, nn ? &pv : NULL);
        }
    }
}

static inline __attribute__((always_inline)) void decode_dt(const qn_attn_tile *t, const int dt) {
    if (t->D == t->Dp) {
        switch (t->Dp) {
        case 64: decode_body(t, dt, 64, 1); return;
        case 80: decode_body(t, dt, 80, 1); return;
        case 96: decode_body(t, dt, 96, 1); return;
        case 128: decode_body(t, dt, 128, 1); return;
        case 256: decode_body(t, dt, 256, 1); return;
        default: break;
        }
    }
    decode_body(t, dt, t->Dp, 0);
}

void qn_attn_decode_avx512(const qn_attn_tile *t) {
    switch (t->kvdtype) {
    case QN_A_F16: decode_dt(t, QN_A_F16); break;
    case QN_A_BF16: decode_dt(t, QN_A_BF16); break;
    case QN_A_I8: decode_dt(t, QN_A_I8); break;
    case QN_A_FP8: decode_dt(t, QN_A_FP8); break;
    default: decode_dt(t, QN_A_F32); break;
    }
}
