/* decoder.c — the fused decode step (see decoder.h). */
#include "decoder.h"

#include <string.h>

#include "act.h"
#include "attention.h"
#include "matmul.h"
#include "norm.h"
#include "qmatmul.h"
#include "rope.h"

static int64_t linear_ws(const qn_linear *l, int64_t M, int nthreads) {
    if (l->quantized) return qn_qmatmul_workspace_size(&l->qw, M, nthreads);
    return qn_matmul_workspace_size(M, l->N, l->K, 0, l->wdtype, nthreads);
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Scratch floats: qkv, q, k, v, qn, kn, attn, the normed input h, gate_up and act, B rows each. */
static int64_t scratch_floats(const qn_decoder_dims *d, int64_t B) {
    int64_t nq = d->H * d->hd, nkv = d->Hkv * d->hd;
    return B * ((nq + 2 * nkv) + (nq + 2 * nkv) + (nq + nkv) + nq + d->D + 3 * d->F);
}

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

int64_t qn_decoder_workspace_size(const qn_dense_layer *layers, const qn_decoder_dims *d, const qn_decoder_io *io,
                                  int nthreads) {
    const int64_t B = io->B;
    int64_t ws = 0;
    for (int64_t l = 0; l < d->L; l++) {
        const qn_dense_layer *ly = &layers[l];
        ws = max64(ws, linear_ws(&ly->qkv, B, nthreads));
        ws = max64(ws, linear_ws(&ly->o, B, nthreads));
        ws = max64(ws, linear_ws(&ly->gate_up, B, nthreads));
        ws = max64(ws, linear_ws(&ly->down, B, nthreads));
    }
    qn_paged_params p = {0};
    p.B = B; p.H = d->H; p.Hkv = d->Hkv; p.D = d->hd; p.n_blocks = io->n_blocks; p.bs = io->bs;
    p.max_blocks = io->max_blocks; p.kvdtype = io->kvdtype; p.tables = io->tables; p.seq_lens = io->seq_lens;
    ws = max64(ws, qn_paged_attention_workspace_size(&p, nthreads));
    return align64(ws) + align64(scratch_floats(d, B) * (int64_t)sizeof(float));
}

/* The bytes a linear reads (its codes, or its float rows): the region to prefetch ahead of it. */
static void linear_bytes(const qn_linear *l, const void **p, int64_t *n) {
    if (!l) { *p = NULL; *n = 0; return; }
    if (l->quantized) {
        const qn_format *f = l->qw.fmt;
        *p = l->qw.codes;
        *n = qn_npanels(l->N) * (qn_fmt_kpad(f, l->K) / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    } else {
        *p = l->w;
        *n = l->N * l->K * (l->wdtype == 0 ? 4 : 2);
    }
}

/* y = x W^T (+ bias); while it runs, the weights of `next` (may be NULL) are prefetched. */
static qn_status linear(const qn_linear *l, const float *x, int64_t M, float *y, void *ws, int64_t wsb,
                        const qn_linear *next) {
    qn_status st;
    const void *np;
    int64_t nb;
    linear_bytes(next, &np, &nb);
    if (l->quantized)
        st = qn_qmatmul_ahead(y, &l->qw, x, 0, M, l->K, l->N, ws, wsb, np, nb);
    else
        st = qn_matmul(y, x, 0, l->w, l->wdtype, M, l->N, l->K, l->K, l->K, l->N, ws, wsb);
    if (st || !l->bias) return st;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < l->N; n++) y[m * l->N + n] += l->bias[n];
    return QN_OK;
}

/* Stores n floats as the cache dtype. */
static void kv_store(void *dst, const float *src, int kvdtype, int64_t n) {
    if (kvdtype == 0) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (kvdtype == 1) {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++) o[i] = qn_f32_to_f16(src[i]);
    } else {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++) o[i] = qn_f32_to_bf16(src[i]);
    }
}

