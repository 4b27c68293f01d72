/* qn_formats.h — the one parameterized quantized-weight layout, shared by C and CUDA.
 *
 * A weight W[N, K] (N outputs, K inputs) is quantized in groups of g consecutive inputs
 * of one row; group 0 means one group per row. Value of a weight with code q:
 *   sym   w = s * (q - 2^(bits-1))          codes unsigned 0 .. 2^bits-1
 *   asym  w = s * q + m        (QN_OFF_MIN: m stored in the scale dtype)
 *         w = s * (q - z)      (QN_OFF_ZERO: integer zero point z stored as uint8)
 *   lut   w = s * lut[q]       (2^bits float entries: NF4, FP4, FP8 or learned)
 * Nested (GGUF K-quant) scales: s = d * sc, m = -(dmin * mn), with d/dmin fp16 per
 * super-block of 256 inputs and sc/mn small integers per group; unpacked losslessly.
 *
 * Memory layout ("panels"). Rows are taken 16 at a time (a panel; N is padded with zero
 * rows to a multiple of 16) and K is padded to Kp, a whole number of groups and chunks:
 * a multiple of 32, of the group, and of 256 for nested scales. So any K fits any format
 * (a matrix with K = 576 in groups of 128 has a last group of 64 inputs and 64 padding
 * inputs); the padding holds code 0 and meets zero activations, and its bytes count in
 * the stored size.
 * codes:   [n_panels][Kp/32][QN_CHUNK_BYTES(bits)]; one chunk covers 16 rows x 32 inputs.
 *          A "quad" is 16 rows x 4 consecutive inputs as 64 bytes, byte [n*4 + j] =
 *          code(row n, input 4*quad + j): exactly the operand of one 512-bit vpdpbusd.
 *          A chunk holds 8 quads split into bit planes, stored in this order:
 *            nib   (4 low bits)  4 x 64 B, byte = quad(2v) | quad(2v+1) << 4
 *            crumb (2 bits)      2 x 64 B, byte = sum_i quad(4v+i) << 2i
 *            bit   (1 bit)       1 x 64 B, byte = sum_i quad(i) << i
 *            byte  (8 bits)      8 x 64 B
 *          bits 8 = byte; 6 = nib + crumb(<<4); 5 = nib + bit(<<4); 4 = nib;
 *          3 = crumb + bit(<<2); 2 = crumb.
 * scales:  [n_panels][n_groups][16] in the scale dtype (nested: uint8 / int8 sub-scales)
 * offsets: [n_panels][n_groups][16]: mins (scale dtype, nested: uint8) or zero points
 *          (uint8); absent for sym and lut.
 * supers:  nested only: [n_panels][Kp/256][16] fp16 d, then (asym) a second array dmin.
 */
#ifndef QN_FORMATS_H
#define QN_FORMATS_H

#include "qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define QN_PANEL 16      /* rows per panel */
#define QN_CHUNK 32      /* inputs per chunk */
#define QN_SUPER 256     /* inputs per super-block (nested scales) */
#define QN_MAX_BITS 8

enum qn_kind { QN_SYM = 0, QN_ASYM = 1, QN_LUT = 2 };
enum qn_offset { QN_OFF_NONE = 0, QN_OFF_MIN = 1, QN_OFF_ZERO = 2 };
enum qn_scale {
    QN_SCALE_F32 = 0,
    QN_SCALE_F16 = 1,
    QN_SCALE_BF16 = 2,
    QN_SCALE_NESTED_U6 = 3, /* GGUF q4_k / q5_k: 6-bit sc and mn, fp16 d and dmin */
    QN_SCALE_NESTED_I8 = 4, /* GGUF q6_k: int8 sc, fp16 d */
};
/* Which rule quantize() uses to choose codes (the layout does not depend on it). */
enum qn_rule {
    QN_RULE_DEFAULT = 0,
    QN_RULE_Q4_0 = 1,   /* d = signed absmax / -2^(bits-1), codes trunc(w/d + 2^(bits-1) + .5) */
    QN_RULE_Q8_0 = 2,   /* d = absmax / 127, codes roundf(w/d) */
    QN_RULE_Q4_1 = 3,   /* d = (max - min) / (2^bits - 1), m = min */
    QN_RULE_KQUANT = 4, /* GGUF K-quant search for sub-block scales and mins */
};
/* Special lookup tables the SIMD kernels decode without a table walk. */
enum qn_lut_kind { QN_LUT_TABLE = 0, QN_LUT_FP8_E4M3 = 1, QN_LUT_FP8_E5M2 = 2 };

