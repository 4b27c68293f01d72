/* qmatmul_avx512.c — AVX-512 (F/BW/VL/DQ + VNNI) inner kernels for qmatmul.h.
 *
 * Int formats: a quad of the panel layout is 16 rows x 4 inputs of unsigned codes, the
 * exact operand of vpdpbusd against 4 int8 activations broadcast to all lanes. A tile of
 * MR activation rows x NP panels keeps MR*NP int32 and MR*NP fp32 accumulators in
 * registers; at the end of each activation block the int32 sums are scaled into the
 * fp32 ones (zero points folded in as integers, mins added as m * sum(x)).
 * LUT formats: codes become table values (vpermps, vpermi2ps, fp8 bit tricks or a
 * gather) and meet fp32 activations with FMA; per-group sums are then scaled.
 * Same operation order as the _ref kernels in qmatmul.c. Single-threaded: the driver
 * owns the parallelism.
 */
#include <immintrin.h>

#include "qmatmul.h"

/* ---- code unpacking: quad q (0..7) of a chunk as 64 unsigned bytes ---- */

QN_INLINE __m512i quad_avx512(const uint8_t *c, const int bits, const int q) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x01);
    if (bits == 8) return _mm512_loadu_si512((const void *)(c + q * 64));
    __m512i v = _mm512_setzero_si512();
    int sh = 0;
    if (bits >= 4) {
        __m512i n = _mm512_loadu_si512((const void *)(c + (q / 2) * 64));
        v = (q & 1) ? _mm512_and_si512(_mm512_srli_epi16(n, 4), m4) : _mm512_and_si512(n, m4);
        sh = 4;
    }
    if (bits == 6 || bits == 3 || bits == 2) {
        int off = bits >= 4 ? 256 : 0;
        __m512i cr = _mm512_loadu_si512((const void *)(c + off + (q / 4) * 64));
        cr = _mm512_and_si512(_mm512_srli_epi16(cr, 2 * (q & 3)), m2);
        v = sh ? _mm512_or_si512(v, _mm512_slli_epi16(cr, sh)) : cr;
        sh += 2;
    }
    if (bits == 5 || bits == 3) {
        int off = bits == 5 ? 256 : 128;
        __m512i b = _mm512_loadu_si512((const void *)(c + off));
        b = _mm512_and_si512(_mm512_srli_epi16(b, q), m1);
        v = _mm512_or_si512(v, _mm512_slli_epi16(b, sh));
    }
    return v;
}

