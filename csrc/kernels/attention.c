/* attention.c — drivers and the scalar reference tile kernel for flash attention.
 *
 * Prefill: o[T, H, D] = softmax(mask(scale * q[T, H, D] k[S, Hkv, D]^T)) v[S, Hkv, D], per
 * sequence of a varlen batch; work items are (sequence, query tile of QN_ATTN_BQ, head),
 * run with `omp for schedule(dynamic)`: each item is computed by one thread in a fixed
 * order, so the result does not depend on the thread count.
 * Paged decode: q[B, H, D] against a block-table cache; each sequence's keys are cut into
 * splits of QN_ATTN_SPLIT (fixed); an item is one split for all heads (one tile of Hkv KV
 * heads x G query rows, reading the cache's blocks front to back), and a second parallel
 * loop merges the splits' (m, l, o) in split order.
 */
#include "attention.h"

#include <math.h>

#include "../dispatch.h"




static inline int64_t align64(int64_t bytes) { return qn_round_up(bytes, 64); }
static inline int64_t pad_dim(int64_t D) { return qn_round_up(D < 1 ? 1 : D, 16); }

static int kv_size(int dt) { return dt == QN_A_F32 ? 4 : (dt == QN_A_F16 || dt == QN_A_BF16) ? 2 : 1; }