typedef struct qn_format {
    int32_t bits;       /* 2, 3, 4, 5, 6, 8 */
    int32_t group;      /* 16, 32, 64, 128, 256, or 0 for one group per row */
    int32_t kind;       /* enum qn_kind */
    int32_t offset;     /* enum qn_offset (QN_OFF_NONE unless kind == QN_ASYM) */
    int32_t scale;      /* enum qn_scale */
    int32_t rule;       /* enum qn_rule */
    int32_t lut_kind;   /* enum qn_lut_kind (kind == QN_LUT) */
    int32_t reserved;
    float lut[256];     /* kind == QN_LUT: 2^bits entries */
} qn_format;

/* A quantized matrix in the panel layout above; the arrays belong to the caller. */
typedef struct qn_qweight {
    const qn_format *fmt;
    int64_t N, K;               /* logical shape */
    const uint8_t *codes;       /* [n_panels][Kp/32][QN_CHUNK_BYTES(bits)] */
    const void *scales;         /* [n_panels][n_groups][16] */
    const void *offsets;        /* [n_panels][n_groups][16] or NULL */
    const uint16_t *supers;     /* nested: [n_panels][Kp/256][16] fp16 d, or NULL */
    const uint16_t *super_mins; /* nested asym: [n_panels][Kp/256][16] fp16 dmin, or NULL */
} qn_qweight;

#define QN_CHUNK_BYTES(bits) (64 * (bits))

/* K padded to whole chunks, groups and (nested) super-blocks. */
static inline int64_t qn_fmt_kpad(const qn_format *f, int64_t K) {
    int64_t unit = QN_CHUNK;
    if (f->group > unit) unit = f->group;
    if (f->scale == QN_SCALE_NESTED_U6 || f->scale == QN_SCALE_NESTED_I8) unit = QN_SUPER;
    return qn_round_up(K, unit);
}
static inline int64_t qn_fmt_group(const qn_format *f, int64_t K) {
    return f->group ? f->group : qn_fmt_kpad(f, K);
}
static inline int64_t qn_fmt_ngroups(const qn_format *f, int64_t K) {
    return f->group ? qn_fmt_kpad(f, K) / f->group : 1;
}
static inline int64_t qn_npanels(int64_t N) { return qn_ceil_div(N, QN_PANEL); }
static inline int qn_scale_bytes(int scale) {
    return scale == QN_SCALE_F32 ? 4 : (scale == QN_SCALE_F16 || scale == QN_SCALE_BF16) ? 2 : 1;
}
static inline int qn_fmt_nested(const qn_format *f) {
    return f->scale == QN_SCALE_NESTED_U6 || f->scale == QN_SCALE_NESTED_I8;
}
/* Bytes of the per-group offset entries: zero points and nested mins are uint8. */
static inline int qn_offset_bytes(const qn_format *f) {
    if (f->offset == QN_OFF_NONE) return 0;
    if (f->offset == QN_OFF_ZERO || qn_fmt_nested(f)) return 1;
    return qn_scale_bytes(f->scale);
}

/* Plane offsets inside one chunk, in bytes; -1 when the format has no such plane. */
typedef struct qn_planes { int nib, crumb, bit, byte; } qn_planes;
static inline qn_planes qn_fmt_planes(int bits) {
    qn_planes p = {-1, -1, -1, -1};
    int off = 0;
    if (bits == 8) { p.byte = 0; return p; }
    if (bits >= 4) { p.nib = off; off += 256; }
    if (bits == 6 || bits == 2 || bits == 3) { p.crumb = off; off += 128; }
    if (bits == 5 || bits == 3) { p.bit = off; }
    return p;
}

/* Checks a descriptor; returns QN_EINVAL with a message naming the field. */
qn_status qn_format_check(const qn_format *f);
/* Checks that K is positive (any K fits a format: see qn_fmt_kpad). */
qn_status qn_format_check_k(const qn_format *f, int64_t K);

#ifdef __cplusplus
}
#endif
#endif /* QN_FORMATS_H */