QN_INLINE __mmask16 col_mask(int64_t ncols, int64_t c0) {
    int64_t n = ncols - c0;
    if (n >= 16) return (__mmask16)0xFFFF;
    return n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* ---- scales of one group for 16 rows: the vector twin of qn_qtile_group_scale ---- */

/* Scale modes: the common presets get kernels with their scale decoding fixed at compile
 * time (no branches in the flush); SM_GENERIC reads the mode from the tile. */
enum { SM_GENERIC, SM_F16_SYM, SM_F16_MIN, SM_F16_ZERO, SM_F32_SYM, SM_KQ_U6, SM_KQ_I8 };

/* Per-tile constants of the scale decoding, hoisted out of the loops. */
typedef struct scale_ctx {
    const uint8_t *scales, *offsets;
    const uint16_t *supers, *super_mins;
    int64_t n_groups, n_super, group;
    int scale, kind, offset, sbytes, obytes;
    int32_t zconst; /* symmetric: the shared zero point, subtracted as z * sum(x) */
} scale_ctx;

QN_INLINE scale_ctx make_scale_ctx(const qn_qtile *t) {
    scale_ctx c;
    c.scales = (const uint8_t *)t->scales;
    c.offsets = (const uint8_t *)t->offsets;
    c.supers = t->supers;
    c.super_mins = t->super_mins;
    c.n_groups = t->n_groups;
    c.n_super = t->n_super;
    c.group = t->group;
    c.scale = t->scale;
    c.kind = t->kind;
    c.offset = t->offset;
    c.sbytes = t->scale == QN_SCALE_F32 ? 4 : (t->scale == QN_SCALE_F16 || t->scale == QN_SCALE_BF16) ? 2 : 1;
    c.obytes = (t->offset == QN_OFF_ZERO || c.sbytes == 1) ? 1 : c.sbytes;
    c.zconst = t->kind == QN_SYM ? 1 << (t->bits - 1) : 0;
    return c;
}

QN_INLINE int sm_scale(const scale_ctx *c, const int MODE) {
    switch (MODE) {
    case SM_F16_SYM: case SM_F16_MIN: case SM_F16_ZERO: return QN_SCALE_F16;
    case SM_F32_SYM: return QN_SCALE_F32;
    case SM_KQ_U6: return QN_SCALE_NESTED_U6;
    case SM_KQ_I8: return QN_SCALE_NESTED_I8;
    default: return c->scale;
    }
}
QN_INLINE int sm_offset(const scale_ctx *c, const int MODE) {
    switch (MODE) {
    case SM_F16_SYM: case SM_F32_SYM: case SM_KQ_I8: return QN_OFF_NONE;
    case SM_F16_MIN: case SM_KQ_U6: return QN_OFF_MIN;
    case SM_F16_ZERO: return QN_OFF_ZERO;
    default: return c->offset;
    }
}
QN_INLINE int32_t sm_zconst(const scale_ctx *c, const int MODE) {
    switch (MODE) {
    case SM_F16_MIN: case SM_F16_ZERO: case SM_KQ_U6: return 0;
    case SM_GENERIC: return c->zconst;
    default: return c->zconst; /* symmetric modes: 2^(bits-1), set per tile */
    }
}
QN_INLINE int sm_nested(const scale_ctx *c, const int MODE) {
    return MODE == SM_GENERIC ? c->sbytes == 1 : (MODE == SM_KQ_U6 || MODE == SM_KQ_I8);
}

QN_INLINE __m512 scale16(const void *base, int scale, int64_t i) {
    if (scale == QN_SCALE_F32) return _mm512_loadu_ps((const float *)base + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (scale == QN_SCALE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The super-block scales of 16 rows, decoded once per super-block of the nested formats:
 * d, and -dmin (U6; the negation is exact, so -dmin * m equals -(dmin * m)). */
typedef struct super_regs { __m512 d[4], nm[4]; } super_regs;

QN_INLINE super_regs no_super(void) {
    super_regs sr;
    for (int p = 0; p < 4; p++) sr.d[p] = sr.nm[p] = _mm512_setzero_ps();
    return sr;
}

QN_INLINE void super_scales(const scale_ctx *c, int64_t p0, int64_t gi, super_regs *sr, const int NP,
                            const int MODE) {
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    for (int p = 0; p < NP; p++) {
        int64_t si = ((p0 + p) * c->n_super + (gi * c->group) / QN_SUPER) * 16;
        sr->d[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c->supers + si)));
        if (sm_scale(c, MODE) == QN_SCALE_NESTED_U6)
            sr->nm[p] = _mm512_xor_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c->super_mins + si))),
                                      sign);
    }
}

/* Scale, zero point and min of group gi for the 16 rows of panel p (tile-relative p0 + p);
 * nested formats take their super-block scales from sr. */
