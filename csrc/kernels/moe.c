/* moe.c — Mixture-of-Experts: routing (top-k over softmax / sigmoid scores) and the
 * grouped expert MLPs with a deterministic weighted combine.
 *
 * Routing is scalar per token (E <= a few hundred: the exps dominate), tokens split over
 * OpenMP threads. The expert part permutes (token, slot) pairs by expert with counts and
 * prefix sums (stable in token order) and runs all active experts in one parallel region:
 * x is quantized once per token; the gate/up tiles of every active expert ((expert, panel
 * block, row tile) items, qn_qmatmul's tiles) are split over the threads in one loop, the
 * down tiles in a second, then weight * row is added into y, experts in id order. Prefill
 * runs in passes of at most QN_MOE_ROWS rows. No allocation: scratch comes from the caller.
 */
#include "moe.h"

#include <math.h>

#include "act.h"
#include "qmatmul.h"


static inline int64_t align64(int64_t x) { return qn_round_up(x, 64); }



static inline float load_logit(const void *l, int dt, int64_t e) {
    switch (dt) {
    case QN_X_F16: return qn_f16_to_f32(((const uint16_t *)l)[e]);
    case QN_X_BF16: return qn_bf16_to_f32(((const uint16_t *)l)[e]);
    default: return ((const float *)l)[e];
    }
}

/* ---- routing ---- */

/* Per-thread scratch: score[E], key[E], selkey[E] floats, sel[E] int32, allowed[E] bytes. */
static int64_t route_scratch_bytes(int64_t E) { return align64(E * 4) * 4 + align64(E); }

int64_t qn_moe_route_workspace_size(int64_t E, int nthreads) {
    return route_scratch_bytes(E) * (nthreads < 1 ? 1 : nthreads) + 64;
}

/* Inserts (v, e) into the list sel/selkey of length *n (capacity k), sorted by descending
 * key; equal keys keep the earlier (lower id) entry first because ids arrive ascending. */
static inline void topk_insert(int32_t *sel, float *selkey, int64_t *n, int64_t k, float v, int32_t e) {
    int64_t pos;
    if (*n < k) {
        pos = (*n)++;
    } else {
        if (!(v > selkey[k - 1])) return;
        pos = k - 1;
    }
    while (pos > 0 && v > selkey[pos - 1]) {
        sel[pos] = sel[pos - 1];
        selkey[pos] = selkey[pos - 1];
        pos--;
    }
    sel[pos] = e;
    selkey[pos] = v;
}

static void route_token(float *w, int32_t *id, const void *lrow, int dt, int64_t E, const qn_moe_route_params *p,
                        char *scratch) {
    float *score = (float *)scratch, *key = (float *)(scratch + align64(E * 4));
    float *selkey = (float *)(scratch + 2 * align64(E * 4));
    int32_t *sel = (int32_t *)(scratch + 3 * align64(E * 4));
    uint8_t *allowed = (uint8_t *)(scratch + 4 * align64(E * 4));
    int64_t k = p->top_k;
    int grouped = p->n_group > 1;

    for (int64_t e = 0; e < E; e++) key[e] = load_logit(lrow, dt, e);
    if (p->scoring == QN_MOE_SOFTMAX) {
        float mx = key[0];
        for (int64_t e = 1; e < E; e++) mx = key[e] > mx ? key[e] : mx;
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            score[e] = expf(key[e] - mx);
            sum += score[e];
        }
        for (int64_t e = 0; e < E; e++) score[e] = score[e] / sum;
    } else {
        for (int64_t e = 0; e < E; e++) score[e] = 1.0f / (1.0f + expf(-key[e]));
    }
    /* the logits order the experts exactly as the scores do, without rounding ties */
    if (p->bias || grouped)
        for (int64_t e = 0; e < E; e++) key[e] = p->bias ? score[e] + p->bias[e] : score[e];

    for (int64_t e = 0; e < E; e++) allowed[e] = 1;
    if (grouped) {
        int64_t gs = E / p->n_group;
        /* group key = sum of the two largest keys of the group, into selkey[0 .. n_group) */
        for (int64_t g = 0; g < p->n_group; g++) {
            int32_t top[2];
            float topv[2];
            int64_t n = 0;
            for (int64_t e = g * gs; e < (g + 1) * gs; e++) topk_insert(top, topv, &n, 2, key[e], (int32_t)e);
            selkey[g] = n == 2 ? topv[0] + topv[1] : topv[0];
        }
        /* choose topk_group groups: repeated arg-max, ties to the lower group id */
        for (int64_t e = 0; e < E; e++) allowed[e] = 0;
        for (int64_t r = 0; r < p->topk_group; r++) {
            int64_t best = -1;
            for (int64_t g = 0; g < p->n_group; g++) {
                if (allowed[g * gs]) continue;
                if (best < 0 || selkey[g] > selkey[best]) best = g;
            }
            for (int64_t e = best * gs; e < (best + 1) * gs; e++) allowed[e] = 1;
        }
    }

    int64_t n = 0;
    for (int64_t e = 0; e < E; e++)
        if (allowed[e]) topk_insert(sel, selkey, &n, k, key[e], (int32_t)e);

    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        w[j] = score[sel[j]];
        sum += w[j];
    }
    for (int64_t j = 0; j < k; j++) {
        if (p->renormalize && sum > 0.0f) w[j] = w[j] / sum;
        w[j] = w[j] * p->routed_scaling;
        id[j] = sel[j];
    }
    /* by descending weight, ties by id (the bias may order the selection differently) */
    for (int64_t j = 1; j < k; j++) {
        float v = w[j];
        int32_t e = id[j];
        int64_t i = j;
        while (i > 0 && (v > w[i - 1] || (v == w[i - 1] && e < id[i - 1]))) {
            w[i] = w[i - 1];
            id[i] = id[i - 1];
            i--;
        }
        w[i] = v;
        id[i] = e;
    }
}

