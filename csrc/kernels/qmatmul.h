/* qmatmul.h — quantized matmul y[M, N] = x[M, K] @ W[N, K]^T over the panel layout of
 * qn_formats.h, and the inner tile kernels each ISA file provides.
 *
 * Integer formats (sym, asym): x is quantized to int8 per block of fb = min(group, 256)
 * inputs (absmax / 127, round half to even); each block's integer dot product with the
 * codes is scaled by s * d_x, zero points are folded into the integer sum and mins add
 * m * sum(x_hat). Lookup-table formats: fp32 x times lut[code], scaled per group.
 * Every ISA path performs the same float operations in the same order as the _ref twin,
 * so results are bitwise equal across paths and thread counts.
 */
#ifndef QN_QMATMUL_H
#define QN_QMATMUL_H

#include "../qn_formats.h"

#ifdef __cplusplus
extern "C" {
#endif

enum qn_xdtype { QN_X_F32 = 0, QN_X_F16 = 1, QN_X_BF16 = 2 };

/* One tile of work for an inner kernel: np panels (16 rows of W each) x mr rows of x.
 * Scales are read in their stored form (see qn_formats.h) at the end of each block. */
typedef struct qn_qtile {
    const uint8_t *codes;  /* first panel's codes; panels are panel_bytes apart */
    int64_t panel_bytes;
    const void *scales;    /* first panel's [n_groups][16] scales */
    const void *offsets;   /* first panel's [n_groups][16] mins / zero points, or NULL */
    const uint16_t *supers, *super_mins; /* first panel's [n_super][16] fp16, or NULL */
    int64_t n_groups, group, n_super; /* group: inputs per group (Kp for per-row formats) */
    int kind, offset, scale; /* enum qn_kind, qn_offset, qn_scale */
    /* int path: quantized activations */
    const int8_t *xq;      /* [mr][ldxq] */
    int64_t ldxq;
    const float *xd;       /* [mr][ldxb] scale of each x block */
    const float *xsum;     /* [mr][ldxb] d_x * sum of the block's codes */
    const int32_t *xisum;  /* [mr][ldxb] sum of the block's codes */
    int64_t ldxb, fb;      /* x block stride and inputs per block */
    /* lut path: float activations */
    const float *xf;       /* [mr][ldxf] */
    int64_t ldxf;
    const float *lut;      /* 2^bits entries */
    int lut_kind;
    int bits, np, mr;
    int64_t Kp;
    float *y;              /* [mr][ldy]: columns n0 .. n0 + ncols of the output */
    int64_t ldy, ncols;
} qn_qtile;

/* The decoded scale s, integer zero point z and additive min o of row n of panel p
 * (relative to the tile's first panel), group gi: w = s * (q - z) + o. Scalar definition
 * that every ISA's vector loads reproduce. */
void qn_qtile_group_scale(const qn_qtile *t, int64_t p, int64_t gi, int n, float *s, int32_t *z, float *o);

typedef void (*qn_qtile_fn)(const qn_qtile *t);

void qn_qtile_int_ref(const qn_qtile *t);
void qn_qtile_lut_ref(const qn_qtile *t);
void qn_qtile_int_avx2(const qn_qtile *t);
void qn_qtile_lut_avx2(const qn_qtile *t);
void qn_qtile_int_avx512(const qn_qtile *t);
void qn_qtile_lut_avx512(const qn_qtile *t);

/* Quantize rows of x to int8 per block of fb inputs; pads with zeros to Kp.
 * xq[M][Kp], xd/xsum/xisum[M][nb] with nb = ceil(Kp / fb). */
void qn_quantize_act_row_ref(int8_t *xq, float *xd, float *xsum, int32_t *xisum,
                             const void *x, int xdtype, int64_t K, int64_t Kp, int64_t fb);
void qn_quantize_act_row_avx2(int8_t *xq, float *xd, float *xsum, int32_t *xisum,
                              const void *x, int xdtype, int64_t K, int64_t Kp, int64_t fb);
void qn_quantize_act_row_avx512(int8_t *xq, float *xd, float *xsum, int32_t *xisum,
                                const void *x, int xdtype, int64_t K, int64_t Kp, int64_t fb);

/* Decode one code (row n of a panel, input k) from a panel's code bytes; for tests and refs. */
int qn_code_at(const uint8_t *panel_codes, int bits, int64_t n, int64_t k);

/* A tile over panels p0 .. p0 + np of w, without activations (for dequantize). */
void qn_qtile_for_panels(qn_qtile *t, const qn_qweight *w, int64_t p0, int64_t np);

/* The driver's tiling: QN_NP_BLOCK panels x QN_MTILE rows of x per tile. */
#define QN_NP_BLOCK 4
#define QN_MTILE 128

/* Activations prepared for the tiles of one weight format, M rows: int8 blocks of fb
 * inputs with their scales (integer formats) or fp32 padded with zeros to Kp (lookup-table
 * formats). Two weights with equal (lut, K, Kp, fb) take the same prepared rows. */
typedef struct qn_qact {
    int8_t *xq;            /* [M][Kp] (integer formats) */
    float *xd, *xsum;      /* [M][nb] */
    int32_t *xisum;        /* [M][nb] */
    float *xf;             /* [M][Kp] (lookup-table formats) */
    int64_t K, Kp, fb, nb;
    int lut;
} qn_qact;

/* Bytes of a qn_qact of M rows for w's format (a multiple of 64). */
int64_t qn_qact_bytes(const qn_qweight *w, int64_t M);

/* Lays out a qn_qact of M rows for w in buf (64-byte aligned, qn_qact_bytes long);
 * buf NULL: the dimensions only. */
void qn_qact_init(qn_qact *a, const qn_qweight *w, int64_t M, void *buf);

/* Row m of a <- x[K] (dtype xdtype), with the dispatched quantizer. */
void qn_qact_prepare_row(const qn_qact *a, int64_t m, const void *x, int xdtype);

/* Row m of dst <- row r of src (same layout). */
void qn_qact_copy_row(const qn_qact *dst, int64_t m, const qn_qact *src, int64_t r);

/* 1 when a and b hold the same prepared values for the same x. */
int qn_qact_same_layout(const qn_qact *a, const qn_qact *b);

/* One tile of the driver: y[mr, cols of panels p0 .. p0 + np) (row stride ldy, y points
 * at column p0 * 16 of row 0) = rows m0 .. m0 + mr of a @ W^T, by the dispatched kernel.
 * qn_qmatmul is a loop over these tiles. */
void qn_qmatmul_tile(float *y, int64_t ldy, const qn_qweight *w, const qn_qact *a, int64_t m0, int64_t mr,
                     int64_t p0, int64_t np);

/* Bytes of workspace qn_qmatmul needs for M rows with nthreads threads. */
int64_t qn_qmatmul_workspace_size(const qn_qweight *w, int64_t M, int nthreads);

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx, dtype xdtype) @ W^T.
 * workspace: at least qn_qmatmul_workspace_size() bytes, 64-byte aligned. */
/* qn_qmatmul that also prefetches next[0 .. next_bytes) (the weights the caller reads next),
 * spread over the tiles, so a chain of small matmuls does not start each one cold. */
qn_status qn_qmatmul_ahead(float *QN_RESTRICT y, const qn_qweight *w, const void *x, int xdtype, int64_t M,
                           int64_t ldx, int64_t ldy, void *workspace, int64_t ws_bytes, const void *next,
                           int64_t next_bytes);
qn_status qn_qmatmul(float *QN_RESTRICT y, const qn_qweight *w, const void *x, int xdtype,
                     int64_t M, int64_t ldx, int64_t ldy, void *workspace, int64_t ws_bytes);

#ifdef __cplusplus
}
#endif
#endif
