/* moe.h — Mixture-of-Experts on the CPU: routing, and the expert MLPs with their combine.
 *
 * route:   logits[T, E] -> weights[T, k] float32, ids[T, k] int32 (softmax or sigmoid
 *          scores, optional selection bias, group-limited top-k, renormalize, scaling).
 * experts: y[T, d] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j],
 *          plus an optional shared expert (times sigmoid(x_t . shared_gate) when given).
 * Tokens are permuted by expert (counts + prefix sums, stable); the tiles of qn_qmatmul for
 * all active experts' gate and up projections are split over OpenMP threads in one loop,
 * then those of the down projections; every element is the qn_qmatmul of its expert's rows
 * and the scatter-add visits experts in id order, so results never depend on the thread
 * count.
 */
#ifndef QN_MOE_H
#define QN_MOE_H

#include "../qn_formats.h"

#ifdef __cplusplus
extern "C" {
#endif

enum qn_moe_scoring { QN_MOE_SOFTMAX = 0, QN_MOE_SIGMOID = 1 };

typedef struct qn_moe_route_params {
    int64_t top_k;          /* experts per token, 1 .. E */
    int scoring;            /* enum qn_moe_scoring */
    int renormalize;        /* divide the k weights by their sum */
    const float *bias;      /* [E] added to the scores for selection only, or NULL */
    int64_t n_group;        /* 0 or 1: no groups; else E % n_group == 0 */
    int64_t topk_group;     /* groups kept, 1 .. n_group (when n_group > 1) */
    float routed_scaling;   /* final multiplier of the weights */
} qn_moe_route_params;

/* Bytes of workspace qn_moe_route needs for E experts with nthreads threads. */
int64_t qn_moe_route_workspace_size(int64_t E, int nthreads);

/* weights[T, k] (row stride k), ids[T, k] <- route(logits[T, E] of dtype ldtype (enum
 * qn_xdtype), row stride ldl). Per token: score = softmax(logits) or sigmoid(logits).
 * Selection key = the logit itself when there is neither bias nor groups (the scores are
 * monotone in it), else score + bias. Groups: experts split into n_group consecutive
 * groups, group key = sum of its two largest keys, the topk_group best groups stay.
 * weight = score (unbiased), / sum when renormalize, * routed_scaling. Ties go to the
 * lower expert (or group) id; ids come sorted by descending weight, ties by id. */
qn_status qn_moe_route(float *QN_RESTRICT weights, int32_t *QN_RESTRICT ids, const void *logits, int ldtype,
                       int64_t T, int64_t E, int64_t ldl, const qn_moe_route_params *p, void *workspace,
                       int64_t ws_bytes);

/* The experts of one MoE block: E experts with gate, up [ffn, d] and down [d, ffn]. */
typedef struct qn_moe_experts {
    int64_t E, d, ffn;
    const qn_qweight *gate, *up, *down; /* [E] each */
} qn_moe_experts;

/* An optional shared expert (gate, up [ffn, d], down [d, ffn]) applied to every token,
 * scaled by sigmoid(x_t . gate_w) when gate_w is not NULL. */
typedef struct qn_moe_shared {
    int64_t ffn;
    const qn_qweight *gate, *up, *down;
    const float *gate_w; /* [d] or NULL */
} qn_moe_shared;

/* Bytes of workspace qn_moe_experts_apply needs. */
int64_t qn_moe_workspace_size(const qn_moe_experts *ex, const qn_moe_shared *sh, int64_t T, int64_t k,
                              int nthreads);

/* y[T, d] (row stride ldy) = the MoE block of x[T, d] (dtype xdtype, row stride ldx) under
 * the routing ids[T, k], weights[T, k]; counts[E] (or NULL) receives tokens per expert.
 * sh may be NULL. ids must lie in [0, E) and be distinct within a token. */
qn_status qn_moe_experts_apply(float *QN_RESTRICT y, int64_t *counts, const void *x, int xdtype,
                               const int32_t *ids, const float *weights, int64_t T, int64_t k, int64_t ldx,
                               int64_t ldy, const qn_moe_experts *ex, const qn_moe_shared *sh, void *workspace,
                               int64_t ws_bytes);

#ifdef __cplusplus
}
#endif
#endif