qn_status qn_moe_route(float *QN_RESTRICT weights, int32_t *QN_RESTRICT ids, const void *logits, int ldtype,
                       int64_t T, int64_t E, int64_t ldl, const qn_moe_route_params *p, void *workspace,
                       int64_t ws_bytes) {
    if (E < 1 || T < 0 || (T > 1 && ldl < E))
        return qn_set_error(QN_EINVAL, "moe_route: bad sizes T=%lld E=%lld ldl=%lld", (long long)T, (long long)E,
                            (long long)ldl);
    if (ldtype < QN_X_F32 || ldtype > QN_X_BF16)
        return qn_set_error(QN_EINVAL, "moe_route: unknown logits dtype %d", ldtype);
    if (p->scoring != QN_MOE_SOFTMAX && p->scoring != QN_MOE_SIGMOID)
        return qn_set_error(QN_EINVAL, "moe_route: scoring must be softmax (0) or sigmoid (1), got %d", p->scoring);
    if (p->top_k < 1 || p->top_k > E)
        return qn_set_error(QN_EINVAL, "moe_route: top_k must be in 1..%lld, got %lld", (long long)E,
                            (long long)p->top_k);
    if (p->n_group > 1) {
        if (E % p->n_group)
            return qn_set_error(QN_EINVAL, "moe_route: n_group=%lld must divide E=%lld", (long long)p->n_group,
                                (long long)E);
        if (p->topk_group < 1 || p->topk_group > p->n_group)
            return qn_set_error(QN_EINVAL, "moe_route: topk_group must be in 1..%lld, got %lld",
                                (long long)p->n_group, (long long)p->topk_group);
        if (p->top_k > p->topk_group * (E / p->n_group))
            return qn_set_error(QN_EINVAL, "moe_route: top_k=%lld exceeds the %lld experts of topk_group=%lld groups",
                                (long long)p->top_k, (long long)(p->topk_group * (E / p->n_group)),
                                (long long)p->topk_group);
    } else if (p->n_group < 0) {
        return qn_set_error(QN_EINVAL, "moe_route: n_group must be >= 0, got %lld", (long long)p->n_group);
    }
    if (T == 0) return QN_OK;
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_moe_route_workspace_size(E, nth))
        return qn_set_error(QN_EINVAL, "moe_route: workspace too small");
    char *wsp = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int64_t sb = route_scratch_bytes(E), k = p->top_k;
    int xsize = ldtype == QN_X_F32 ? 4 : 2;
#pragma omp parallel num_threads(nth) if (T * E >= 4096)
    {
        char *scratch = wsp + qn_omp_thread_id() * sb;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            route_token(weights + t * k, ids + t * k, (const char *)logits + t * ldl * xsize, ldtype, E, p, scratch);
    }
    return QN_OK;
}

/* ---- experts ---- */

/* Rows ((token, slot) pairs) one grouped pass holds: all of a decode step's, at most
 * QN_MOE_ROWS for prefill (but never fewer than T, the most one expert can have). */
#define QN_MOE_ROWS 512

