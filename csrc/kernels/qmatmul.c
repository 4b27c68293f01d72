/* qmatmul.c — driver and scalar reference kernels for y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * W is in the panel layout of qn_formats.h. The driver quantizes (int formats) or
 * converts (lut formats) x into the workspace, then splits the output into tiles of
 * QN_NP_BLOCK panels x QN_MTILE rows run in parallel with OpenMP; each tile decodes its
 * panels' scales to fp32 once and calls the dispatched inner kernel. A given output
 * element is always computed by one thread with one fixed sequence of float operations,
 * so results do not depend on the thread count or on M.
 */
#include "qmatmul.h"

#include <math.h>

#include "../dispatch.h"



/* ---- code access (the layout's definition in executable form) ---- */

int qn_code_at(const uint8_t *pc, int bits, int64_t n, int64_t k) {
    const uint8_t *c = pc + (k / QN_CHUNK) * QN_CHUNK_BYTES(bits);
    int kk = (int)(k % QN_CHUNK), quad = kk / 4, idx = (int)n * 4 + kk % 4;
    if (bits == 8) return c[quad * 64 + idx];
    qn_planes pl = qn_fmt_planes(bits);
    int v = 0, sh = 0;
    if (pl.nib >= 0) {
        v = (c[pl.nib + (quad / 2) * 64 + idx] >> ((quad & 1) * 4)) & 15;
        sh = 4;
    }
    if (pl.crumb >= 0) {
        v |= ((c[pl.crumb + (quad / 4) * 64 + idx] >> ((quad & 3) * 2)) & 3) << sh;
        sh += 2;
    }
    if (pl.bit >= 0) v |= ((c[pl.bit + idx] >> quad) & 1) << sh;
    return v;
}

/* ---- activation quantization, scalar ---- */

static inline float load_x(const void *x, int xdtype, int64_t k) {
    switch (xdtype) {
    case QN_X_F16: return qn_f16_to_f32(((const uint16_t *)x)[k]);
    case QN_X_BF16: return qn_bf16_to_f32(((const uint16_t *)x)[k]);
    default: return ((const float *)x)[k];
    }
}