qn_status qn_decoder_step(const qn_dense_layer *layers, const qn_decoder_dims *d, const qn_decoder_io *io,
                          void *workspace, int64_t ws_bytes) {
    const int64_t B = io->B, D = d->D, H = d->H, Hkv = d->Hkv, hd = d->hd, F = d->F;
    const int64_t nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv;
    if (B <= 0 || io->kvdtype < 0 || io->kvdtype > 2)
        return qn_set_error(QN_EINVAL, "decoder_step: bad batch %lld or cache dtype %d", (long long)B, io->kvdtype);
    int64_t scratch = align64(scratch_floats(d, B) * (int64_t)sizeof(float));
    if (ws_bytes < scratch) return qn_set_error(QN_EINVAL, "decoder_step: workspace too small");
    float *qkv = workspace, *q = qkv + B * nqkv, *k = q + B * nq, *v = k + B * nkv;
    float *qn = v + B * nkv, *kn = qn + B * nq, *attn = kn + B * nkv, *hn = attn + B * nq;
    float *gu = hn + B * D, *act = gu + B * 2 * F;
    void *ws = (char *)workspace + scratch;
    int64_t wsb = ws_bytes - scratch;
    const int64_t isz = io->kvdtype == 0 ? 4 : 2;
    const int64_t layer_elems = io->n_blocks * io->bs * nkv;
    qn_status st;
    for (int64_t l = 0; l < d->L; l++) {
        const qn_dense_layer *ly = &layers[l];
        /* attention block; its input norm adds the pending delta into res first */
        if ((st = qn_rmsnorm(hn, io->res, io->delta, 0, ly->attn_norm, B, D, d->eps))) return st;
        if ((st = linear(&ly->qkv, hn, B, qkv, ws, wsb, &ly->o))) return st;
        for (int64_t b = 0; b < B; b++) {
            memcpy(q + b * nq, qkv + b * nqkv, (size_t)nq * sizeof(float));
            memcpy(k + b * nkv, qkv + b * nqkv + nq, (size_t)nkv * sizeof(float));
            memcpy(v + b * nkv, qkv + b * nqkv + nq + nkv, (size_t)nkv * sizeof(float));
        }
        float *qr = q, *kr = k;
        if (ly->qk_norm == 1) {
            if ((st = qn_rmsnorm(qn, NULL, q, 0, ly->q_norm, B * H, hd, d->eps))) return st;
            if ((st = qn_rmsnorm(kn, NULL, k, 0, ly->k_norm, B * Hkv, hd, d->eps))) return st;
            qr = qn; kr = kn;
        } else if (ly->qk_norm == 2) {
            if ((st = qn_rmsnorm(qn, NULL, q, 0, ly->q_norm, B, nq, d->eps))) return st;
            if ((st = qn_rmsnorm(kn, NULL, k, 0, ly->k_norm, B, nkv, d->eps))) return st;
            qr = qn; kr = kn;
        }
        if ((st = qn_rope(qr, io->positions, d->inv_freq, B, H, hd, d->rot, d->mscale, d->neox))) return st;
        if ((st = qn_rope(kr, io->positions, d->inv_freq, B, Hkv, hd, d->rot, d->mscale, d->neox))) return st;
        char *kc = (char *)io->k_cache + l * layer_elems * isz, *vc = (char *)io->v_cache + l * layer_elems * isz;
        for (int64_t b = 0; b < B; b++) {
            kv_store(kc + io->slots[b] * nkv * isz, kr + b * nkv, io->kvdtype, nkv);
            kv_store(vc + io->slots[b] * nkv * isz, v + b * nkv, io->kvdtype, nkv);
        }
        qn_paged_params pp = {attn, qr, kc, vc, NULL, NULL, 0, io->kvdtype, io->tables, io->seq_lens,
                              B, H, Hkv, hd, io->n_blocks, io->bs, io->max_blocks, d->attn_scale, 0.0f,
                              ly->window};
        if ((st = qn_paged_attention(&pp, ws, wsb))) return st;
        if ((st = linear(&ly->o, attn, B, io->delta, ws, wsb, &ly->gate_up))) return st;
        /* MLP block */
        if ((st = qn_rmsnorm(hn, io->res, io->delta, 0, ly->ffn_norm, B, D, d->eps))) return st;
        if ((st = linear(&ly->gate_up, hn, B, gu, ws, wsb, &ly->down))) return st;
        if ((st = qn_silu_mul_rows(act, gu, gu + F, B, F, F, 2 * F, 2 * F))) return st;
        if ((st = linear(&ly->down, act, B, io->delta, ws, wsb, l + 1 < d->L ? &layers[l + 1].qkv : NULL))) return st;
    }
    return QN_OK;
}
