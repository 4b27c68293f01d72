/* matmul_avx512.c — AVX-512 (F/BW/VL/DQ) tile kernels for matmul.h, y = x @ w^T.
 *
 * dot: one zmm per output is the formulation's 16-lane sum; 6-8 rows of w (fp16/bf16
 * widened on load) stream from memory once and meet the rows of x 1-4 at a time.
 * gemm: per K block, 48 rows of w are transposed into a micro-panel [kc][48] while the next
 * 48 are prefetched; an 8 x 48 micro-kernel (24 zmm accumulators, x broadcast) walks k in
 * order over all rows of x. Single-threaded: matmul.c owns the threads.
 */
#include <immintrin.h>

#include "matmul.h"

#define NR 48 /* micro-panel width: 3 zmm */
#define MR 8  /* micro-kernel rows */

/* ---- loads that widen fp16 / bf16 to fp32 ---- */

QN_INLINE __m512 widen16(__m256i h, const int dt) {
    if (dt == QN_MM_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 elements at p[k ..] as fp32. */
QN_INLINE __m512 load16(const void *p, const int dt, int64_t k) {
    if (dt == QN_MM_F32) return _mm512_loadu_ps((const float *)p + k);
    return widen16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + k)), dt);
}

/* The same with the lanes outside mk zero (and not read). */
QN_INLINE __m512 load16_mask(const void *p, const int dt, int64_t k, __mmask16 mk) {
    if (dt == QN_MM_F32) return _mm512_maskz_loadu_ps(mk, (const float *)p + k);
    return widen16(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + k), dt);
}

QN_INLINE __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

QN_INLINE void cvt_loop(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int64_t n, const int dt) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src, dt, i));
    if (i < n) {
        __mmask16 mk = tail_mask(n - i);
        _mm512_mask_storeu_ps(dst + i, mk, load16_mask(src, dt, i, mk));
    }
}

void qn_matmul_cvt_avx512(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n) {
    switch (dtype) {
    case QN_MM_F16: cvt_loop(dst, src, n, QN_MM_F16); break;
    case QN_MM_BF16: cvt_loop(dst, src, n, QN_MM_BF16); break;
    default: memcpy(dst, src, (size_t)n * 4); break;
    }
}

/* ---- dot formulation ---- */

/* The lane tree of matmul.h: i + (i+8), i + (i+4), i + (i+2), 0 + 1. */
QN_INLINE float hsum16(__m512 a) {
    __m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_movehdup_ps(r2)));
}

/* y[m0 + i, n0 + r] for i < BM, r < BR: BM rows of x against BR rows of w. */
QN_INLINE void dot_block(const qn_mm_tile *t, int64_t m0, int64_t n0, const int BM, const int BR, const int dt) {
    const int64_t wsz = dt == QN_MM_F32 ? 4 : 2, K = t->K;
    const float *xr[4];
    const char *wr[16];
    __m512 acc[4][16];
    for (int i = 0; i < BM; i++) xr[i] = (const float *)t->x + (m0 + i) * t->ldx;
    for (int r = 0; r < BR; r++) wr[r] = (const char *)t->w + (n0 + r) * t->ldw * wsz;
    for (int i = 0; i < BM; i++)
        for (int r = 0; r < BR; r++) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[4];
        for (int i = 0; i < BM; i++) xv[i] = _mm512_loadu_ps(xr[i] + k);
        for (int r = 0; r < BR; r++) {
            __m512 wv = load16(wr[r], dt, k);
            for (int i = 0; i < BM; i++) acc[i][r] = _mm512_fmadd_ps(xv[i], wv, acc[i][r]);
        }
    }
    if (k < K) {
        /* zero lanes: fma(0, 0, acc) == acc, the same sums as skipping them */
        __mmask16 mk = tail_mask(K - k);
        __m512 xv[4];
        for (int i = 0; i < BM; i++) xv[i] = _mm512_maskz_loadu_ps(mk, xr[i] + k);
        for (int r = 0; r < BR; r++) {
            __m512 wv = load16_mask(wr[r], dt, k, mk);
            for (int i = 0; i < BM; i++) acc[i][r] = _mm512_fmadd_ps(xv[i], wv, acc[i][r]);
        }
    }
    for (int i = 0; i < BM; i++)
        for (int r = 0; r < BR; r++) t->y[(m0 + i) * t->ldy + n0 + r] = hsum16(acc[i][r]);
}

