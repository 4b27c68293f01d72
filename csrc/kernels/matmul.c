/* matmul.c — driver and scalar reference kernels for y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * x, w: row-major fp32 / fp16 / bf16 (any pair); y: fp32. M <= QN_MM_DOT_MAX_M: x converted
 * to fp32 once, then column tiles run the dot kernel in parallel (OpenMP). Larger M: tiles
 * of up to QN_MM_MB x QN_MM_NB run the GEMM kernel in parallel, each thread packing w into
 * its own workspace panel. Each output's operation order is fixed by matmul.h.
 */
#include "matmul.h"

#include <math.h>

#include "../dispatch.h"


#define QN_MM_DOT_NB 64 /* most columns per dot tile */
#define QN_MM_TILES_PER_THREAD 4 /* narrower tiles until there are about this many */

QN_INLINE int64_t mm_elsize(int dt) { return dt == QN_MM_F32 ? 4 : 2; }

QN_INLINE float mm_load(const void *p, int dt, int64_t i) {
    switch (dt) {
    case QN_MM_F16: return qn_f16_to_f32(((const uint16_t *)p)[i]);
    case QN_MM_BF16: return qn_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* ---- reference kernels ---- */

void qn_matmul_cvt_ref(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = mm_load(src, dtype, i);
}

/* The fixed lane tree of the dot formulation: 16 -> 8 -> 4 -> 2 -> 1. */
static float reduce16_ref(float s[16]) {
    for (int i = 0; i < 8; i++) s[i] = s[i] + s[i + 8];
    for (int i = 0; i < 4; i++) s[i] = s[i] + s[i + 4];
    for (int i = 0; i < 2; i++) s[i] = s[i] + s[i + 2];
    return s[0] + s[1];
}

void qn_matmul_dot_ref(const qn_mm_tile *t) {
    const float *x = (const float *)t->x;
    int64_t wsz = mm_elsize(t->wdtype);
    for (int64_t m = 0; m < t->mr; m++) {
        const float *xr = x + m * t->ldx;
        for (int64_t n = 0; n < t->nr; n++) {
            const void *wr = (const char *)t->w + n * t->ldw * wsz;
            float s[16] = {0};
            for (int64_t k = 0; k < t->K; k++) s[k & 15] = fmaf(xr[k], mm_load(wr, t->wdtype, k), s[k & 15]);
            t->y[m * t->ldy + n] = reduce16_ref(s);
        }
    }
}

void qn_matmul_gemm_ref(const qn_mm_tile *t) {
    int64_t xsz = mm_elsize(t->xdtype), wsz = mm_elsize(t->wdtype);
    for (int64_t m = 0; m < t->mr; m++) {
        const void *xr = (const char *)t->x + m * t->ldx * xsz;
        for (int64_t n = 0; n < t->nr; n++) {
            const void *wr = (const char *)t->w + n * t->ldw * wsz;
            float acc = 0.0f;
            for (int64_t k0 = 0; k0 < t->K; k0 += QN_MM_KC) {
                float part = 0.0f;
                for (int64_t k = k0; k < qn_min64(k0 + QN_MM_KC, t->K); k++)
                    part = fmaf(mm_load(xr, t->xdtype, k), mm_load(wr, t->wdtype, k), part);
                acc = k0 == 0 ? part : acc + part;
            }
            t->y[m * t->ldy + n] = acc;
        }
    }
}

/* ---- driver ---- */

typedef struct mm_plan {
    int dot;
    int64_t ldxf;           /* row stride of the converted x (dot path) */
    int64_t xf_bytes;       /* converted x, shared (dot path, x not fp32) */
    int64_t scratch_bytes;  /* per thread (gemm path) */
    int64_t panel_bytes;
} mm_plan;

static inline int64_t align64(int64_t v) { return qn_round_up(v, 64); }

static mm_plan make_plan(int64_t M, int64_t K, int xdtype) {
    mm_plan pl;
    pl.dot = M <= QN_MM_DOT_MAX_M;
    pl.ldxf = qn_round_up(K, 16);
    pl.xf_bytes = pl.dot && xdtype != QN_MM_F32 ? align64(M * pl.ldxf * 4) : 0;
    pl.panel_bytes = pl.dot ? 0 : align64(QN_MM_PANEL_FLOATS * 4);
    pl.scratch_bytes = pl.dot ? 0 : pl.panel_bytes + (xdtype != QN_MM_F32 ? align64(QN_MM_XBLOCK_FLOATS * 4) : 0);
    return pl;
}

int64_t qn_matmul_workspace_size(int64_t M, int64_t N, int64_t K, int xdtype, int wdtype, int nthreads) {
    (void)N;
    (void)wdtype;
    if (M <= 0) return 64;
    mm_plan pl = make_plan(M, K, xdtype);
    return pl.xf_bytes + (int64_t)(nthreads > 0 ? nthreads : 1) * pl.scratch_bytes + 64;
}


qn_status qn_matmul(float *QN_RESTRICT y, const void *x, int xdtype, const void *w, int wdtype,
                    int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldw, int64_t ldy,
                    void *workspace, int64_t ws_bytes) {
    if (xdtype < QN_MM_F32 || xdtype > QN_MM_BF16 || wdtype < QN_MM_F32 || wdtype > QN_MM_BF16)
        return qn_set_error(QN_EINVAL, "matmul: unknown dtype codes x=%d w=%d", xdtype, wdtype);
    if (M < 0 || N <= 0 || K <= 0)
        return qn_set_error(QN_EINVAL, "matmul: need M >= 0 and N, K > 0, got M=%lld N=%lld K=%lld",
                            (long long)M, (long long)N, (long long)K);
    if (ldx < K || ldw < K || ldy < N)
        return qn_set_error(QN_EINVAL, "matmul: row strides too small: ldx=%lld ldw=%lld (K=%lld), ldy=%lld (N=%lld)",
                            (long long)ldx, (long long)ldw, (long long)K, (long long)ldy, (long long)N);
    if (M == 0) return QN_OK;
    if (!y || !x || !w) return qn_set_error(QN_EINVAL, "matmul: null array pointer");
    qn_dispatch kd = qn_kernels;
    if (!kd.mm_dot || !kd.mm_gemm || !kd.mm_cvt)
        return qn_set_error(QN_EINVAL, "matmul: kernel table is empty (call qn_dispatch_init first)");
    int nth = qn_omp_max_threads();
    if (!workspace || ws_bytes < qn_matmul_workspace_size(M, N, K, xdtype, wdtype, nth))
        return qn_set_error(QN_EINVAL, "matmul: workspace too small (%lld bytes, need %lld)", (long long)ws_bytes,
                            (long long)qn_matmul_workspace_size(M, N, K, xdtype, wdtype, nth));
    mm_plan pl = make_plan(M, K, xdtype);
    char *wsp = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int64_t xsz = mm_elsize(xdtype), wsz = mm_elsize(wdtype);

    if (pl.dot) {
        const float *xf = (const float *)x;
        int64_t ldxf = ldx;
        if (xdtype != QN_MM_F32) {
            /* at most QN_MM_DOT_MAX_M rows: converted once, read by every tile */
            float *buf = (float *)wsp;
            for (int64_t m = 0; m < M; m++) kd.mm_cvt(buf + m * pl.ldxf, (const char *)x + m * ldx * xsz, xdtype, K);
            xf = buf;
            ldxf = pl.ldxf;
        }
        /* tile width never changes a result, only how evenly the threads share the work */
        int64_t nb = qn_min64(QN_MM_DOT_NB, qn_round_up(qn_ceil_div(N, QN_MM_TILES_PER_THREAD * nth), 8));
        int64_t n_tiles = qn_ceil_div(N, nb);
#pragma omp parallel for schedule(static) num_threads(nth)
        for (int64_t t = 0; t < n_tiles; t++) {
            int64_t n0 = t * nb;
            qn_mm_tile tile;
            memset(&tile, 0, sizeof tile);
            tile.y = y + n0;
            tile.ldy = ldy;
            tile.x = xf;
            tile.ldx = ldxf;
            tile.xdtype = QN_MM_F32;
            tile.w = (const char *)w + n0 * ldw * wsz;
            tile.ldw = ldw;
            tile.wdtype = wdtype;
            tile.mr = M;
            tile.nr = qn_min64(nb, N - n0);
            tile.K = K;
            kd.mm_dot(&tile);
        }
        return QN_OK;
    }

    /* Tiles of at most QN_MM_MB x QN_MM_NB, narrower (in steps of 48 columns, a micro-panel
     * of every ISA) while there are fewer than about QN_MM_TILES_PER_THREAD per thread; in
     * column-block-major order, so a thread's consecutive tiles share w's rows. */
    int64_t n_mb = qn_ceil_div(M, QN_MM_MB);
    int64_t mb = qn_round_up(qn_ceil_div(M, n_mb), 16);
    n_mb = qn_ceil_div(M, mb);
    int64_t want_nb = qn_ceil_div(QN_MM_TILES_PER_THREAD * nth, n_mb);
    int64_t nb = qn_min64(QN_MM_NB, qn_max64(48, qn_round_up(qn_ceil_div(N, want_nb), 48)));
    int64_t n_nb = qn_ceil_div(N, nb);
    int64_t n_tiles = n_nb * n_mb;
    char *scratch0 = wsp + pl.xf_bytes;
#pragma omp parallel num_threads(nth)
    {
        char *scr = scratch0 + (int64_t)qn_omp_thread_id() * pl.scratch_bytes;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; t++) {
            int64_t n0 = (t / n_mb) * nb, m0 = (t % n_mb) * mb;
            qn_mm_tile tile;
            memset(&tile, 0, sizeof tile);
            tile.y = y + m0 * ldy + n0;
            tile.ldy = ldy;
            tile.x = (const char *)x + m0 * ldx * xsz;
            tile.ldx = ldx;
            tile.xdtype = xdtype;
            tile.w = (const char *)w + n0 * ldw * wsz;
            tile.ldw = ldw;
            tile.wdtype = wdtype;
            tile.mr = qn_min64(mb, M - m0);
            tile.nr = qn_min64(nb, N - n0);
            tile.K = K;
            tile.panel = (float *)scr;
            tile.xblock = xdtype != QN_MM_F32 ? (float *)(scr + pl.panel_bytes) : NULL;
            kd.mm_gemm(&tile);
        }
    }
    return QN_OK;
}