QN_INLINE void group_scales(const scale_ctx *c, int64_t p0, int p, int64_t gi, const super_regs *sr, __m512 *ws,
                            __m512i *wz, __m512 *wo, const int MODE) {
    int64_t i = ((p0 + p) * c->n_groups + gi) * 16;
    const int scale = sm_scale(c, MODE), offset = sm_offset(c, MODE);
    if (sm_nested(c, MODE)) {
        __m128i sc = _mm_loadu_si128((const __m128i *)(c->scales + i));
        if (scale == QN_SCALE_NESTED_U6) {
            *ws = _mm512_mul_ps(sr->d[p], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
            __m128i mn = _mm_loadu_si128((const __m128i *)(c->offsets + i));
            *wo = _mm512_mul_ps(sr->nm[p], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
        } else {
            *ws = _mm512_mul_ps(sr->d[p], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
        }
        return;
    }
    *ws = scale16(c->scales, scale, i);
    if (offset == QN_OFF_ZERO) *wz = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c->offsets + i)));
    else if (offset == QN_OFF_MIN) *wo = scale16(c->offsets, scale, i);
}

/* ---- int path ---- */

/* Scale the int32 block sums of MR rows x NP panels into the fp32 accumulators. */
QN_INLINE void flush_int(__m512i iacc[4][4], __m512 facc[4][4], const qn_qtile *t, const scale_ctx *sc,
                         super_regs *sr, int m0, int p0, int64_t b, int64_t gi, const int MR, const int NP,
                         const int MODE) {
    __m512 xdv[4], xsv[4];
    __m512i zsv[4], isv[4];
    const int has_o = sm_offset(sc, MODE) == QN_OFF_MIN;
    const int32_t zconst = sm_zconst(sc, MODE);
    if (sm_nested(sc, MODE) && ((gi * sc->group) & (QN_SUPER - 1)) == 0) super_scales(sc, p0, gi, sr, NP, MODE);
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
        int64_t xb = (int64_t)(m0 + r) * t->ldxb + b;
        xdv[r] = _mm512_set1_ps(t->xd[xb]);
        xsv[r] = _mm512_set1_ps(t->xsum[xb]);
        isv[r] = _mm512_set1_epi32(t->xisum[xb]);
        zsv[r] = _mm512_set1_epi32(zconst * t->xisum[xb]);
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
        __m512 wsv, wov = _mm512_setzero_ps();
        __m512i wzv = _mm512_setzero_si512();
        group_scales(sc, p0, p, gi, sr, &wsv, &wzv, &wov, MODE);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
            __m512i dot = iacc[r][p];
            if (zconst) dot = _mm512_sub_epi32(dot, zsv[r]);
            else if (!has_o) dot = _mm512_sub_epi32(dot, _mm512_mullo_epi32(wzv, isv[r]));
            facc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wsv, xdv[r]), facc[r][p]);
            if (has_o) facc[r][p] = _mm512_fmadd_ps(wov, xsv[r], facc[r][p]);
            iacc[r][p] = _mm512_setzero_si512();
        }
    }
}

QN_INLINE void int_quads(__m512i iacc[4][4], const uint8_t *const *pc, const int8_t *const *xr,
                         int64_t c, int64_t cb, const int bits, const int MR, const int NP, const int qa,
                         const int qb) {
#pragma GCC unroll 8
    for (int q = qa; q < qb; q++) {
        __m512i wv[4];
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) wv[p] = quad_avx512(pc[p] + c * cb, bits, q);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
            int32_t x4;
            memcpy(&x4, xr[r] + c * 32 + q * 4, 4);
            __m512i xv = _mm512_set1_epi32(x4);
            for (int p = 0; p < NP; p++) iacc[r][p] = _mm512_dpbusd_epi32(iacc[r][p], wv[p], xv);
        }
    }
}

