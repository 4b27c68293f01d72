/* attention.h — flash attention on the CPU: prefill o[T, H, D] = softmax(mask(q k^T * scale)) v
 * with q[T, H, D], k, v[S, Hkv, D] (H % Hkv == 0), and decode over a paged KV cache.
 *
 * Both drivers cut the work into tiles of R query rows x one KV head and hand each tile to
 * one inner kernel (qn_attn_tile_<isa>) that walks the keys in blocks of QN_ATTN_BK with an
 * online softmax (running max m, sum l, unnormalized o), so T x S is never materialized.
 * Keys live in pages (a block table) or in one contiguous run; int8 / fp8 keys carry a
 * float32 scale per page and head. ISA files hold the single-threaded tile kernels; the
 * drivers own OpenMP and a fixed tiling, so results do not depend on the thread count.
 */
#ifndef QN_ATTENTION_H
#define QN_ATTENTION_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* dtype of q (float kinds only) and of k / v storage */
enum qn_attn_dtype { QN_A_F32 = 0, QN_A_F16 = 1, QN_A_BF16 = 2, QN_A_I8 = 3, QN_A_FP8 = 4 /* e4m3fn */ };

#define QN_ATTN_BQ 64  /* query rows per tile */
#define QN_ATTN_BK 64  /* keys per block inside a tile */
#define QN_ATTN_SPLIT 256 /* keys per split in paged decode (fixed: thread-count independent) */

/* One tile for an inner kernel: R query rows for each of nh consecutive KV heads against
 * keys [j0, j1). Rows of head hh are rows hh * R .. hh * R + R - 1 of q, o, m, l, lo, hi;
 * the kernel converts a block of keys for all nh heads at once (reading a paged cache's
 * [bs, Hkv, D] tokens front to back when nh = Hkv), then runs each head's rows. */
typedef struct qn_attn_tile {
    const float *q;         /* [nh * R, Dp] rows pre-multiplied by scale, zero past D;
                               room for 3 more rows (kernels compute blocks of 4 rows) */
    float *o;               /* [nh * R, Dp] out: sum_j p_j v_j (unnormalized) */
    float *m, *l;           /* [nh * R] out: running max (-inf when no key is visible), sum of p */
    const int64_t *lo, *hi; /* [nh * R] row r sees keys lo[r] <= j < hi[r] */
    int R, nh;
    int64_t ld_head;        /* elements between consecutive KV heads of a token */
    int64_t D, Dp;          /* head dim, padded row stride (multiple of 16) */
    int64_t j0, j1;         /* keys to visit: covers every row's visible range */
    const void *k, *v;      /* first element of the tile's first KV head in page 0 (or token 0) */
    const int32_t *table;   /* [ceil(j1 / bs)] page of each run of bs keys, NULL: one page */
    int64_t bs;             /* keys per page */
    int64_t ld_tok, ld_page; /* elements between consecutive tokens / pages */
    const float *kscale, *vscale; /* scale of (page, head hh) at [page * ld_scale + hh], or NULL */
    int64_t ld_scale;
    int kvdtype;            /* enum qn_attn_dtype */
    float softcap;          /* > 0: logits become softcap * tanh(logit / softcap) */
    float *scratch;         /* qn_attn_tile_scratch_floats(Dp, nh) floats, 64-byte aligned */
} qn_attn_tile;

/* Floats of scratch one tile kernel needs: fp32 keys and values of a block for nh heads,
 * the block's scores and the rescale factors (and the decode kernels' int16 q rows). */
int64_t qn_attn_tile_scratch_floats(int64_t Dp, int64_t nh);

typedef void (*qn_attn_tile_fn)(const qn_attn_tile *t);
void qn_attn_tile_ref(const qn_attn_tile *t);
void qn_attn_tile_avx2(const qn_attn_tile *t);
void qn_attn_tile_avx512(const qn_attn_tile *t);

/* The same tile for decode (few query rows per KV head): keys and values are converted in
 * registers where they are used, never copied to fp32 rows, and int8 / fp8 scales apply to
 * a block's scores and PV sums. Scratch: as qn_attn_tile_scratch_floats. Its reference is
 * qn_attn_tile_ref; below AVX-512 the dispatch table uses the tile kernels for decode. */
void qn_attn_decode_avx512(const qn_attn_tile *t);

/* Prefill parameters. Causal mask, bottom-right aligned: query i of a sequence with Tq
 * queries and Sk keys sits at position p = i + Sk - Tq and sees key j iff j <= p; a window
 * w >= 0 also requires j >= p - w (and j <= p + w when not causal). Rows that see no key
 * give zeros. With cu_q / cu_k (int32 [n_seq + 1], from 0 to T / S, non-decreasing),
 * sequence s owns queries cu_q[s] .. cu_q[s + 1] and keys cu_k[s] .. cu_k[s + 1]. */
