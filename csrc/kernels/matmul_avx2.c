/* matmul_avx2.c — AVX2 + FMA + F16C tile kernels for matmul.h, y = x @ w^T.
 *
 * dot: an output's 16-lane sum is two ymm (lanes 0-7, 8-15; adding them is the tree's first
 * step); 2-4 rows of w (fp16/bf16 widened on load) meet the rows of x 1-2 at a time.
 * gemm: per K block, 16 rows of w are transposed into a micro-panel [kc][16] while the next
 * 16 are prefetched; a 6 x 16 micro-kernel (12 ymm accumulators, x broadcast) walks k in
 * order over all rows of x. Single-threaded: matmul.c owns the threads.
 */
#include <immintrin.h>

#include "matmul.h"

#define NR 16 /* micro-panel width: 2 ymm */
#define MR 6  /* micro-kernel rows */

/* ---- loads that widen fp16 / bf16 to fp32 ---- */

QN_INLINE __m256 widen8(__m128i h, const int dt) {
    if (dt == QN_MM_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

QN_INLINE __m256 load8(const void *p, const int dt, int64_t k) {
    if (dt == QN_MM_F32) return _mm256_loadu_ps((const float *)p + k);
    return widen8(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + k)), dt);
}

/* The first n (may be <= 0 or >= 8) of the 8 elements at p[k ..]; the others are zero. */
QN_INLINE __m256 load8_part(const void *p, const int dt, int64_t k, int64_t n) {
    if (n <= 0) return _mm256_setzero_ps();
    if (n >= 8) return load8(p, dt, k);
    if (dt == QN_MM_F32) {
        float buf[8] = {0};
        memcpy(buf, (const float *)p + k, (size_t)n * 4);
        return _mm256_loadu_ps(buf);
    }
    uint16_t buf[8] = {0};
    memcpy(buf, (const uint16_t *)p + k, (size_t)n * 2);
    return widen8(_mm_loadu_si128((const __m128i *)buf), dt);
}

QN_INLINE void cvt_loop(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int64_t n, const int dt) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src, dt, i));
    if (i < n) {
        float buf[8];
        _mm256_storeu_ps(buf, load8_part(src, dt, i, n - i));
        memcpy(dst + i, buf, (size_t)(n - i) * 4);
    }
}

void qn_matmul_cvt_avx2(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n) {
    switch (dtype) {
    case QN_MM_F16: cvt_loop(dst, src, n, QN_MM_F16); break;
    case QN_MM_BF16: cvt_loop(dst, src, n, QN_MM_BF16); break;
    default: memcpy(dst, src, (size_t)n * 4); break;
    }
}

/* ---- dot formulation ---- */

/* The lane tree of matmul.h on the halves lo (lanes 0-7) and hi (lanes 8-15). */
QN_INLINE float hsum16(__m256 lo, __m256 hi) {
    __m256 r8 = _mm256_add_ps(lo, hi);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
    __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(r2, _mm_movehdup_ps(r2)));
}