QN_INLINE void int_tile(const qn_qtile *t, int m0, int p0, const int bits, const int MR, const int NP,
                        const int MODE) {
    const int64_t cb = QN_CHUNK_BYTES(bits), nchunks = t->Kp / QN_CHUNK;
    const uint8_t *pc[4];
    const int8_t *xr[4];
    __m512i iacc[4][4];
    __m512 facc[4][4];
    const scale_ctx sc = make_scale_ctx(t);
    for (int p = 0; p < NP; p++) pc[p] = t->codes + (int64_t)(p0 + p) * t->panel_bytes;
    for (int r = 0; r < MR; r++) xr[r] = t->xq + (int64_t)(m0 + r) * t->ldxq;
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) {
            iacc[r][p] = _mm512_setzero_si512();
            facc[r][p] = _mm512_setzero_ps();
        }
    super_regs sr = no_super();
    if (t->fb == 16) {
        /* two blocks per chunk (group 16) */
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t b = 2 * c, gi = b;
            int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 0, 4);
            flush_int(iacc, facc, t, &sc, &sr, m0, p0, b, gi, MR, NP, MODE);
            b = gi = 2 * c + 1;
            int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 4, 8);
            flush_int(iacc, facc, t, &sc, &sr, m0, p0, b, gi, MR, NP, MODE);
        }
    } else {
        /* blocks are whole groups (group <= 256) or slices of the one per-row group */
        const int64_t cpb = t->fb / QN_CHUNK, nb = qn_ceil_div(nchunks, cpb);
        const int one_group = t->n_groups == 1;
        for (int64_t b = 0; b < nb; b++) {
            int64_t c1 = qn_min64((b + 1) * cpb, nchunks), gi = one_group ? 0 : b;
            for (int64_t c = b * cpb; c < c1; c++) int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 0, 8);
            flush_int(iacc, facc, t, &sc, &sr, m0, p0, b, gi, MR, NP, MODE);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) {
            int64_t c0 = (int64_t)(p0 + p) * 16;
            _mm512_mask_storeu_ps(t->y + (int64_t)(m0 + r) * t->ldy + c0, col_mask(t->ncols, c0), facc[r][p]);
        }
}

#define QN_INT_VARIANTS(BITS, MODE)                                                                \
    static void int_tiles_##BITS##_##MODE(const qn_qtile *t) {                                    \
        int m = 0;                                                                                 \
        for (; m + 4 <= t->mr; m += 4) {                                                           \
            int p = 0;                                                                             \
            for (; p + 2 <= t->np; p += 2) int_tile(t, m, p, BITS, 4, 2, MODE);                    \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 4, 1, MODE);                            \
        }                                                                                          \
        if (m + 2 <= t->mr) {                                                                      \
            int p = 0;                                                                             \
            for (; p + 4 <= t->np; p += 4) int_tile(t, m, p, BITS, 2, 4, MODE);                    \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 2, 1, MODE);                            \
            m += 2;                                                                                \
        }                                                                                          \
        if (m < t->mr) {                                                                           \
            int p = 0;                                                                             \
            for (; p + 4 <= t->np; p += 4) int_tile(t, m, p, BITS, 1, 4, MODE);                    \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 1, 1, MODE);                            \
        }                                                                                          \
    }

QN_INT_VARIANTS(2, SM_GENERIC)
QN_INT_VARIANTS(3, SM_GENERIC)
QN_INT_VARIANTS(4, SM_GENERIC)
QN_INT_VARIANTS(5, SM_GENERIC)
QN_INT_VARIANTS(6, SM_GENERIC)
QN_INT_VARIANTS(8, SM_GENERIC)
/* QN_FEW_VARIANTS (sanitizer builds) keeps only the generic mode: the same indexing code,
 * a fraction of the compile time. */
#ifndef QN_FEW_VARIANTS
QN_INT_VARIANTS(4, SM_F16_SYM)   /* q4_0, int4_g128 */
QN_INT_VARIANTS(8, SM_F16_SYM)   /* q8_0 */
QN_INT_VARIANTS(4, SM_F16_MIN)   /* q4_1 */
QN_INT_VARIANTS(4, SM_F16_ZERO)  /* int4_g128_asym */
QN_INT_VARIANTS(8, SM_F32_SYM)   /* int8 */
QN_INT_VARIANTS(4, SM_KQ_U6)     /* q4_k */
QN_INT_VARIANTS(5, SM_KQ_U6)     /* q5_k */
QN_INT_VARIANTS(6, SM_KQ_I8)     /* q6_k */
#endif