void qn_quantize_act_row_ref(int8_t *xq, float *xd, float *xsum, int32_t *xisum, const void *x,
                             int xdtype, int64_t K, int64_t Kp, int64_t fb) {
    int64_t nb = qn_ceil_div(Kp, fb);
    for (int64_t b = 0; b < nb; b++) {
        int64_t k0 = b * fb, k1 = qn_min64(k0 + fb, Kp), kr = qn_min64(k1, K);
        float amax = 0.0f;
        for (int64_t k = k0; k < kr; k++) {
            float a = fabsf(load_x(x, xdtype, k));
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t isum = 0;
        for (int64_t k = k0; k < k1; k++) {
            int32_t q = 0;
            if (k < kr) {
                float v = nearbyintf(load_x(x, xdtype, k) * id);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                q = (int32_t)v;
            }
            xq[k] = (int8_t)q;
            isum += q;
        }
        xd[b] = d;
        xisum[b] = isum;
        xsum[b] = d * (float)isum;
    }
}

/* ---- scales ---- */

static inline float load_scale(const void *s, int scale, int64_t i) {
    switch (scale) {
    case QN_SCALE_F16: return qn_f16_to_f32(((const uint16_t *)s)[i]);
    case QN_SCALE_BF16: return qn_bf16_to_f32(((const uint16_t *)s)[i]);
    default: return ((const float *)s)[i];
    }
}

void qn_qtile_group_scale(const qn_qtile *t, int64_t p, int64_t gi, int n, float *s, int32_t *z, float *o) {
    int64_t i = (p * t->n_groups + gi) * QN_PANEL + n;
    *z = 0;
    *o = 0.0f;
    if (t->scale == QN_SCALE_NESTED_U6 || t->scale == QN_SCALE_NESTED_I8) {
        int64_t si = (p * t->n_super + (gi * t->group) / QN_SUPER) * QN_PANEL + n;
        float d = qn_f16_to_f32(t->supers[si]);
        if (t->scale == QN_SCALE_NESTED_U6) {
            *s = d * (float)((const uint8_t *)t->scales)[i];
            *o = -(qn_f16_to_f32(t->super_mins[si]) * (float)((const uint8_t *)t->offsets)[i]);
        } else {
            *s = d * (float)((const int8_t *)t->scales)[i];
            *z = 1 << (t->bits - 1);
        }
        return;
    }
    *s = load_scale(t->scales, t->scale, i);
    if (t->kind == QN_SYM) *z = 1 << (t->bits - 1);
    else if (t->offset == QN_OFF_ZERO) *z = ((const uint8_t *)t->offsets)[i];
    else if (t->offset == QN_OFF_MIN) *o = load_scale(t->offsets, t->scale, i);
}

void qn_qtile_for_panels(qn_qtile *t, const qn_qweight *w, int64_t p0, int64_t np) {
    const qn_format *f = w->fmt;
    int64_t Kp = qn_fmt_kpad(f, w->K), ng = qn_fmt_ngroups(f, w->K), nsup = Kp / QN_SUPER;
    int sb = qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale), ob = qn_offset_bytes(f);
    memset(t, 0, sizeof *t);
    t->panel_bytes = (Kp / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    t->codes = w->codes + p0 * t->panel_bytes;
    t->scales = (const char *)w->scales + p0 * ng * QN_PANEL * sb;
    t->offsets = w->offsets ? (const char *)w->offsets + p0 * ng * QN_PANEL * ob : NULL;
    t->supers = w->supers ? w->supers + p0 * nsup * QN_PANEL : NULL;
    t->super_mins = w->super_mins ? w->super_mins + p0 * nsup * QN_PANEL : NULL;
    t->n_groups = ng;
    t->group = qn_fmt_group(f, w->K);
    t->n_super = nsup;
    t->kind = f->kind;
    t->offset = f->offset;
    t->scale = f->scale;
    t->lut = f->lut;
    t->lut_kind = f->lut_kind;
    t->bits = f->bits;
    t->np = (int)np;
    t->Kp = Kp;
    t->ncols = qn_min64(np * QN_PANEL, w->N - p0 * QN_PANEL);
}

/* ---- reference tile kernels ---- */

void qn_qtile_int_ref(const qn_qtile *t) {
    int64_t nb = qn_ceil_div(t->Kp, t->fb);
    for (int m = 0; m < t->mr; m++) {
        const int8_t *xq = t->xq + m * t->ldxq;
        for (int p = 0; p < t->np; p++) {
            const uint8_t *pc = t->codes + p * t->panel_bytes;
            for (int n = 0; n < QN_PANEL; n++) {
                int64_t col = (int64_t)p * QN_PANEL + n;
                if (col >= t->ncols) break;
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    int64_t k0 = b * t->fb, k1 = qn_min64(k0 + t->fb, t->Kp), xb = m * t->ldxb + b;
                    float s, o;
                    int32_t z;
                    qn_qtile_group_scale(t, p, k0 / t->group, n, &s, &z, &o);
                    int32_t dot = 0;
                    for (int64_t k = k0; k < k1; k++) dot += qn_code_at(pc, t->bits, n, k) * xq[k];
                    dot -= z * t->xisum[xb];
                    acc = fmaf((float)dot, s * t->xd[xb], acc);
                    if (t->offset == QN_OFF_MIN) acc = fmaf(o, t->xsum[xb], acc);
                }
                t->y[m * t->ldy + col] = acc;
            }
        }
    }
}

void qn_qtile_lut_ref(const qn_qtile *t) {
    for (int m = 0; m < t->mr; m++) {
        const float *xf = t->xf + m * t->ldxf;
        for (int p = 0; p < t->np; p++) {
            const uint8_t *pc = t->codes + p * t->panel_bytes;
            for (int n = 0; n < QN_PANEL; n++) {
                int64_t col = (int64_t)p * QN_PANEL + n;
                if (col >= t->ncols) break;
                float acc = 0.0f;
                for (int64_t g = 0; g < t->n_groups; g++) {
                    int64_t k0 = g * t->group, k1 = qn_min64(k0 + t->group, t->Kp);
                    float s, o;
                    int32_t z;
                    qn_qtile_group_scale(t, p, g, n, &s, &z, &o);
                    float gacc = 0.0f;
                    for (int64_t k = k0; k < k1; k++)
                        gacc = fmaf(t->lut[qn_code_at(pc, t->bits, n, k)], xf[k], gacc);
                    acc = fmaf(gacc, s, acc);
                }
                t->y[m * t->ldy + col] = acc;
            }
        }
    }
}

