/* test_moe.c — the MoE kernels from C alone: routing rules (ties, top_k = 1 and = E,
 * groups, bias), the fused experts against a token-by-token composition of qn_qmatmul and
 * qn_silu_mul (bitwise: same operations, same order), every ISA path against _ref, guard
 * bytes around y, zero-token experts, several passes, gate/up/down in different formats,
 * and bad ids / workspace returning QN_EINVAL. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cpu_features.h"
#include "dispatch.h"
#include "kernels/act.h"
#include "kernels/moe.h"
#include "kernels/qmatmul.h"
#include "kernels/quantize.h"

#include "test_util.h"

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    memset(p, 0, (n + 63) / 64 * 64 + 64);
    return p;
}

typedef struct qbuf { qn_qweight w; qn_qweight_out o; } qbuf;

static void make_q(qbuf *q, const qn_format *f, int64_t N, int64_t K) {
    int64_t np = qn_npanels(N), Kp = qn_fmt_kpad(f, K), ng = qn_fmt_ngroups(f, K);
    int sb = qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale), ob = qn_offset_bytes(f);
    float *w = malloc((size_t)(N * K * 4));
    for (int64_t i = 0; i < N * K; i++) w[i] = 0.1f * nrand();
    memset(q, 0, sizeof *q);
    q->o.codes = xalloc((size_t)(np * (Kp / 32) * QN_CHUNK_BYTES(f->bits)));
    q->o.scales = xalloc((size_t)(np * ng * 16 * sb));
    q->o.offsets = ob ? xalloc((size_t)(np * ng * 16 * ob)) : NULL;
    int64_t wsb = qn_quantize_workspace_size(f, K, 64);
    void *ws = xalloc((size_t)wsb);
    CHECK(qn_quantize(f, w, N, K, K, &q->o, ws, wsb) == QN_OK, "quantize: %s", qn_last_error());
    free(ws);
    free(w);
    q->w = (qn_qweight){f, N, K, q->o.codes, q->o.scales, q->o.offsets, NULL, NULL};
}

static void free_q(qbuf *q) { free(q->o.codes); free(q->o.scales); free(q->o.offsets); }

/* ---- routing ---- */

static void route(float *w, int32_t *ids, const float *logits, int64_t T, int64_t E, qn_moe_route_params p) {
    int64_t wsb = qn_moe_route_workspace_size(E, 64);
    void *ws = xalloc((size_t)wsb);
    qn_status st = qn_moe_route(w, ids, logits, QN_X_F32, T, E, E, &p, ws, wsb);
    CHECK(st == QN_OK, "route: %s", qn_last_error());
    free(ws);
}