#ifndef QN_FEW_VARIANTS
/* The compile-time scale mode of a tile, or SM_GENERIC. */
static int scale_mode(const qn_qtile *t) {
    if (t->scale == QN_SCALE_NESTED_U6) return SM_KQ_U6;
    if (t->scale == QN_SCALE_NESTED_I8) return SM_KQ_I8;
    if (t->scale == QN_SCALE_F32 && t->kind == QN_SYM) return SM_F32_SYM;
    if (t->scale != QN_SCALE_F16) return SM_GENERIC;
    if (t->kind == QN_SYM) return SM_F16_SYM;
    return t->offset == QN_OFF_MIN ? SM_F16_MIN : SM_F16_ZERO;
}
#endif

void qn_qtile_int_avx512(const qn_qtile *t) {
#ifndef QN_FEW_VARIANTS
    switch (t->bits * 16 + scale_mode(t)) {
    case 4 * 16 + SM_F16_SYM: int_tiles_4_SM_F16_SYM(t); return;
    case 8 * 16 + SM_F16_SYM: int_tiles_8_SM_F16_SYM(t); return;
    case 4 * 16 + SM_F16_MIN: int_tiles_4_SM_F16_MIN(t); return;
    case 4 * 16 + SM_F16_ZERO: int_tiles_4_SM_F16_ZERO(t); return;
    case 8 * 16 + SM_F32_SYM: int_tiles_8_SM_F32_SYM(t); return;
    case 4 * 16 + SM_KQ_U6: int_tiles_4_SM_KQ_U6(t); return;
    case 5 * 16 + SM_KQ_U6: int_tiles_5_SM_KQ_U6(t); return;
    case 6 * 16 + SM_KQ_I8: int_tiles_6_SM_KQ_I8(t); return;
    default: break;
    }
#endif
    switch (t->bits) {
    case 2: int_tiles_2_SM_GENERIC(t); break;
    case 3: int_tiles_3_SM_GENERIC(t); break;
    case 4: int_tiles_4_SM_GENERIC(t); break;
    case 5: int_tiles_5_SM_GENERIC(t); break;
    case 6: int_tiles_6_SM_GENERIC(t); break;
    default: int_tiles_8_SM_GENERIC(t); break;
    }
}

/* ---- lut path ---- */

typedef struct lut_regs { __m512 t0, t1, t2, t3; } lut_regs;

/* Table values for 16 int32 code lanes. */
QN_INLINE __m512 lut_lookup(__m512i idx, const lut_regs *L, const float *lut, const int bits, int kind) {
    if (bits <= 4) return _mm512_permutexvar_ps(idx, L->t0);
    if (bits == 5) return _mm512_permutex2var_ps(L->t0, idx, L->t1);
    if (bits == 6) {
        __m512 lo = _mm512_permutex2var_ps(L->t0, idx, L->t1);
        __m512 hi = _mm512_permutex2var_ps(L->t2, idx, L->t3);
        __mmask16 upper = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
        return _mm512_mask_blend_ps(upper, lo, hi);
    }
    if (kind == QN_LUT_FP8_E4M3 || kind == QN_LUT_FP8_E5M2) {
        /* fp8 -> fp16 bits -> fp32; magnitudes past the largest finite value clamp to it,
         * as the table does */
        __m512i sign = _mm512_slli_epi32(_mm512_and_si512(idx, _mm512_set1_epi32(0x80)), 8);
        __m512i mag = _mm512_and_si512(idx, _mm512_set1_epi32(0x7F));
        __m512i h;
        if (kind == QN_LUT_FP8_E4M3) {
            mag = _mm512_min_epu32(mag, _mm512_set1_epi32(0x7E));
            h = _mm512_or_si512(sign, _mm512_slli_epi32(mag, 7));
        } else {
            mag = _mm512_min_epu32(mag, _mm512_set1_epi32(0x7B));
            h = _mm512_or_si512(sign, _mm512_slli_epi32(mag, 8));
        }
        __m512 v = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
        return kind == QN_LUT_FP8_E4M3 ? _mm512_mul_ps(v, _mm512_set1_ps(256.0f)) : v;
    }
    return _mm512_i32gather_ps(idx, lut, 4);
}

