/* decoder.h — one decode step through the dense layers of a pre-norm transformer in one
 * call: the per-layer sequence RMSNorm(+residual) -> fused qkv projection (+bias) ->
 * q/k norm -> RoPE -> KV-cache write -> paged attention -> o projection -> RMSNorm
 * (+residual) -> fused gate/up projection -> SiLU * up -> down projection, with no
 * interpreter between the kernels. Each step is the same kernel the single-op API runs, so
 * the result equals the op-by-op path bit for bit. */
#ifndef QN_DECODER_H
#define QN_DECODER_H

#include "../qn_formats.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y[M, N] = x[M, K] @ W^T (+ bias): W quantized (qw) or float (w, wdtype, row stride K). */
typedef struct qn_linear {
    int quantized;
    qn_qweight qw;
    const void *w;
    int wdtype;
    int64_t N, K;
    const float *bias;   /* [N] or NULL */
} qn_linear;

typedef struct qn_dense_layer {
    const float *attn_norm, *ffn_norm;  /* [D] */
    qn_linear qkv;                      /* [(H + 2 Hkv) hd, D] */
    qn_linear o;                        /* [D, H hd] */
    qn_linear gate_up;                  /* [2 I, D]: gate rows then up rows */
    qn_linear down;                     /* [D, I] */
    const float *q_norm, *k_norm;       /* qk_norm 1: [hd] each; 2: [H hd] / [Hkv hd]; else NULL */
    int qk_norm;
    int64_t window;                     /* sliding window (keys j >= pos - window), < 0: none */
} qn_dense_layer;

typedef struct qn_decoder_dims {
    int64_t D, H, Hkv, hd, F, L;  /* F: MLP width */
    float eps, attn_scale;
    const double *inv_freq;             /* [rot / 2] */
    int64_t rot;
    float mscale;
    int neox;
} qn_decoder_dims;

/* The step's per-call state: B sequences, one new token each. */
typedef struct qn_decoder_io {
    int64_t B;
    float *res, *delta;                 /* [B, D]: residual stream and the pending block output */
    void *k_cache, *v_cache;            /* [L, n_blocks, bs, Hkv, hd] float32 / float16 / bfloat16 */
    int kvdtype;                        /* 0 float32, 1 float16, 2 bfloat16 */
    int64_t n_blocks, bs, max_blocks;
    const int32_t *tables;              /* [B, max_blocks] */
    const int32_t *seq_lens;            /* [B], counting the new token */
    const int32_t *positions;           /* [B] */
    const int64_t *slots;               /* [B]: block * bs + row of the new token */
} qn_decoder_io;

/* Bytes of workspace qn_decoder_step needs for this call (the attention splits depend on
 * io->seq_lens). */
int64_t qn_decoder_workspace_size(const qn_dense_layer *layers, const qn_decoder_dims *d, const qn_decoder_io *io,
                                  int nthreads);

/* Runs layers 0 .. L-1. On return res holds the stream before the last block's output is
 * added and delta that output (the caller's final RMSNorm adds it). */
qn_status qn_decoder_step(const qn_dense_layer *layers, const qn_decoder_dims *d, const qn_decoder_io *io,
                          void *workspace, int64_t ws_bytes);

#ifdef __cplusplus
}
#endif
#endif