static void test_route(void) {
    enum { E = 16 };
    float logits[2 * E], w[2 * E];
    int32_t ids[2 * E];
    qn_moe_route_params p = {4, QN_MOE_SOFTMAX, 1, NULL, 0, 0, 1.0f};
    /* all tied: ids 0..k-1, equal weights */
    for (int i = 0; i < 2 * E; i++) logits[i] = 0.5f;
    route(w, ids, logits, 2, E, p);
    for (int j = 0; j < 4; j++) CHECK(ids[j] == j && ids[4 + j] == j && fabsf(w[j] - 0.25f) < 1e-7f, "tied: slot %d", j);
    /* top_k = E: every expert once, sorted by descending weight */
    for (int i = 0; i < E; i++) logits[i] = nrand();
    p.top_k = E;
    p.renormalize = 0;
    route(w, ids, logits, 1, E, p);
    int seen[E] = {0};
    float sum = 0.0f;
    for (int j = 0; j < E; j++) {
        CHECK(ids[j] >= 0 && ids[j] < E && !seen[ids[j]]++, "top_k=E: id %d repeated", ids[j]);
        if (j) CHECK(w[j] <= w[j - 1], "top_k=E: not sorted at %d", j);
        sum += w[j];
    }
    CHECK(fabsf(sum - 1.0f) < 1e-5f, "top_k=E: softmax sums to %g", sum);
    /* llama-4: sigmoid top-1 = sigmoid of the largest logit */
    p = (qn_moe_route_params){1, QN_MOE_SIGMOID, 0, NULL, 0, 0, 1.0f};
    route(w, ids, logits, 1, E, p);
    int best = 0;
    for (int i = 1; i < E; i++) best = logits[i] > logits[best] ? i : best;
    CHECK(ids[0] == best && w[0] == 1.0f / (1.0f + expf(-logits[best])), "top-1 sigmoid");
    /* groups: the bias steers the choice, weights stay unbiased */
    float bias[E] = {0};
    for (int i = 0; i < E; i++) logits[i] = 0.0f;
    bias[9] = 1.0f; bias[10] = 0.5f; bias[3] = 0.9f;
    p = (qn_moe_route_params){2, QN_MOE_SIGMOID, 1, bias, 4, 1, 2.5f};
    route(w, ids, logits, 1, E, p);
    CHECK(ids[0] == 9 && ids[1] == 10, "groups: got %d %d", ids[0], ids[1]);
    CHECK(w[0] == 1.25f && w[1] == 1.25f, "groups: weights %g %g", w[0], w[1]);
    /* errors */
    void *ws = xalloc(64);
    p = (qn_moe_route_params){0, QN_MOE_SOFTMAX, 1, NULL, 0, 0, 1.0f};
    CHECK(qn_moe_route(w, ids, logits, QN_X_F32, 1, E, E, &p, ws, 64) == QN_EINVAL, "top_k=0 accepted");
    p.top_k = E + 1;
    CHECK(qn_moe_route(w, ids, logits, QN_X_F32, 1, E, E, &p, ws, 64) == QN_EINVAL, "top_k>E accepted");
    p.top_k = 2; p.n_group = 3; p.topk_group = 1;
    CHECK(qn_moe_route(w, ids, logits, QN_X_F32, 1, E, E, &p, ws, 64) == QN_EINVAL, "n_group=3 accepted");
    p.n_group = 0;
    CHECK(qn_moe_route(w, ids, logits, QN_X_F32, 1, E, E, &p, ws, 8) == QN_EINVAL, "small workspace accepted");
    free(ws);
}

/* ---- experts ---- */

/* y[t] of the MoE block, token by token from the public pieces, experts in id order. */
static void compose(float *y, const float *x, const int32_t *ids, const float *wts, int64_t T, int64_t k,
                    const qn_moe_experts *ex) {
    int64_t d = ex->d, ffn = ex->ffn;
    float *g = xalloc((size_t)ffn * 4), *u = xalloc((size_t)ffn * 4), *o = xalloc((size_t)d * 4);
    int64_t wsb = qn_max64(qn_qmatmul_workspace_size(&ex->gate[0], 1, 64), qn_qmatmul_workspace_size(&ex->down[0], 1, 64));
    void *ws = xalloc((size_t)wsb);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < d; i++) y[t * d + i] = 0.0f;
        for (int64_t e = 0; e < ex->E; e++)
            for (int64_t j = 0; j < k; j++) {
                if (ids[t * k + j] != e) continue;
                qn_qmatmul(g, &ex->gate[e], x + t * d, QN_X_F32, 1, d, ffn, ws, wsb);
                qn_qmatmul(u, &ex->up[e], x + t * d, QN_X_F32, 1, d, ffn, ws, wsb);
                qn_silu_mul(g, g, u, ffn);
                qn_qmatmul(o, &ex->down[e], g, QN_X_F32, 1, ffn, d, ws, wsb);
                for (int64_t i = 0; i < d; i++) y[t * d + i] += wts[t * k + j] * o[i];
            }
    }
    free(g); free(u); free(o); free(ws);
}