typedef struct moe_plan {
    int64_t R;                                     /* rows per pass */
    int share_up;                                  /* up takes gate's prepared x */
    int64_t counts_b, offs_b, stamp_b, rows_b, rw_b, act_b, cum_b;
    int64_t xg_b, xu_b, ag_b, au_b, ad_b, g_b, u_b, o_b, sg_b, qws_b;
} moe_plan;

static int64_t qws_shared(const qn_moe_shared *sh, int64_t T, int nth) {
    if (!sh) return 0;
    int64_t m = qn_max64(qn_qmatmul_workspace_size(sh->gate, T, nth), qn_qmatmul_workspace_size(sh->up, T, nth));
    return qn_max64(m, qn_qmatmul_workspace_size(sh->down, T, nth));
}

static moe_plan make_plan(const qn_moe_experts *ex, const qn_moe_shared *sh, int64_t T, int64_t k, int nth) {
    moe_plan pl;
    qn_qact ag, au;
    pl.R = qn_max64(T, qn_min64(T * k, QN_MOE_ROWS));
    qn_qact_init(&ag, &ex->gate[0], 1, NULL);
    qn_qact_init(&au, &ex->up[0], 1, NULL);
    pl.share_up = qn_qact_same_layout(&ag, &au);
    pl.counts_b = align64(ex->E * 8);
    pl.offs_b = align64((ex->E + 1) * 8);
    pl.stamp_b = align64(ex->E * 8);
    pl.rows_b = align64(T * k * 4);
    pl.rw_b = align64(T * k * 4);
    pl.act_b = align64(ex->E * 8);
    pl.cum_b = 3 * align64((ex->E + 1) * 8); /* cum_gu, cum_dn, pass starts */
    pl.xg_b = qn_qact_bytes(&ex->gate[0], T);
    pl.xu_b = pl.share_up ? 0 : qn_qact_bytes(&ex->up[0], T);
    pl.ag_b = qn_qact_bytes(&ex->gate[0], pl.R);
    pl.au_b = pl.share_up ? 0 : qn_qact_bytes(&ex->up[0], pl.R);
    pl.ad_b = qn_qact_bytes(&ex->down[0], pl.R);
    pl.g_b = align64(qn_max64(pl.R * ex->ffn, sh ? T * sh->ffn : 0) * 4);
    pl.u_b = pl.g_b;
    pl.o_b = align64(pl.R * ex->d * 4);
    pl.sg_b = align64(T * 4);
    pl.qws_b = align64(qws_shared(sh, T, nth));
    return pl;
}

int64_t qn_moe_workspace_size(const qn_moe_experts *ex, const qn_moe_shared *sh, int64_t T, int64_t k,
                              int nthreads) {
    moe_plan pl = make_plan(ex, sh, T, k, nthreads);
    return pl.counts_b + pl.offs_b + pl.stamp_b + pl.rows_b + pl.rw_b + pl.act_b + pl.cum_b + pl.xg_b + pl.xu_b +
           pl.ag_b + pl.au_b + pl.ad_b + pl.g_b + pl.u_b + pl.o_b + pl.sg_b + pl.qws_b + 64;
}

static qn_status check_qw(const qn_qweight *w, int64_t N, int64_t K, const char *what, int64_t e,
                          const qn_format *fmt0) {
    if (!w->fmt || !w->codes || !w->scales)
        return qn_set_error(QN_EINVAL, "moe: %s[%lld] is missing its arrays", what, (long long)e);
    if (w->N != N || w->K != K)
        return qn_set_error(QN_EINVAL, "moe: %s[%lld] must have shape (%lld, %lld), got (%lld, %lld)", what,
                            (long long)e, (long long)N, (long long)K, (long long)w->N, (long long)w->K);
    if (w->fmt == fmt0 && e > 0) return QN_OK; /* the format was checked with expert 0 */
    if (fmt0 && memcmp(w->fmt, fmt0, sizeof *fmt0) != 0)
        return qn_set_error(QN_EINVAL, "moe: %s[%lld] has a different format from %s[0]", what, (long long)e, what);
    qn_status st = qn_format_check(w->fmt);
    if (!st) st = qn_format_check_k(w->fmt, K);
    return st;
}

