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


#define QN_NP_BLOCK 4   /* panels per tile */
#define QN_MTILE 128    /* rows of x per tile */

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

typedef struct qm_plan {
    int64_t Kp, group, fb, nb, np_total;
    int64_t xq_bytes, xb_bytes, xf_bytes;
    int lut;
} qm_plan;

static inline int64_t align64(int64_t x) { return qn_round_up(x, 64); }

static qm_plan make_plan(const qn_qweight *w, int64_t M) {
    qm_plan pl;
    const qn_format *f = w->fmt;
    pl.Kp = qn_fmt_kpad(f, w->K);
    pl.group = qn_fmt_group(f, w->K);
    pl.fb = qn_min64(pl.group, QN_SUPER);
    pl.nb = qn_ceil_div(pl.Kp, pl.fb);
    pl.np_total = qn_npanels(w->N);
    pl.lut = f->kind == QN_LUT;
    pl.xq_bytes = pl.lut ? 0 : align64(M * pl.Kp);
    pl.xb_bytes = pl.lut ? 0 : align64(M * pl.nb * 4);
    pl.xf_bytes = pl.lut ? align64(M * pl.Kp * 4) : 0;
    return pl;
}

int64_t qn_qmatmul_workspace_size(const qn_qweight *w, int64_t M, int nthreads) {
    (void)nthreads;
    qm_plan pl = make_plan(w, M);
    return pl.xq_bytes + 3 * pl.xb_bytes + pl.xf_bytes + 64;
}


qn_status qn_qmatmul(float *QN_RESTRICT y, const qn_qweight *w, const void *x, int xdtype,
                     int64_t M, int64_t ldx, int64_t ldy, void *workspace, int64_t ws_bytes) {
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
    qm_plan pl = make_plan(w, M);
    if (ws_bytes < qn_qmatmul_workspace_size(w, M, nth))
        return qn_set_error(QN_EINVAL, "qmatmul: workspace too small");
    int xsize = xdtype == QN_X_F32 ? 4 : 2;
    char *wsp = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int8_t *xq = (int8_t *)wsp;
    float *xd = (float *)(wsp + pl.xq_bytes);
    float *xsum = (float *)(wsp + pl.xq_bytes + pl.xb_bytes);
    int32_t *xisum = (int32_t *)(wsp + pl.xq_bytes + 2 * pl.xb_bytes);
    float *xf = (float *)(wsp + pl.xq_bytes + 3 * pl.xb_bytes);
    int64_t n_pb = qn_ceil_div(pl.np_total, QN_NP_BLOCK);
    int64_t n_mt = qn_ceil_div(M, QN_MTILE);
    int64_t n_tiles = n_pb * n_mt;
    qn_dispatch kd = qn_kernels;
    qn_qtile_fn kern = pl.lut ? kd.qtile_lut : kd.qtile_int;

#pragma omp parallel num_threads(nth)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const char *xr = (const char *)x + m * ldx * xsize;
            if (pl.lut) {
                for (int64_t k = 0; k < pl.Kp; k++)
                    xf[m * pl.Kp + k] = k < w->K ? load_x(xr, xdtype, k) : 0.0f;
            } else {
                kd.quant_act(xq + m * pl.Kp, xd + m * pl.nb, xsum + m * pl.nb, xisum + m * pl.nb, xr,
                             xdtype, w->K, pl.Kp, pl.fb);
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            int64_t pb = t / n_mt, mt = t % n_mt;
            int64_t p0 = pb * QN_NP_BLOCK, np = qn_min64(QN_NP_BLOCK, pl.np_total - p0);
            int64_t m0 = mt * QN_MTILE, mr = qn_min64(QN_MTILE, M - m0);
            qn_qtile tile;
            qn_qtile_for_panels(&tile, w, p0, np);
            tile.xq = xq + m0 * pl.Kp;
            tile.ldxq = pl.Kp;
            tile.xd = xd + m0 * pl.nb;
            tile.xsum = xsum + m0 * pl.nb;
            tile.xisum = xisum + m0 * pl.nb;
            tile.ldxb = pl.nb;
            tile.fb = pl.fb;
            tile.xf = xf + m0 * pl.Kp;
            tile.ldxf = pl.Kp;
            tile.mr = (int)mr;
            tile.y = y + m0 * ldy + p0 * QN_PANEL;
            tile.ldy = ldy;
            kern(&tile);
        }
    }
    return QN_OK;
}