/* y[m0 + i, n0 + r] for i < BM, r < BR. */
QN_INLINE void dot_block(const qn_mm_tile *t, int64_t m0, int64_t n0, const int BM, const int BR, const int dt) {
    const int64_t wsz = dt == QN_MM_F32 ? 4 : 2, K = t->K;
    const float *xr[2];
    const char *wr[4];
    __m256 acc[2][4][2];
    for (int i = 0; i < BM; i++) xr[i] = (const float *)t->x + (m0 + i) * t->ldx;
    for (int r = 0; r < BR; r++) wr[r] = (const char *)t->w + (n0 + r) * t->ldw * wsz;
    for (int i = 0; i < BM; i++)
        for (int r = 0; r < BR; r++) acc[i][r][0] = acc[i][r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xv[2][2];
        for (int i = 0; i < BM; i++) {
            xv[i][0] = _mm256_loadu_ps(xr[i] + k);
            xv[i][1] = _mm256_loadu_ps(xr[i] + k + 8);
        }
        for (int r = 0; r < BR; r++) {
            __m256 w0 = load8(wr[r], dt, k), w1 = load8(wr[r], dt, k + 8);
            for (int i = 0; i < BM; i++) {
                acc[i][r][0] = _mm256_fmadd_ps(xv[i][0], w0, acc[i][r][0]);
                acc[i][r][1] = _mm256_fmadd_ps(xv[i][1], w1, acc[i][r][1]);
            }
        }
    }
    if (k < K) {
        /* zero lanes: fma(0, 0, acc) == acc, the same sums as skipping them */
        int64_t kn = K - k;
        __m256 xv[2][2];
        for (int i = 0; i < BM; i++) {
            xv[i][0] = load8_part(xr[i], QN_MM_F32, k, kn);
            xv[i][1] = load8_part(xr[i], QN_MM_F32, k + 8, kn - 8);
        }
        for (int r = 0; r < BR; r++) {
            __m256 w0 = load8_part(wr[r], dt, k, kn), w1 = load8_part(wr[r], dt, k + 8, kn - 8);
            for (int i = 0; i < BM; i++) {
                acc[i][r][0] = _mm256_fmadd_ps(xv[i][0], w0, acc[i][r][0]);
                acc[i][r][1] = _mm256_fmadd_ps(xv[i][1], w1, acc[i][r][1]);
            }
        }
    }
    for (int i = 0; i < BM; i++)
        for (int r = 0; r < BR; r++) t->y[(m0 + i) * t->ldy + n0 + r] = hsum16(acc[i][r][0], acc[i][r][1]);
}

/* All mr rows of x against BR rows of w at n0: the BR rows are read from memory by the first
 * pair of x rows and from cache by the others. */
QN_INLINE void dot_cols(const qn_mm_tile *t, int64_t n0, const int BR, const int dt) {
    int64_t m = 0;
    for (; m + 2 <= t->mr; m += 2) dot_block(t, m, n0, 2, BR, dt);
    if (m < t->mr) dot_block(t, m, n0, 1, BR, dt);
}

/* Rows of w per block: 4 for decode, 2 when pairs of x rows need the registers. */
QN_INLINE void dot_tile(const qn_mm_tile *t, const int dt) {
    int64_t n = 0;
    if (t->mr == 1)
        for (; n + 4 <= t->nr; n += 4) dot_cols(t, n, 4, dt);
    for (; n + 2 <= t->nr; n += 2) dot_cols(t, n, 2, dt);
    for (; n < t->nr; n++) dot_cols(t, n, 1, dt);
}

void qn_matmul_dot_avx2(const qn_mm_tile *t) {
    switch (t->wdtype) {
    case QN_MM_F16: dot_tile(t, QN_MM_F16); break;
    case QN_MM_BF16: dot_tile(t, QN_MM_BF16); break;
    default: dot_tile(t, QN_MM_F32); break;
    }
}

/* ---- gemm formulation ---- */