/* All mr rows of x against BR rows of w at n0: the BR rows are read from memory by the first
 * block of x rows and from cache by the others. */
QN_INLINE void dot_cols(const qn_mm_tile *t, int64_t n0, const int BR, const int dt) {
    int64_t m = 0;
    for (; m + 4 <= t->mr; m += 4) dot_block(t, m, n0, 4, BR, dt);
    switch (t->mr - m) {
    case 3: dot_block(t, m, n0, 3, BR, dt); break;
    case 2: dot_block(t, m, n0, 2, BR, dt); break;
    case 1: dot_block(t, m, n0, 1, BR, dt); break;
    default: break;
    }
}

/* Rows of w per block: 8 streams in flight for decode; 6 when blocks of 4 x rows need
 * 24 accumulators. */
QN_INLINE void dot_tile(const qn_mm_tile *t, const int dt) {
    int64_t n = 0;
    if (t->mr >= 4) {
        for (; n + 6 <= t->nr; n += 6) dot_cols(t, n, 6, dt);
    } else {
        for (; n + 8 <= t->nr; n += 8) dot_cols(t, n, 8, dt);
    }
    for (; n + 4 <= t->nr; n += 4) dot_cols(t, n, 4, dt);
    for (; n < t->nr; n++) dot_cols(t, n, 1, dt);
}

void qn_matmul_dot_avx512(const qn_mm_tile *t) {
    switch (t->wdtype) {
    case QN_MM_F16: dot_tile(t, QN_MM_F16); break;
    case QN_MM_BF16: dot_tile(t, QN_MM_BF16); break;
    default: dot_tile(t, QN_MM_F32); break;
    }
}

/* ---- gemm formulation ---- */