static inline float load_el(const void *base, int dt, int64_t i) {
    switch (dt) {
    case QN_A_F16: return qn_f16_to_f32(((const uint16_t *)base)[i]);
    case QN_A_BF16: return qn_bf16_to_f32(((const uint16_t *)base)[i]);
    case QN_A_I8: return (float)((const int8_t *)base)[i];
    case QN_A_FP8: return qn_attn_fp8_to_f32(((const uint8_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

int64_t qn_attn_tile_scratch_floats(int64_t Dp, int64_t nh) {
    /* the decode kernels' int8 path also keeps int16 copies of q ([nh * BQ + 7, Dp rounded to 32])
       and the q rows' scales */
    int64_t i8 = (nh * QN_ATTN_BQ + 7) * qn_round_up(Dp, 32) / 2 + nh * QN_ATTN_BQ + 7;
    return 2 * nh * QN_ATTN_BK * Dp + QN_ATTN_BQ * QN_ATTN_BK + QN_ATTN_BQ + i8 + 16;
}

/* ---- reference tile kernel: one row at a time, one key at a time ---- */

/* Element d of key (or value) j of the tile's head, dequantized. */
static float kv_at(const qn_attn_tile *t, const void *base, const float *sc, int64_t j, int64_t d) {
    int64_t page = t->table ? t->table[j / t->bs] : 0, row = t->table ? j % t->bs : j;
    float x = load_el(base, t->kvdtype, page * t->ld_page + row * t->ld_tok + d);
    return sc ? x * sc[page * t->ld_scale] : x;
}

void qn_attn_tile_ref(const qn_attn_tile *t) {
    for (int hh = 0; hh < t->nh; hh++) {
        qn_attn_tile th = *t; /* the same tile, for head hh alone */
        th.k = (const char *)t->k + hh * t->ld_head * kv_size(t->kvdtype);
        th.v = (const char *)t->v + hh * t->ld_head * kv_size(t->kvdtype);
        th.kscale = t->kscale ? t->kscale + hh : NULL;
        th.vscale = t->vscale ? t->vscale + hh : NULL;
        for (int r = 0; r < t->R; r++) {
            int64_t row = (int64_t)hh * t->R + r;
            const float *q = t->q + row * t->Dp;
            float *o = t->o + row * t->Dp;
            float m = -INFINITY, l = 0.0f;
            for (int64_t d = 0; d < t->Dp; d++) o[d] = 0.0f;
            int64_t ja = qn_max64(t->lo[row], t->j0), jz = qn_min64(t->hi[row], t->j1);
            for (int64_t j = ja; j < jz; j++) {
                float s = 0.0f;
                for (int64_t d = 0; d < t->D; d++) s = fmaf(q[d], kv_at(&th, th.k, th.kscale, j, d), s);
                if (t->softcap > 0.0f) s = t->softcap * tanhf(s / t->softcap);
                if (s > m) { /* new running max: rescale what was summed so far */
                    float alpha = expf(m - s);
                    for (int64_t d = 0; d < t->D; d++) o[d] *= alpha;
                    l *= alpha;
                    m = s;
                }
                float p = expf(s - m);
                l += p;
                for (int64_t d = 0; d < t->D; d++) o[d] = fmaf(p, kv_at(&th, th.v, th.vscale, j, d), o[d]);
            }
            t->m[row] = m;
            t->l[row] = l;
        }
    }
}

/* ---- prefill driver ---- */

/* Per-thread buffers: Qf[BQ, Dp], O[BQ, Dp], m, l [BQ], lo, hi [BQ] int64, tile scratch. */
static int64_t prefill_thread_bytes(int64_t Dp) {
    return align64(2 * QN_ATTN_BQ * Dp * 4) + align64(2 * QN_ATTN_BQ * 4) + align64(2 * QN_ATTN_BQ * 8) +
           align64(qn_attn_tile_scratch_floats(Dp, 1) * 4);
}

int64_t qn_attention_workspace_size(const qn_attn_params *p, int nthreads) {
    int64_t nseq = p->cu_q ? p->n_seq : 1;
    return align64((nseq + 1) * 8) + (int64_t)(nthreads < 1 ? 1 : nthreads) * prefill_thread_bytes(pad_dim(p->D)) + 64;
}

static qn_status check_cu(const int32_t *cu, int64_t n_seq, int64_t total, const char *name) {
    if (cu[0] != 0) return qn_set_error(QN_EINVAL, "attention: %s[0] must be 0, got %d", name, cu[0]);
    for (int64_t s = 0; s < n_seq; s++)
        if (cu[s + 1] < cu[s])
            return qn_set_error(QN_EINVAL, "attention: %s must be non-decreasing, got %s[%lld] = %d < %s[%lld] = %d",
                                name, name, (long long)(s + 1), cu[s + 1], name, (long long)s, cu[s]);
    if (cu[n_seq] != total)
        return qn_set_error(QN_EINVAL, "attention: %s[-1] must equal the number of tokens %lld, got %d", name,
                            (long long)total, cu[n_seq]);
    return QN_OK;
}

static void fill_tile_kv(qn_attn_tile *t, const void *k, const void *v, int kvdtype, int64_t offset_el) {
    int es = kv_size(kvdtype);
    t->k = (const char *)k + offset_el * es;
    t->v = (const char *)v + offset_el * es;
    t->kvdtype = kvdtype;
}

qn_status qn_attention(const qn_attn_params *p, void *workspace, int64_t ws_bytes) {
    if (p->T < 0 || p->S < 0 || p->H <= 0 || p->Hkv <= 0 || p->D <= 0 || p->H % p->Hkv)
        return qn_set_error(QN_EINVAL, "attention: bad sizes T=%lld S=%lld H=%lld Hkv=%lld D=%lld (H %% Hkv must be 0)",
                            (long long)p->T, (long long)p->S, (long long)p->H, (long long)p->Hkv, (long long)p->D);
    if (p->qdtype < QN_A_F32 || p->qdtype > QN_A_BF16 || p->kvdtype < QN_A_F32 || p->kvdtype > QN_A_BF16)
        return qn_set_error(QN_EINVAL, "attention: q, k, v must be float32, float16 or bfloat16");
    if ((p->cu_q == NULL) != (p->cu_k == NULL) || (p->cu_q && p->n_seq < 0))
        return qn_set_error(QN_EINVAL, "attention: cu_seqlens_q and cu_seqlens_k must be given together");
    if (!(p->scale == p->scale) || !(p->softcap == p->softcap))
        return qn_set_error(QN_EINVAL, "attention: scale and softcap must not be NaN");
    int64_t nseq = p->cu_q ? p->n_seq : 1;
    qn_status st;
    if (p->cu_q) {
        if ((st = check_cu(p->cu_q, nseq, p->T, "cu_seqlens_q"))) return st;
        if ((st = check_cu(p->cu_k, nseq, p->S, "cu_seqlens_k"))) return st;
    }
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_attention_workspace_size(p, nth)) return qn_set_error(QN_EINVAL, "attention: workspace too small");
    if (p->T == 0) return QN_OK;
    const int64_t H = p->H, D = p->D, Dp = pad_dim(D), G = p->H / p->Hkv, Hkv = p->Hkv;
    char *wsp = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int64_t *first = (int64_t *)wsp; /* first[s]: index of sequence s's first work item */
    char *thr = wsp + align64((nseq + 1) * 8);
    int64_t tb = prefill_thread_bytes(Dp);
    first[0] = 0;
    for (int64_t s = 0; s < nseq; s++) {
        int64_t Tq = p->cu_q ? p->cu_q[s + 1] - p->cu_q[s] : p->T;
        first[s + 1] = first[s] + qn_ceil_div(Tq, QN_ATTN_BQ) * H;
    }
    int64_t n_items = first[nseq];
    qn_attn_tile_fn kern = qn_kernels.attn_tile;
    const int qsz = kv_size(p->qdtype);

#pragma omp parallel num_threads(nth)
    {
        char *mine = thr + qn_omp_thread_id() * tb;
        float *Qf = (float *)mine, *O = Qf + QN_ATTN_BQ * Dp;
        float *m = (float *)(mine + align64(2 * QN_ATTN_BQ * Dp * 4)), *l = m + QN_ATTN_BQ;
        int64_t *lo = (int64_t *)((char *)m + align64(2 * QN_ATTN_BQ * 4)), *hi = lo + QN_ATTN_BQ;
        float *scratch = (float *)((char *)lo + align64(2 * QN_ATTN_BQ * 8));
        memset(Qf, 0, (size_t)(QN_ATTN_BQ * Dp * 4));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            int64_t s = 0; /* the sequence of item it: binary search in first[] */
            for (int64_t a = 0, b = nseq; a < b;) {
                int64_t c = (a + b) / 2;
                if (first[c + 1] <= it) a = c + 1; else { b = c; s = c; }
            }
            int64_t qs = p->cu_q ? p->cu_q[s] : 0, ks = p->cu_k ? p->cu_k[s] : 0;
            int64_t Tq = p->cu_q ? p->cu_q[s + 1] - qs : p->T, Sk = p->cu_k ? p->cu_k[s + 1] - ks : p->S;
            int64_t local = it - first[s], h = local % H, i0 = (local / H) * QN_ATTN_BQ;
            int R = (int)qn_min64(QN_ATTN_BQ, Tq - i0);
            int64_t j0 = Sk, j1 = 0;
            for (int r = 0; r < R; r++) {
                int64_t pos = i0 + r + Sk - Tq, a = 0, b = Sk;
                if (p->causal) b = qn_min64(b, pos + 1);
                if (p->window >= 0) {
                    a = qn_max64(a, pos - p->window);
                    if (!p->causal) b = qn_min64(b, pos + p->window + 1);
                }
                lo[r] = a;
                hi[r] = b;
                if (a < b) { j0 = qn_min64(j0, a); j1 = qn_max64(j1, b); }
                const char *qr = (const char *)p->q + ((qs + i0 + r) * H + h) * D * qsz;
                for (int64_t d = 0; d < D; d++) Qf[r * Dp + d] = load_el(qr, p->qdtype, d) * p->scale;
            }
            if (j0 >= j1) j0 = j1 = 0;
            qn_attn_tile t;
            memset(&t, 0, sizeof t);
            t.q = Qf; t.o = O; t.m = m; t.l = l; t.lo = lo; t.hi = hi;
            t.R = R; t.nh = 1; t.ld_head = D; t.D = D; t.Dp = Dp; t.j0 = j0; t.j1 = j1;
            fill_tile_kv(&t, p->k, p->v, p->kvdtype, (ks * Hkv + h / G) * D);
            t.table = NULL; t.bs = Sk > 0 ? Sk : 1; t.ld_tok = Hkv * D; t.ld_page = 0;
            t.softcap = p->softcap > 0.0f ? p->softcap : 0.0f;
            t.scratch = scratch;
            kern(&t);
            for (int r = 0; r < R; r++) {
                float *orow = p->o + ((qs + i0 + r) * H + h) * D;
                float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                for (int64_t d = 0; d < D; d++) orow[d] = O[r * Dp + d] * inv;
            }
        }
    }
    return QN_OK;
}

/* ---- paged decode driver ---- */

/* Rows of one decode tile: all H heads (nh = Hkv heads of G rows) when G <= BQ, so the
 * cache's [bs, Hkv, D] blocks are read front to back; else BQ rows of one KV head. */
static int64_t paged_tile_rows(int64_t H, int64_t G) { return G <= QN_ATTN_BQ ? H : QN_ATTN_BQ; }

static int64_t paged_thread_bytes(int64_t Dp, int64_t rows, int64_t nh) {
    return align64((rows + 4) * Dp * 4) + align64(2 * rows * 8) + align64(qn_attn_tile_scratch_floats(Dp, nh) * 4);
}

/* Splits of sequence b (0 when it is empty or its length is invalid). */
static int64_t n_splits(const qn_paged_params *p, int64_t b) {
    int64_t len = qn_min64(p->seq_lens[b], p->max_blocks * p->bs); /* beyond: rejected before use */
    return len > 0 ? qn_ceil_div(len, QN_ATTN_SPLIT) : 0;
}

int64_t qn_paged_attention_workspace_size(const qn_paged_params *p, int nthreads) {
    int64_t P = 0, Dp = pad_dim(p->D);
    for (int64_t b = 0; b < p->B; b++) P += n_splits(p, b);
    int64_t G = p->Hkv > 0 && p->H % p->Hkv == 0 ? p->H / p->Hkv : p->H, Hkv = p->Hkv > 0 ? p->Hkv : 1;
    int64_t rows = paged_tile_rows(p->H, G), nh = G <= QN_ATTN_BQ ? Hkv : 1;
    return align64((p->B + 1) * 8) + align64(P * p->H * Dp * 4) + 2 * align64(P * p->H * 4) +
           (int64_t)(nthreads < 1 ? 1 : nthreads) * paged_thread_bytes(Dp, rows, nh) + 64;
}

qn_status qn_paged_attention(const qn_paged_params *p, void *workspace, int64_t ws_bytes) {
    if (p->B < 0 || p->H <= 0 || p->Hkv <= 0 || p->D <= 0 || p->H % p->Hkv || p->n_blocks < 0 || p->bs <= 0 ||
        p->max_blocks < 0)
        return qn_set_error(QN_EINVAL, "paged_attention: bad sizes B=%lld H=%lld Hkv=%lld D=%lld block_size=%lld "
                            "(H %% Hkv must be 0)", (long long)p->B, (long long)p->H, (long long)p->Hkv,
                            (long long)p->D, (long long)p->bs);
    if (p->qdtype < QN_A_F32 || p->qdtype > QN_A_BF16 || p->kvdtype < QN_A_F32 || p->kvdtype > QN_A_FP8)
        return qn_set_error(QN_EINVAL, "paged_attention: unsupported q or cache dtype");
    if ((p->kvdtype >= QN_A_I8) != (p->kscale != NULL && p->vscale != NULL))
        return qn_set_error(QN_EINVAL, "paged_attention: int8 / fp8 caches need k and v scales, float caches none");
    for (int64_t b = 0; b < p->B; b++) {
        int64_t len = p->seq_lens[b];
        if (len < 0 || len > p->max_blocks * p->bs)
            return qn_set_error(QN_EINVAL, "paged_attention: seq_lens[%lld] = %lld is outside [0, %lld] "
                                "(max_blocks * block_size)", (long long)b, (long long)len,
                                (long long)(p->max_blocks * p->bs));
        for (int64_t i = 0; i < qn_ceil_div(len, p->bs); i++) {
            int32_t id = p->tables[b * p->max_blocks + i];
            if (id < 0 || id >= p->n_blocks)
                return qn_set_error(QN_EINVAL, "paged_attention: block_tables[%lld, %lld] = %d is outside [0, %lld)",
                                    (long long)b, (long long)i, id, (long long)p->n_blocks);
        }
    }
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_paged_attention_workspace_size(p, nth))
        return qn_set_error(QN_EINVAL, "paged_attention: workspace too small");
    if (p->B == 0) return QN_OK;
    const int64_t H = p->H, D = p->D, Dp = pad_dim(D), Hkv = p->Hkv, G = H / Hkv;
    const int64_t rows = paged_tile_rows(H, G), nh = G <= QN_ATTN_BQ ? Hkv : 1;
    const int64_t n_hg = Hkv / nh, n_rt = qn_ceil_div(G, QN_ATTN_BQ);
    char *wsp = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int64_t *first = (int64_t *)wsp; /* first[b]: global index of sequence b's first split */
    first[0] = 0;
    for (int64_t b = 0; b < p->B; b++) first[b + 1] = first[b] + n_splits(p, b);
    int64_t P = first[p->B];
    float *Opart = (float *)(wsp + align64((p->B + 1) * 8));  /* [P, H, Dp] */
    float *mpart = (float *)((char *)Opart + align64(P * H * Dp * 4)); /* [P, H] */
    float *lpart = (float *)((char *)mpart + align64(P * H * 4));      /* [P, H] */
    char *thr = (char *)lpart + align64(P * H * 4);
    int64_t tb = paged_thread_bytes(Dp, rows, nh);
    int64_t n_items = P * n_hg * n_rt;
    qn_attn_tile_fn kern = qn_kernels.attn_decode;
    const int qsz = kv_size(p->qdtype);

#pragma omp parallel num_threads(nth)
    {
        char *mine = thr + qn_omp_thread_id() * tb;
        float *Qf = (float *)mine;
        int64_t *lo = (int64_t *)(mine + align64((rows + 4) * Dp * 4)), *hi = lo + rows;
        float *scratch = (float *)((char *)lo + align64(2 * rows * 8));
        memset(Qf, 0, (size_t)((rows + 4) * Dp * 4));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            int64_t gs = it / (n_hg * n_rt), hk = ((it / n_rt) % n_hg) * nh, rt = it % n_rt;
            int64_t b = 0; /* the sequence that owns split gs */
            for (int64_t a = 0, z = p->B; a < z;) {
                int64_t c = (a + z) / 2;
                if (first[c + 1] <= gs) a = c + 1; else { z = c; b = c; }
            }
            int64_t len = p->seq_lens[b], sp = gs - first[b];
            int64_t h0 = hk * G + rt * QN_ATTN_BQ;
            int R = (int)qn_min64(QN_ATTN_BQ, G - rt * QN_ATTN_BQ);
            for (int64_t r = 0; r < nh * R; r++) { /* heads h0 .. h0 + nh * R are contiguous */
                const char *qr = (const char *)p->q + ((b * H) + h0 + r) * D * qsz;
                for (int64_t d = 0; d < D; d++) Qf[r * Dp + d] = load_el(qr, p->qdtype, d) * p->scale;
                lo[r] = p->window >= 0 ? qn_max64(0, len - 1 - p->window) : 0;
                hi[r] = len;
            }
            qn_attn_tile t;
            memset(&t, 0, sizeof t);
            t.q = Qf;
            t.o = Opart + (gs * H + h0) * Dp;
            t.m = mpart + gs * H + h0;
            t.l = lpart + gs * H + h0;
            t.lo = lo; t.hi = hi;
            t.R = R; t.nh = (int)nh; t.ld_head = D;
            t.D = D; t.Dp = Dp;
            t.j0 = sp * QN_ATTN_SPLIT;
            t.j1 = qn_min64(len, t.j0 + QN_ATTN_SPLIT);
            fill_tile_kv(&t, p->k, p->v, p->kvdtype, hk * D);
            t.table = p->tables + b * p->max_blocks;
            t.bs = p->bs; t.ld_tok = Hkv * D; t.ld_page = p->bs * Hkv * D;
            t.kscale = p->kscale ? p->kscale + hk : NULL;
            t.vscale = p->vscale ? p->vscale + hk : NULL;
            t.ld_scale = Hkv;
            t.softcap = p->softcap > 0.0f ? p->softcap : 0.0f;
            t.scratch = scratch;
            kern(&t);
        }
        /* merge the splits of each (sequence, head) in split order */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < p->B * H; bh++) {
            int64_t b = bh / H, h = bh % H;
            float *orow = p->o + bh * D;
            float M = -INFINITY, L = 0.0f;
            for (int64_t s = first[b]; s < first[b + 1]; s++) M = fmaxf(M, mpart[s * H + h]);
            for (int64_t d = 0; d < D; d++) orow[d] = 0.0f;
            if (M == -INFINITY) continue;
            for (int64_t s = first[b]; s < first[b + 1]; s++) {
                float ms = mpart[s * H + h];
                if (ms == -INFINITY) continue;
                float w = expf(ms - M);
                L = fmaf(w, lpart[s * H + h], L);
                const float *os = Opart + (s * H + h) * Dp;
                for (int64_t d = 0; d < D; d++) orow[d] = fmaf(w, os[d], orow[d]);
            }
            float inv = L > 0.0f ? 1.0f / L : 0.0f;
            for (int64_t d = 0; d < D; d++) orow[d] *= inv;
        }
    }
    return QN_OK;
}