QN_INLINE void lut_quads(__m512 gacc[4][4], const uint8_t *const *pc, const float *const *xr, int64_t c,
                         int64_t cb, const lut_regs *L, const float *lut, const int bits, int kind,
                         const int MR, const int NP, const int qa, const int qb) {
    const __m512i mff = _mm512_set1_epi32(0xFF);
    for (int q = qa; q < qb; q++) {
        __m512i wq[4];
        for (int p = 0; p < NP; p++) wq[p] = quad_avx512(pc[p] + c * cb, bits, q);
        for (int j = 0; j < 4; j++) {
            __m512 wv[4];
            for (int p = 0; p < NP; p++)
                wv[p] = lut_lookup(_mm512_and_si512(_mm512_srli_epi32(wq[p], 8 * j), mff), L, lut, bits, kind);
            for (int r = 0; r < MR; r++) {
                __m512 xv = _mm512_set1_ps(xr[r][c * 32 + q * 4 + j]);
                for (int p = 0; p < NP; p++) gacc[r][p] = _mm512_fmadd_ps(wv[p], xv, gacc[r][p]);
            }
        }
    }
}

#define QN_FLUSH_LUT(MR, NP)                                                                       \
    do {                                                                                           \
        if (sm_nested(&sc, SM_GENERIC) && ((gi * sc.group) & (QN_SUPER - 1)) == 0)                   \
            super_scales(&sc, p0, gi, &sr, NP, SM_GENERIC);                                        \
        for (int p = 0; p < NP; p++) {                                                             \
            __m512 wsv, wov;                                                                       \
            __m512i wzv;                                                                           \
            group_scales(&sc, p0, p, gi, &sr, &wsv, &wzv, &wov, SM_GENERIC);                               \
            for (int r = 0; r < MR; r++) {                                                         \
                facc[r][p] = _mm512_fmadd_ps(gacc[r][p], wsv, facc[r][p]);                         \
                gacc[r][p] = _mm512_setzero_ps();                                                  \
            }                                                                                      \
        }                                                                                          \
    } while (0)

QN_INLINE void lut_tile(const qn_qtile *t, int m0, int p0, const int bits, const int MR, const int NP) {
    const int64_t cb = QN_CHUNK_BYTES(bits), nchunks = t->Kp / QN_CHUNK;
    const uint8_t *pc[4];
    const float *xr[4];
    __m512 gacc[4][4], facc[4][4];
    lut_regs L;
    super_regs sr = no_super();
    const scale_ctx sc = make_scale_ctx(t);
    const float *lut = t->lut;
    int kind = t->lut_kind;
    L.t0 = _mm512_loadu_ps(lut);
    L.t1 = bits >= 5 ? _mm512_loadu_ps(lut + 16) : L.t0;
    L.t2 = bits >= 6 ? _mm512_loadu_ps(lut + 32) : L.t0;
    L.t3 = bits >= 6 ? _mm512_loadu_ps(lut + 48) : L.t0;
    for (int p = 0; p < NP; p++) pc[p] = t->codes + (int64_t)(p0 + p) * t->panel_bytes;
    for (int r = 0; r < MR; r++) xr[r] = t->xf + (int64_t)(m0 + r) * t->ldxf;
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) gacc[r][p] = facc[r][p] = _mm512_setzero_ps();
    if (t->group == 16) {
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t gi = 2 * c;
            lut_quads(gacc, pc, xr, c, cb, &L, lut, bits, kind, MR, NP, 0, 4);
            QN_FLUSH_LUT(MR, NP);
            gi = 2 * c + 1;
            lut_quads(gacc, pc, xr, c, cb, &L, lut, bits, kind, MR, NP, 4, 8);
            QN_FLUSH_LUT(MR, NP);
        }
    } else {
        int64_t cpg = t->group / QN_CHUNK;
        for (int64_t gi = 0; gi < t->n_groups; gi++) {
            int64_t c1 = qn_min64((gi + 1) * cpg, nchunks);
            for (int64_t c = gi * cpg; c < c1; c++)
                lut_quads(gacc, pc, xr, c, cb, &L, lut, bits, kind, MR, NP, 0, 8);
            QN_FLUSH_LUT(MR, NP);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) {
            int64_t c0 = (int64_t)(p0 + p) * 16;
            _mm512_mask_storeu_ps(t->y + (int64_t)(m0 + r) * t->ldy + c0, col_mask(t->ncols, c0), facc[r][p]);
        }
}