/* In-register transpose: r[i] holds row i (8 values), afterwards r[j] holds column j. */
QN_INLINE void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 2; q++) {
        u[4 * q + 0] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
        u[4 * q + 1] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
        u[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
        u[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
    }
    /* u[4q + e], 128-bit lane L: rows 4q .. 4q+3 of column 4L + e */
    for (int e = 0; e < 4; e++) {
        r[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
        r[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
}

/* One micro-panel: dst[k][c] = w[n0 + c][k0 + k] for c < NR, k < kc, zero for c >= ncols.
 * Meanwhile the rows [pn0, pn0 + pcols) at inputs [pk0, pk0 + pkc) (the next micro-panel)
 * are prefetched towards L2, so their memory traffic overlaps this panel's compute. */
QN_INLINE void pack_panel(float *QN_RESTRICT dst, const qn_mm_tile *t, int64_t n0, int64_t ncols, int64_t k0,
                          int64_t kc, int64_t pn0, int64_t pcols, int64_t pk0, int64_t pkc, const int dt) {
    const int64_t wsz = dt == QN_MM_F32 ? 4 : 2, ldb = t->ldw * wsz;
    for (int g = 0; g < NR / 8; g++) {
        int rows = (int)qn_max64(0, qn_min64(8, ncols - 8 * g));
        int prows = (int)qn_max64(0, qn_min64(8, pcols - 8 * g));
        const char *w0 = (const char *)t->w + ((n0 + 8 * g) * t->ldw + k0) * wsz;
        const char *p0 = (const char *)t->w + ((pn0 + 8 * g) * t->ldw + pk0) * wsz;
        float *d = dst + 8 * g;
        if (rows == 0) {
            for (int64_t k = 0; k < kc; k++) _mm256_store_ps(d + k * NR, _mm256_setzero_ps());
            continue;
        }
        for (int64_t kb = 0; kb < kc; kb += 8) {
            int64_t kn = qn_min64(8, kc - kb);
            if (kb < pkc && (kb * wsz) % 64 == 0)
                for (int i = 0; i < prows; i++) _mm_prefetch(p0 + i * ldb + kb * wsz, _MM_HINT_T1);
            __m256 r[8];
            for (int i = 0; i < rows; i++) r[i] = load8_part(w0 + i * ldb, dt, kb, kn);
            for (int i = rows; i < 8; i++) r[i] = _mm256_setzero_ps();
            transpose8(r);
            for (int64_t kk = 0; kk < kn; kk++) _mm256_store_ps(d + (kb + kk) * NR, r[kk]);
        }
    }
}

/* Lanes [0, n) of a ymm (n may be <= 0 or >= 8) as a vmaskmovps mask. */
QN_INLINE __m256i lane_mask(int64_t n) {
    int c = (int)(n < 0 ? 0 : n > 8 ? 8 : n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* y[BM, NV*8] = (first ? 0 + : y +) x[BM, kc] @ panel[kc, NV*8], the block sum being an
 * fma chain over k from zero. */
QN_INLINE void ukernel(float *QN_RESTRICT y, int64_t ldy, const float *QN_RESTRICT x, int64_t ldx,
                       const float *QN_RESTRICT p, int64_t kc, int first, int64_t ncols, const int BM,
                       const int NV) {
    __m256 acc[MR][2];
    __m256i mk[2];
    for (int v = 0; v < NV; v++) mk[v] = lane_mask(ncols - 8 * v);
    for (int i = 0; i < BM; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m256 b[2];
        for (int v = 0; v < NV; v++) b[v] = _mm256_load_ps(p + 8 * v);
        p += NR;
        for (int i = 0; i < BM; i++) {
            __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < BM; i++)
        for (int v = 0; v < NV; v++) {
            float *yv = y + i * ldy + 8 * v;
            if (!first) acc[i][v] = _mm256_add_ps(_mm256_maskload_ps(yv, mk[v]), acc[i][v]);
            _mm256_maskstore_ps(yv, mk[v], acc[i][v]);
        }
}

#define UK_CASE(BM)                                                                                \
    case BM:                                                                                       \
        if (nv == 2) ukernel(y, ldy, x, ldx, p, kc, first, ncols, BM, 2);                          \
        else ukernel(y, ldy, x, ldx, p, kc, first, ncols, BM, 1);                                  \
        break;

static void ukernel_any(float *QN_RESTRICT y, int64_t ldy, const float *QN_RESTRICT x, int64_t ldx,
                        const float *QN_RESTRICT p, int64_t kc, int first, int64_t ncols, int bm) {
    int nv = (int)qn_ceil_div(ncols, 8);
    switch (bm) {
        UK_CASE(6) UK_CASE(5) UK_CASE(4) UK_CASE(3) UK_CASE(2) UK_CASE(1)
    default: break;
    }
}

void qn_matmul_gemm_avx2(const qn_mm_tile *t) {
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
                qn_matmul_cvt_avx2(t->xblock + m * QN_MM_KC, (const char *)t->x + (m * t->ldx + k0) * xsz,
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