/* out[c, N] = the expert MLP of rows xg[c, d] (dtype xdtype, row stride ldx). */
static qn_status expert_mlp(float *out, const void *xg, int xdtype, int64_t ldx, int64_t c, const qn_qweight *gate,
                            const qn_qweight *up, const qn_qweight *down, int64_t ffn, float *G, float *U, void *qws,
                            int64_t qws_b) {
    qn_status st = qn_qmatmul(G, gate, xg, xdtype, c, ldx, ffn, qws, qws_b);
    if (!st) st = qn_qmatmul(U, up, xg, xdtype, c, ldx, ffn, qws, qws_b);
    if (!st) st = qn_silu_mul_rows(G, G, U, c, ffn, ffn, ffn, ffn);
    if (!st) st = qn_qmatmul(out, down, G, QN_X_F32, c, ffn, down->N, qws, qws_b);
    return st;
}

/* One grouped pass over the routed experts, run by every thread of the enclosing parallel
 * region. A pass holds the active experts act[0 .. na) whose rows (the (token, slot) pairs
 * offs[e] .. offs[e + 1]) lie in offs[act[0]] .. + R. Work items are (expert, panel block,
 * row tile) as in qn_qmatmul: item i belongs to expert act[j] with cum[j] <= i < cum[j + 1]. */
typedef struct moe_pass {
    const int32_t *act;             /* [na] expert ids, ascending */
    const int64_t *offs, *counts;   /* [E + 1], [E] */
    int64_t na, row0;
} moe_pass;