/* In-register transpose: r[i] holds row i (16 values), afterwards r[j] holds column j. */
QN_INLINE void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) {
        __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
        __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
        u[4 * q + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* u[4q + e], 128-bit lane L: rows 4q .. 4q+3 of column 4L + e */
    for (int e = 0; e < 4; e++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
        __m512 w0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
        r[e] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

/* One micro-panel: dst[k][c] = w[n0 + c][k0 + k] for c < NR, k < kc, zero for c >= ncols.
 * Meanwhile the rows [pn0, pn0 + pcols) at inputs [pk0, pk0 + pkc) (the next micro-panel)
 * are prefetched towards L2, so their memory traffic overlaps this panel's compute. */
QN_INLINE void pack_panel(float *QN_RESTRICT dst, const qn_mm_tile *t, int64_t n0, int64_t ncols, int64_t k0,
                          int64_t kc, int64_t pn0, int64_t pcols, int64_t pk0, int64_t pkc, const int dt) {
    const int64_t wsz = dt == QN_MM_F32 ? 4 : 2, ldb = t->ldw * wsz;
    for (int g = 0; g < NR / 16; g++) {
        int rows = (int)qn_max64(0, qn_min64(16, ncols - 16 * g));
        int prows = (int)qn_max64(0, qn_min64(16, pcols - 16 * g));
        const char *w0 = (const char *)t->w + ((n0 + 16 * g) * t->ldw + k0) * wsz;
        const char *p0 = (const char *)t->w + ((pn0 + 16 * g) * t->ldw + pk0) * wsz;
        float *d = dst + 16 * g;
        if (rows == 0) {
            for (int64_t k = 0; k < kc; k++) _mm512_store_ps(d + k * NR, _mm512_setzero_ps());
            continue;
        }
        for (int64_t kb = 0; kb < kc; kb += 16) {
            int64_t kn = qn_min64(16, kc - kb);
            if (kb < pkc && (kb * wsz) % 64 == 0)
                for (int i = 0; i < prows; i++) _mm_prefetch(p0 + i * ldb + kb * wsz, _MM_HINT_T1);
            __m512 r[16];
            if (kn == 16) {
                for (int i = 0; i < rows; i++) r[i] = load16(w0 + i * ldb, dt, kb);
            } else {
                __mmask16 mk = tail_mask(kn);
                for (int i = 0; i < rows; i++) r[i] = load16_mask(w0 + i * ldb, dt, kb, mk);
            }
            for (int i = rows; i < 16; i++) r[i] = _mm512_setzero_ps();
            transpose16(r);
            for (int64_t kk = 0; kk < kn; kk++) _mm512_store_ps(d + (kb + kk) * NR, r[kk]);
        }
    }
}

/* y[BM, NV*16] = (first ? 0 + : y +) x[BM, kc] @ panel[kc, NV*16], the block sum being an
 * fma chain over k from zero. */
QN_INLINE void ukernel(float *QN_RESTRICT y, int64_t ldy, const float *QN_RESTRICT x, int64_t ldx,
                       const float *QN_RESTRICT p, int64_t kc, int first, int64_t ncols, const int BM,
                       const int NV) {
    __m512 acc[MR][3];
    __mmask16 mk[3];
    for (int v = 0; v < NV; v++) mk[v] = tail_mask(qn_max64(0, ncols - 16 * v));
    for (int i = 0; i < BM; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512 b[3];
        for (int v = 0; v < NV; v++) b[v] = _mm512_load_ps(p + 16 * v);
        p += NR;
        for (int i = 0; i < BM; i++) {
            __m512 a = _mm512_set1_ps(x[i * ldx + k]);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < BM; i++)
        for (int v = 0; v < NV; v++) {
            float *yv = y + i * ldy + 16 * v;
            if (!first) acc[i][v] = _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], yv), acc[i][v]);
            _mm512_mask_storeu_ps(yv, mk[v], acc[i][v]);
        }
}

#define UK_CASE(BM)                                                                                \
    case BM:                                                                                       \
        if (nv == 3) ukernel(y, ldy, x, ldx, p, kc, first, ncols, BM, 3);                          \
        else if (nv == 2) ukernel(y, ldy, x, ldx, p, kc, first, ncols, BM, 2);                     \
        else ukernel(y, ldy, x, ldx, p, kc, first, ncols, BM, 1);                                  \
        break;

static void ukernel_any(float *QN_RESTRICT y, int64_t ldy, const float *QN_RESTRICT x, int64_t ldx,
                        const float *QN_RESTRICT p, int64_t kc, int first, int64_t ncols, int bm) {
    int nv = (int)qn_ceil_div(ncols, 16);
    switch (bm) {
        UK_CASE(8) UK_CASE(7) UK_CASE(6) UK_CASE(5) UK_CASE(4) UK_CASE(3) UK_CASE(2) UK_CASE(1)
    default: break;
    }
}

void qn_matmul_gemm_avx512(const qn_mm_tile *t) {
    const int64_t xsz = t->xdtype == QN_MM_F32 ? 4 : 2;
    int64_t npan = qn_ceil_div(t->nr, NR);
    for (int64_t k0 = 0; k0 < t->K; k0 += QN_MM_KC) {
        int64_t kc = qn_min64(QN_MM_KC, t->K - k0);
        const float *xb;
        int64_t ldxb;
        if (t->xdtype == QN_MM_F32) {
            xb = (const float *)t->x + k0;
            ldxb = t->ldx;
        } else {
            for (int64_t m = 0; m < t->mr; m++)
                qn_matmul_cvt_avx512(t->xblock + m * QN_MM_KC, (const char *)t->x + (m * t->ldx + k0) * xsz,
                                     t->xdtype, kc);
            xb = t->xblock;
            ldxb = QN_MM_KC;
        }
        for (int64_t j = 0; j < npan; j++) {
            /* next micro-panel: the following columns, or the first ones of the next K block */
            int64_t ncols = qn_min64(NR, t->nr - j * NR);
            int64_t pn0 = (j + 1) * NR, pk0 = k0, pkc = kc;
            if (j + 1 == npan) {
                pn0 = 0;
                pk0 = k0 + QN_MM_KC;
                pkc = qn_max64(0, qn_min64(QN_MM_KC, t->K - pk0));
            }
            int64_t pcols = qn_min64(NR, t->nr - pn0);
            switch (t->wdtype) {
            case QN_MM_F16: pack_panel(t->panel, t, j * NR, ncols, k0, kc, pn0, pcols, pk0, pkc, QN_MM_F16); break;
            case QN_MM_BF16: pack_panel(t->panel, t, j * NR, ncols, k0, kc, pn0, pcols, pk0, pkc, QN_MM_BF16); break;
            default: pack_panel(t->panel, t, j * NR, ncols, k0, kc, pn0, pcols, pk0, pkc, QN_MM_F32); break;
            }
            for (int64_t i0 = 0; i0 < t->mr; i0 += MR)
                ukernel_any(t->y + i0 * t->ldy + j * NR, t->ldy, xb + i0 * ldxb, ldxb, t->panel, kc, k0 == 0, ncols,
                            (int)qn_min64(MR, t->mr - i0));
        }
    }
}