#define QN_LUT_VARIANTS(BITS)                                                                      \
    static void lut_tiles_##BITS(const qn_qtile *t) {                                             \
        int m = 0;                                                                                 \
        for (; m + 4 <= t->mr; m += 4) {                                                           \
            int p = 0;                                                                             \
            for (; p + 2 <= t->np; p += 2) lut_tile(t, m, p, BITS, 4, 2);                          \
            for (; p < t->np; p++) lut_tile(t, m, p, BITS, 4, 1);                                  \
        }                                                                                          \
        for (; m < t->mr; m++) {                                                                   \
            int p = 0;                                                                             \
            for (; p + 4 <= t->np; p += 4) lut_tile(t, m, p, BITS, 1, 4);                          \
            for (; p < t->np; p++) lut_tile(t, m, p, BITS, 1, 1);                                  \
        }                                                                                          \
    }

QN_LUT_VARIANTS(2)
QN_LUT_VARIANTS(3)
QN_LUT_VARIANTS(4)
QN_LUT_VARIANTS(5)
QN_LUT_VARIANTS(6)
QN_LUT_VARIANTS(8)

void qn_qtile_lut_avx512(const qn_qtile *t) {
    switch (t->bits) {
    case 2: lut_tiles_2(t); break;
    case 3: lut_tiles_3(t); break;
    case 4: lut_tiles_4(t); break;
    case 5: lut_tiles_5(t); break;
    case 6: lut_tiles_6(t); break;
    default: lut_tiles_8(t); break;
    }
}

/* ---- activation quantization ---- */

QN_INLINE __m512 load16_x(const void *x, int xdtype, int64_t k, __mmask16 m) {
    if (xdtype == QN_X_F32) return _mm512_maskz_loadu_ps(m, (const float *)x + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + k);
    if (xdtype == QN_X_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

void qn_quantize_act_row_avx512(int8_t *xq, float *xd, float *xsum, int32_t *xisum, const void *x,
                                int xdtype, int64_t K, int64_t Kp, int64_t fb) {
    int64_t nb = qn_ceil_div(Kp, fb);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < nb; b++) {
        int64_t k0 = b * fb, k1 = qn_min64(k0 + fb, Kp), kr = qn_min64(k1, K);
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 16) {
            __mmask16 m = col_mask(kr, k);
            vmax = _mm512_max_ps(vmax, _mm512_and_ps(load16_x(x, xdtype, k, m), absmask));
        }
        float amax = _mm512_reduce_max_ps(vmax);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i isum = _mm512_setzero_si512();
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (int64_t k = k0; k < k1; k += 16) {
            __mmask16 m = col_mask(kr, k);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_x(x, xdtype, k, m), idv));
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            isum = _mm512_add_epi32(isum, q);
            _mm_storeu_si128((__m128i *)(xq + k), _mm512_cvtepi32_epi8(q));
        }
        int32_t s = _mm512_reduce_add_epi32(isum);
        xd[b] = d;
        xisum[b] = s;
        xsum[b] = d * (float)s;
    }
}