static inline int64_t item_expert(const int64_t *cum, int64_t na, int64_t i) {
    int64_t lo = 0, hi = na - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (cum[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Item i of a phase over a matrix of np_total panels: expert slot j, panels p0 .. p0 + np,
 * rows m0 .. m0 + mr of the pass (relative to its first row). */
static inline void item_coords(const moe_pass *ps, const int64_t *cum, int64_t np_total, int64_t i, int64_t *e,
                               int64_t *p0, int64_t *np, int64_t *m0, int64_t *mr) {
    int64_t j = item_expert(cum, ps->na, i), ee = ps->act[j];
    int64_t c = ps->counts[ee], n_mt = qn_ceil_div(c, QN_MTILE), r = i - cum[j];
    int64_t pb = r / n_mt, mt = r % n_mt;
    *e = ee;
    *p0 = pb * QN_NP_BLOCK;
    *np = qn_min64(QN_NP_BLOCK, np_total - *p0);
    *m0 = ps->offs[ee] - ps->row0 + mt * QN_MTILE;
    *mr = qn_min64(QN_MTILE, c - mt * QN_MTILE);
}

qn_status qn_moe_experts_apply(float *QN_RESTRICT y, int64_t *counts_out, const void *x, int xdtype,
                               const int32_t *ids, const float *weights, int64_t T, int64_t k, int64_t ldx,
                               int64_t ldy, const qn_moe_experts *ex, const qn_moe_shared *sh, void *workspace,
                               int64_t ws_bytes) {
    int64_t E = ex->E, d = ex->d, ffn = ex->ffn;
    if (E < 1 || d < 1 || ffn < 1 || !ex->gate || !ex->up || !ex->down)
        return qn_set_error(QN_EINVAL, "moe: experts need E, d, ffn >= 1, got E=%lld d=%lld ffn=%lld", (long long)E,
                            (long long)d, (long long)ffn);
    if (T < 0 || T > INT32_MAX || k < 1 || k > E)
        return qn_set_error(QN_EINVAL, "moe: top_k must be in 1..%lld, got %lld (T=%lld, at most 2^31 - 1)",
                            (long long)E, (long long)k, (long long)T);
    if (T > 1 && (ldx < d || ldy < d))
        return qn_set_error(QN_EINVAL, "moe: bad row strides ldx=%lld ldy=%lld for d=%lld", (long long)ldx,
                            (long long)ldy, (long long)d);
    if (xdtype < QN_X_F32 || xdtype > QN_X_BF16) return qn_set_error(QN_EINVAL, "moe: unknown x dtype %d", xdtype);
    qn_status st;
    for (int64_t e = 0; e < E; e++) {
        if ((st = check_qw(&ex->gate[e], ffn, d, "experts.gate_proj", e, ex->gate[0].fmt))) return st;
        if ((st = check_qw(&ex->up[e], ffn, d, "experts.up_proj", e, ex->up[0].fmt))) return st;
        if ((st = check_qw(&ex->down[e], d, ffn, "experts.down_proj", e, ex->down[0].fmt))) return st;
    }
    if (sh) {
        if (sh->ffn < 1 || !sh->gate || !sh->up || !sh->down)
            return qn_set_error(QN_EINVAL, "moe: shared expert needs gate, up, down and ffn >= 1");
        if ((st = check_qw(sh->gate, sh->ffn, d, "shared.gate_proj", 0, NULL))) return st;
        if ((st = check_qw(sh->up, sh->ffn, d, "shared.up_proj", 0, NULL))) return st;
        if ((st = check_qw(sh->down, d, sh->ffn, "shared.down_proj", 0, NULL))) return st;
    }
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_moe_workspace_size(ex, sh, T, k, nth)) return qn_set_error(QN_EINVAL, "moe: workspace too small");
    moe_plan pl = make_plan(ex, sh, T, k, nth);
    char *p = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    int64_t *counts = (int64_t *)p; p += pl.counts_b;
    int64_t *offs = (int64_t *)p; p += pl.offs_b;
    int64_t *stamp = (int64_t *)p; p += pl.stamp_b;
    int32_t *rows = (int32_t *)p; p += pl.rows_b;
    float *rw = (float *)p; p += pl.rw_b;
    int32_t *act = (int32_t *)p; p += pl.act_b;
    int64_t cstride = pl.cum_b / 3 / 8;
    int64_t *cum_gu = (int64_t *)p, *cum_dn = cum_gu + cstride, *pstart = cum_dn + cstride;
    p += pl.cum_b;
    qn_qact xg, xu, ag, au, ad;
    qn_qact_init(&xg, &ex->gate[0], T, p); p += pl.xg_b;
    if (pl.share_up) xu = xg; else qn_qact_init(&xu, &ex->up[0], T, p);
    p += pl.xu_b;
    qn_qact_init(&ag, &ex->gate[0], pl.R, p); p += pl.ag_b;
    if (pl.share_up) au = ag; else qn_qact_init(&au, &ex->up[0], pl.R, p);
    p += pl.au_b;
    qn_qact_init(&ad, &ex->down[0], pl.R, p); p += pl.ad_b;
    float *G = (float *)p; p += pl.g_b;
    float *U = (float *)p; p += pl.u_b;
    float *O = (float *)p; p += pl.o_b;
    float *sg = (float *)p; p += pl.sg_b;
    void *qws = p;

    /* counts, with ids checked: in range and distinct within a token */
    for (int64_t e = 0; e < E; e++) counts[e] = 0, stamp[e] = -1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int32_t e = ids[t * k + j];
            if (e < 0 || e >= E)
                return qn_set_error(QN_EINVAL, "moe: ids[%lld, %lld] = %d is out of range [0, %lld)", (long long)t,
                                    (long long)j, e, (long long)E);
            if (stamp[e] == t)
                return qn_set_error(QN_EINVAL, "moe: ids[%lld] names expert %d twice", (long long)t, e);
            stamp[e] = t;
            counts[e]++;
        }
    if (counts_out) memcpy(counts_out, counts, (size_t)E * sizeof *counts);
    /* stable permutation: prefix sums, then (token, slot) pairs in token order */
    offs[0] = 0;
    for (int64_t e = 0; e < E; e++) offs[e + 1] = offs[e] + counts[e];
    for (int64_t e = 0; e < E; e++) stamp[e] = offs[e];
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t pos = stamp[ids[t * k + j]]++;
            rows[pos] = (int32_t)t;
            rw[pos] = weights[t * k + j];
        }
    /* the active experts (an expert without tokens costs nothing), their work items, and
     * the passes: runs of consecutive active experts with at most R rows together */
    int64_t np_ffn = qn_npanels(ffn), np_d = qn_npanels(d);
    int64_t pb_ffn = qn_ceil_div(np_ffn, QN_NP_BLOCK), pb_d = qn_ceil_div(np_d, QN_NP_BLOCK);
    int64_t na = 0, npass = 0, in_pass = 0;
    cum_gu[0] = cum_dn[0] = 0;
    pstart[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        if (counts[e] == 0) continue;
        int64_t n_mt = qn_ceil_div(counts[e], QN_MTILE);
        if (na > pstart[npass] && in_pass + counts[e] > pl.R) pstart[++npass] = na, in_pass = 0;
        in_pass += counts[e];
        act[na] = (int32_t)e;
        cum_gu[na + 1] = cum_gu[na] + pb_ffn * n_mt;
        cum_dn[na + 1] = cum_dn[na] + pb_d * n_mt;
        na++;
    }
    if (na > 0) pstart[++npass] = na;

    int xsize = xdtype == QN_X_F32 ? 4 : 2;
    int par_rows = T * d >= 32768;
    /* y = the shared expert (times its gate), or zero */
    if (sh && T > 0) {
        if ((st = expert_mlp(O, x, xdtype, ldx, T, sh->gate, sh->up, sh->down, sh->ffn, G, U, qws, pl.qws_b)))
            return st;
#pragma omp parallel for schedule(static) if (par_rows)
        for (int64_t t = 0; t < T; t++) {
            float gsc = 1.0f;
            if (sh->gate_w) {
                const char *xr = (const char *)x + t * ldx * xsize;
                float acc = 0.0f;
                for (int64_t i = 0; i < d; i++) acc += load_logit(xr, xdtype, i) * sh->gate_w[i];
                gsc = 1.0f / (1.0f + expf(-acc));
            }
            sg[t] = gsc;
            for (int64_t i = 0; i < d; i++) y[t * ldy + i] = sh->gate_w ? gsc * O[t * d + i] : O[t * d + i];
        }
    } else {
#pragma omp parallel for schedule(static) if (par_rows)
        for (int64_t t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)d * sizeof *y);
    }
    if (npass == 0) return QN_OK;

    /* The routed experts, one parallel region: x prepared once per token, then per pass
     * every active expert's gate and up tiles (with silu * up on their columns) split over
     * the threads in one loop, the down tiles in a second, and the weighted combine. Each
     * output element comes from one tile with the operations of qn_qmatmul; the combine
     * adds experts in id order, so results do not depend on the thread count. */
    enum { COLS = 64 };
    int64_t n_cc = qn_ceil_div(d, COLS);