typedef struct qn_attn_params {
    float *o;               /* [T, H, D] */
    const void *q;          /* [T, H, D], dtype qdtype */
    const void *k, *v;      /* [S, Hkv, D], dtype kvdtype (float kinds) */
    int qdtype, kvdtype;
    int64_t T, S, H, Hkv, D;
    int causal;
    int64_t window;         /* < 0: none */
    float scale, softcap;   /* softcap <= 0: none */
    const int32_t *cu_q, *cu_k; /* [n_seq + 1] or NULL (one sequence) */
    int64_t n_seq;
} qn_attn_params;

int64_t qn_attention_workspace_size(const qn_attn_params *p, int nthreads);
qn_status qn_attention(const qn_attn_params *p, void *workspace, int64_t ws_bytes);

/* Paged decode: one query token per sequence. */
typedef struct qn_paged_params {
    float *o;                  /* [B, H, D] */
    const void *q;             /* [B, H, D], dtype qdtype */
    const void *k, *v;         /* [n_blocks, bs, Hkv, D] cache storage, dtype kvdtype */
    const float *kscale, *vscale; /* [n_blocks, Hkv] for int8 / fp8, else NULL */
    int qdtype, kvdtype;
    const int32_t *tables;     /* [B, max_blocks] block ids */
    const int32_t *seq_lens;   /* [B] keys of each sequence */
    int64_t B, H, Hkv, D, n_blocks, bs, max_blocks;
    float scale, softcap;
    int64_t window;            /* >= 0: the query (position seq_len - 1) sees keys j >= seq_len - 1 - window;
                                  < 0: all keys */
} qn_paged_params;

int64_t qn_paged_attention_workspace_size(const qn_paged_params *p, int nthreads);
qn_status qn_paged_attention(const qn_paged_params *p, void *workspace, int64_t ws_bytes);

/* Value of an fp8 e4m3fn code (the scalar definition the SIMD conversions reproduce). */
static inline float qn_attn_fp8_to_f32(uint8_t b) {
    /* e4m3fn magnitude bits shifted into fp16 give the value / 256 (no NaN in stored codes) */
    return qn_f16_to_f32((uint16_t)(((b & 0x80) << 8) | ((b & 0x7F) << 7))) * 256.0f;
}

/* Asks for the cache line at p to be brought into L2. An asm statement, not
 * __builtin_prefetch: GCC deletes loops whose bodies are only prefetch builtins. L2, not
 * L1: rows of one head are a token apart (often 2 KiB or more), so a block's rows fall in a
 * few L1 sets and a block prefetched into L1 would evict itself before it is read. */
static inline void qn_attn_prefetch(const void *p) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 2);
#endif
}

/* The key block that starts at jb: [jb, *je), at most QN_ATTN_BK keys and never across a page
 * of the block table; *page is its page (0 without a table), *off where its first key sits. */
static inline void qn_attn_block_at(const qn_attn_tile *t, int64_t jb, int64_t *je, int64_t *page, int64_t *off) {
    const int64_t pg = t->table ? jb / t->bs : 0, row = t->table ? jb % t->bs : jb;
    *je = qn_min64(t->j1, jb + QN_ATTN_BK);
    if (t->table) *je = qn_min64(*je, (pg + 1) * t->bs);
    *page = t->table ? t->table[pg] : 0;
    *off = *page * t->ld_page + row * t->ld_tok;
}

/* Whether any of n query rows, row r seeing keys [lo[r], hi[r]), sees a key in [jb, je). */
static inline int qn_attn_rows_see(const int64_t *lo, const int64_t *hi, int n, int64_t jb, int64_t je) {
    for (int r = 0; r < n; r++)
        if (qn_max64(lo[r], jb) < qn_min64(hi[r], je)) return 1;
    return 0;
}

/* qn_attn_block_at, and whether any of the tile's nh * R query rows sees a key in the block. */
static inline int qn_attn_block(const qn_attn_tile *t, int64_t jb, int64_t *je, int64_t *page, int64_t *off) {
    qn_attn_block_at(t, jb, je, page, off);
    return qn_attn_rows_see(t->lo, t->hi, t->nh * t->R, jb, *je);
}

/* Prefetches the key and value rows (all nh heads) of the block after the one ending at je.
 * Rows are ld_tok apart (often > 4 KiB), which hardware prefetchers do not follow. */
static inline void qn_attn_prefetch_next(const qn_attn_tile *t, int64_t je) {
    if (je >= t->j1) return;
    int64_t ne, page, next;
    qn_attn_block_at(t, je, &ne, &page, &next);
    int es = t->kvdtype == QN_A_F32 ? 4 : t->kvdtype <= QN_A_BF16 ? 2 : 1;
    int64_t bytes = ((t->nh - 1) * t->ld_head + t->D) * es;
    for (int64_t i = 0; i < ne - je; i++) {
        const char *kr = (const char *)t->k + (next + i * t->ld_tok) * es;
        const char *vr = (const char *)t->v + (next + i * t->ld_tok) * es;
        for (int64_t b = 0; b < bytes; b += 64) {
            qn_attn_prefetch(kr + b);
            qn_attn_prefetch(vr + b);
        }
    }
}

#ifdef __cplusplus
}
#endif
#endif