/* gate in f, up in fu, down in fd */
static void test_experts_fmt(const qn_format *f, const qn_format *fu, const qn_format *fd, int64_t E, int64_t d,
                             int64_t ffn, int64_t T, int64_t k, int skew) {
    qbuf *qb = malloc(sizeof(qbuf) * (size_t)(3 * E));
    qn_qweight *qw = malloc(sizeof(qn_qweight) * (size_t)(3 * E));
    for (int64_t e = 0; e < E; e++) {
        make_q(&qb[e], f, ffn, d);
        make_q(&qb[E + e], fu, ffn, d);
        make_q(&qb[2 * E + e], fd, d, ffn);
    }
    for (int64_t i = 0; i < 3 * E; i++) qw[i] = qb[i].w;
    qn_moe_experts ex = {E, d, ffn, qw, qw + E, qw + 2 * E};
    float *x = xalloc((size_t)(T * d * 4)), *wts = xalloc((size_t)(T * k * 4)), *logits = xalloc((size_t)(T * E * 4));
    int32_t *ids = xalloc((size_t)(T * k * 4));
    for (int64_t i = 0; i < T * d; i++) x[i] = nrand();
    /* skew: logits favour experts 0..k-1 so the others get no tokens */
    for (int64_t i = 0; i < T * E; i++) logits[i] = nrand() + (skew && i % E < k ? 100.0f : 0.0f);
    route(wts, ids, logits, T, E, (qn_moe_route_params){k, QN_MOE_SOFTMAX, 1, NULL, 0, 0, 1.0f});

    int64_t ldy = d + 5;
    float *expect = xalloc((size_t)(T * d * 4));
    compose(expect, x, ids, wts, T, k, &ex);
    float *yref = NULL;
    for (int isa = QN_ISA_REF; isa <= qn_cpu_best_isa(); isa++) {
        if (isa == QN_ISA_AVX2 && qn_cpu_best_isa() > QN_ISA_AVX2 && T > 8) continue;
        qn_dispatch_set_isa(isa);
        float *y = xalloc((size_t)((T + 2) * ldy * 4));
        for (int64_t i = 0; i < (T + 2) * ldy; i++) y[i] = -12345.0f;
        int64_t *counts = xalloc((size_t)E * 8);
        int64_t wsb = qn_moe_workspace_size(&ex, NULL, T, k, 64);
        void *ws = xalloc((size_t)wsb);
        qn_status st = qn_moe_experts_apply(y + ldy, counts, x, QN_X_F32, ids, wts, T, k, d, ldy, &ex, NULL, ws, wsb);
        CHECK(st == QN_OK, "moe: %s", qn_last_error());
        int64_t total = 0;
        for (int64_t e = 0; e < E; e++) {
            total += counts[e];
            if (skew) CHECK((e < k) == (counts[e] == T), "skew: expert %lld got %lld tokens", (long long)e, (long long)counts[e]);
        }
        CHECK(total == T * k, "counts sum %lld", (long long)total);
        for (int64_t i = 0; i < ldy; i++) CHECK(y[i] == -12345.0f && y[(T + 1) * ldy + i] == -12345.0f, "guard row written");
        int bad = 0, badg = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t i = 0; i < d; i++) bad += memcmp(&y[(t + 1) * ldy + i], &expect[t * d + i], 4) != 0;
            for (int64_t i = d; i < ldy; i++) badg += y[(t + 1) * ldy + i] != -12345.0f;
        }
        CHECK(bad == 0, "bits=%d kind=%d E=%lld T=%lld k=%lld %s: %d values differ from the composition", f->bits,
              f->kind, (long long)E, (long long)T, (long long)k, qn_isa_name(isa), bad);
        CHECK(badg == 0, "guard columns written");
        if (!yref) {
            yref = y;
        } else {
            free(y);
        }
        free(counts);
        free(ws);
    }
    qn_dispatch_init();
    free(yref);
    free(expect);
    free(x); free(wts); free(logits); free(ids);
    for (int64_t i = 0; i < 3 * E; i++) free_q(&qb[i]);
    free(qb); free(qw);
}