/* ---- driver ---- */

static inline int64_t align64(int64_t x) { return qn_round_up(x, 64); }

int64_t qn_qact_bytes(const qn_qweight *w, int64_t M) {
    qn_qact a;
    qn_qact_init(&a, w, M, NULL);
    return a.lut ? align64(M * a.Kp * 4) : align64(M * a.Kp) + 3 * align64(M * a.nb * 4);
}

void qn_qact_init(qn_qact *a, const qn_qweight *w, int64_t M, void *buf) {
    const qn_format *f = w->fmt;
    a->K = w->K;
    a->Kp = qn_fmt_kpad(f, w->K);
    a->fb = qn_min64(qn_fmt_group(f, w->K), QN_SUPER);
    a->nb = qn_ceil_div(a->Kp, a->fb);
    a->lut = f->kind == QN_LUT;
    int64_t xq_b = a->lut ? 0 : align64(M * a->Kp), xb_b = a->lut ? 0 : align64(M * a->nb * 4);
    char *p = (char *)buf;
    if (!p) { /* dimensions only */
        a->xq = NULL, a->xd = a->xsum = a->xf = NULL, a->xisum = NULL;
        return;
    }
    a->xq = (int8_t *)p;
    a->xd = (float *)(p + xq_b);
    a->xsum = (float *)(p + xq_b + xb_b);
    a->xisum = (int32_t *)(p + xq_b + 2 * xb_b);
    a->xf = (float *)(p + xq_b + 3 * xb_b);
}

void qn_qact_prepare_row(const qn_qact *a, int64_t m, const void *x, int xdtype) {
    if (a->lut) {
        float *xf = a->xf + m * a->Kp;
        for (int64_t k = 0; k < a->Kp; k++) xf[k] = k < a->K ? load_x(x, xdtype, k) : 0.0f;
    } else {
        qn_kernels.quant_act(a->xq + m * a->Kp, a->xd + m * a->nb, a->xsum + m * a->nb, a->xisum + m * a->nb, x,
                             xdtype, a->K, a->Kp, a->fb);
    }
}

void qn_qact_copy_row(const qn_qact *dst, int64_t m, const qn_qact *src, int64_t r) {
    if (src->lut) {
        memcpy(dst->xf + m * dst->Kp, src->xf + r * src->Kp, (size_t)src->Kp * 4);
        return;
    }
    memcpy(dst->xq + m * dst->Kp, src->xq + r * src->Kp, (size_t)src->Kp);
    memcpy(dst->xd + m * dst->nb, src->xd + r * src->nb, (size_t)src->nb * 4);
    memcpy(dst->xsum + m * dst->nb, src->xsum + r * src->nb, (size_t)src->nb * 4);
    memcpy(dst->xisum + m * dst->nb, src->xisum + r * src->nb, (size_t)src->nb * 4);
}

int qn_qact_same_layout(const qn_qact *a, const qn_qact *b) {
    return a->lut == b->lut && a->K == b->K && a->Kp == b->Kp && a->fb == b->fb;
}

/* Pulls the scale arrays of a tile's panels toward the L2. A one-row tile (decode) streams
 * its codes at memory speed while its scales arrive a few bytes per group from up to four
 * other arrays, too thin a stream for the hardware prefetcher: each new line would stall
 * the kernel (measured: 5-10% of a decode MoE block). */
static void prefetch_scales(const qn_qweight *w, const qn_qtile *t) {
    const qn_format *f = w->fmt;
    int64_t rows = (int64_t)t->np * QN_PANEL, sb = qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale);
    const char *arr[4] = {(const char *)t->scales, (const char *)t->offsets, (const char *)t->supers,
                          (const char *)t->super_mins};
    int64_t len[4] = {rows * t->n_groups * sb, rows * t->n_groups * qn_offset_bytes(f), rows * t->n_super * 2,
                      rows * t->n_super * 2};
    for (int j = 0; j < 4; j++)
        if (arr[j])
            for (int64_t b = 0; b < len[j]; b += 64) __builtin_prefetch(arr[j] + b, 0, 2);
}