#pragma omp parallel num_threads(nth)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const char *xr = (const char *)x + t * ldx * xsize;
            qn_qact_prepare_row(&xg, t, xr, xdtype);
            if (!pl.share_up) qn_qact_prepare_row(&xu, t, xr, xdtype);
        }
        for (int64_t b = 0; b < npass; b++) {
            moe_pass ps = {act + pstart[b], offs, counts, pstart[b + 1] - pstart[b], offs[act[pstart[b]]]};
            const int64_t *cg = cum_gu + pstart[b], *cd = cum_dn + pstart[b];
            int64_t nrow = offs[act[pstart[b + 1] - 1] + 1] - ps.row0;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < nrow; r++) {
                qn_qact_copy_row(&ag, r, &xg, rows[ps.row0 + r]);
                if (!pl.share_up) qn_qact_copy_row(&au, r, &xu, rows[ps.row0 + r]);
            }
#pragma omp for schedule(dynamic)
            for (int64_t i = cg[0]; i < cg[ps.na]; i++) {
                int64_t e, p0, np, m0, mr;
                item_coords(&ps, cg, np_ffn, i, &e, &p0, &np, &m0, &mr);
                int64_t c0 = p0 * QN_PANEL, nc = qn_min64(np * QN_PANEL, ffn - c0);
                qn_qmatmul_tile(G + m0 * ffn + c0, ffn, &ex->gate[e], &ag, m0, mr, p0, np);
                qn_qmatmul_tile(U + m0 * ffn + c0, ffn, &ex->up[e], &au, m0, mr, p0, np);
                for (int64_t m = m0; m < m0 + mr; m++)
                    qn_silu_mul(G + m * ffn + c0, G + m * ffn + c0, U + m * ffn + c0, nc);
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < nrow; r++) qn_qact_prepare_row(&ad, r, G + r * ffn, QN_X_F32);
#pragma omp for schedule(dynamic)
            for (int64_t i = cd[0]; i < cd[ps.na]; i++) {
                int64_t e, p0, np, m0, mr;
                item_coords(&ps, cd, np_d, i, &e, &p0, &np, &m0, &mr);
                qn_qmatmul_tile(O + m0 * d + p0 * QN_PANEL, d, &ex->down[e], &ad, m0, mr, p0, np);
            }
            /* y[t] += weight * row, rows in pass order (experts by id): one column slice per item */
#pragma omp for schedule(static)
            for (int64_t cc = 0; cc < n_cc; cc++) {
                int64_t n0 = cc * COLS, n1 = qn_min64(n0 + COLS, d);
                for (int64_t r = 0; r < nrow; r++) {
                    float *yr = y + (int64_t)rows[ps.row0 + r] * ldy;
                    const float *orow = O + r * d;
                    float wt = rw[ps.row0 + r];
                    for (int64_t n = n0; n < n1; n++) yr[n] += wt * orow[n];
                }
            }
        }
    }
    return QN_OK;
}