static void test_experts(const qn_format *f, int64_t E, int64_t d, int64_t ffn, int64_t T, int64_t k, int skew) {
    test_experts_fmt(f, f, f, E, d, ffn, T, k, skew);
}

static void test_expert_errors(void) {
    qn_format f = fmt(8, 32, QN_SYM, 0, QN_SCALE_F16);
    qbuf qb[6];
    qn_qweight qw[6];
    for (int e = 0; e < 2; e++) {
        make_q(&qb[e], &f, 32, 64);
        make_q(&qb[2 + e], &f, 32, 64);
        make_q(&qb[4 + e], &f, 64, 32);
    }
    for (int i = 0; i < 6; i++) qw[i] = qb[i].w;
    qn_moe_experts ex = {2, 64, 32, qw, qw + 2, qw + 4};
    float x[64] = {0}, y[64], wts[2] = {0.5f, 0.5f};
    int32_t ids[2] = {0, 2};
    int64_t wsb = qn_moe_workspace_size(&ex, NULL, 1, 2, 64);
    void *ws = xalloc((size_t)wsb);
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 2, 64, 64, &ex, NULL, ws, wsb) == QN_EINVAL &&
              strstr(qn_last_error(), "ids"), "id out of range accepted");
    ids[1] = 0;
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 2, 64, 64, &ex, NULL, ws, wsb) == QN_EINVAL,
          "repeated id accepted");
    ids[1] = 1;
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 2, 64, 64, &ex, NULL, ws, 16) == QN_EINVAL,
          "small workspace accepted");
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 3, 64, 64, &ex, NULL, ws, wsb) == QN_EINVAL,
          "top_k > E accepted");
    qw[3].N = 48; /* up_proj[1] with the wrong shape */
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 2, 64, 64, &ex, NULL, ws, wsb) == QN_EINVAL &&
              strstr(qn_last_error(), "up_proj[1]"), "mismatched shape accepted: %s", qn_last_error());
    qw[3].N = 32;
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 1, 2, 64, 64, &ex, NULL, ws, wsb) == QN_OK,
          "valid call: %s", qn_last_error());
    CHECK(qn_moe_experts_apply(y, NULL, x, QN_X_F32, ids, wts, 0, 2, 64, 64, &ex, NULL, ws, wsb) == QN_OK,
          "T=0: %s", qn_last_error());
    free(ws);
    for (int i = 0; i < 6; i++) free_q(&qb[i]);
}

int main(void) {
    qn_dispatch_init();
    test_route();
    qn_format fs[] = {fmt(4, 32, QN_SYM, 0, QN_SCALE_F16), fmt(8, 32, QN_SYM, 0, QN_SCALE_F16),
                      fmt(4, 64, QN_LUT, 0, QN_SCALE_F16), fmt(4, 32, QN_ASYM, QN_OFF_MIN, QN_SCALE_F16)};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) {
        test_experts(&fs[i], 8, 64, 128, 5, 2, 0);
        test_experts(&fs[i], 4, 128, 64, 33, 4, 0); /* top_k = E */
    }
    test_experts(&fs[0], 16, 64, 64, 1, 1, 0);   /* T = 1, top-1 */
    test_experts(&fs[1], 6, 64, 64, 20, 2, 1);   /* zero-token experts */
    test_experts(&fs[1], 3, 32, 64, 150, 1, 1);  /* all tokens to one expert */
    test_experts(&fs[0], 8, 64, 96, 200, 4, 0);  /* 800 rows: several passes, a partial panel block */
    test_experts_fmt(&fs[0], &fs[2], &fs[3], 8, 64, 64, 3, 2, 0); /* up and down in other formats */
    test_experts_fmt(&fs[2], &fs[2], &fs[1], 8, 128, 64, 40, 3, 0);
    test_expert_errors();
    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("all moe C tests passed\n");
    return 0;
}