void qn_qmatmul_tile(float *y, int64_t ldy, const qn_qweight *w, const qn_qact *a, int64_t m0, int64_t mr,
                     int64_t p0, int64_t np) {
    qn_qtile tile;
    qn_qtile_for_panels(&tile, w, p0, np);
    if (mr == 1) prefetch_scales(w, &tile);
    tile.xq = a->xq + m0 * a->Kp;
    tile.ldxq = a->Kp;
    tile.xd = a->xd + m0 * a->nb;
    tile.xsum = a->xsum + m0 * a->nb;
    tile.xisum = a->xisum + m0 * a->nb;
    tile.ldxb = a->nb;
    tile.fb = a->fb;
    tile.xf = a->xf + m0 * a->Kp;
    tile.ldxf = a->Kp;
    tile.mr = (int)mr;
    tile.y = y;
    tile.ldy = ldy;
    (a->lut ? qn_kernels.qtile_lut : qn_kernels.qtile_int)(&tile);
}

int64_t qn_qmatmul_workspace_size(const qn_qweight *w, int64_t M, int nthreads) {
    (void)nthreads;
    return qn_qact_bytes(w, M) + 64;
}

qn_status qn_qmatmul(float *QN_RESTRICT y, const qn_qweight *w, const void *x, int xdtype,
                     int64_t M, int64_t ldx, int64_t ldy, void *workspace, int64_t ws_bytes) {
    return qn_qmatmul_ahead(y, w, x, xdtype, M, ldx, ldy, workspace, ws_bytes, NULL, 0);
}

qn_status qn_qmatmul_ahead(float *QN_RESTRICT y, const qn_qweight *w, const void *x, int xdtype, int64_t M,
                           int64_t ldx, int64_t ldy, void *workspace, int64_t ws_bytes, const void *next,
                           int64_t next_bytes) {
    qn_status st = qn_format_check(w->fmt);
    if (st) return st;
    if ((st = qn_format_check_k(w->fmt, w->K))) return st;
    if (w->N <= 0) return qn_set_error(QN_EINVAL, "qmatmul: N must be positive");
    if (M < 0 || ldx < w->K || ldy < w->N)
        return qn_set_error(QN_EINVAL, "qmatmul: bad sizes M=%lld ldx=%lld ldy=%lld", (long long)M,
                            (long long)ldx, (long long)ldy);
    if (xdtype < QN_X_F32 || xdtype > QN_X_BF16)
        return qn_set_error(QN_EINVAL, "qmatmul: unknown x dtype %d", xdtype);
    if (M == 0) return QN_OK;
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_qmatmul_workspace_size(w, M, nth))
        return qn_set_error(QN_EINVAL, "qmatmul: workspace too small");
    int xsize = xdtype == QN_X_F32 ? 4 : 2;
    qn_qact act;
    qn_qact_init(&act, w, M, (void *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63));
    int64_t np_total = qn_npanels(w->N);
    int64_t n_pb = qn_ceil_div(np_total, QN_NP_BLOCK);
    int64_t n_mt = qn_ceil_div(M, QN_MTILE);
    int64_t n_tiles = n_pb * n_mt;

#pragma omp parallel num_threads(nth)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) qn_qact_prepare_row(&act, m, (const char *)x + m * ldx * xsize, xdtype);
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < n_tiles; t++) {
            int64_t pb = t / n_mt, mt = t % n_mt;
            int64_t p0 = pb * QN_NP_BLOCK, np = qn_min64(QN_NP_BLOCK, np_total - p0);
            int64_t m0 = mt * QN_MTILE, mr = qn_min64(QN_MTILE, M - m0);
            qn_qmatmul_tile(y + m0 * ldy + p0 * QN_PANEL, ldy, w, &act, m0, mr, p0, np);
            if (next) { /* this tile's share of the next weights, toward the L2 */
                const char *a = (const char *)next + next_bytes * t / n_tiles;
                const char *e = (const char *)next + next_bytes * (t + 1) / n_tiles;
                for (; a < e; a += 64) __builtin_prefetch(a, 0, 2);
            }
        }
    }
    return QN_OK;
}
