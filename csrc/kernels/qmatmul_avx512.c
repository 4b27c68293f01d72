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

QN_INLINE __m512 scale16(const void *base, int scale, int64_t i) {
    if (scale == QN_SCALE_F32) return _mm512_loadu_ps((const float *)base + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (scale == QN_SCALE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

QN_INLINE void group_scales(const qn_qtile *t, int64_t p, int64_t gi, __m512 *ws, __m512i *wz, __m512 *wo) {
    int64_t i = (p * t->n_groups + gi) * 16;
    if (t->scale == QN_SCALE_NESTED_U6 || t->scale == QN_SCALE_NESTED_I8) {
        int64_t si = (p * t->n_super + (gi * t->group) / QN_SUPER) * 16;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t->supers + si)));
        __m128i sc = _mm_loadu_si128((const __m128i *)((const uint8_t *)t->scales + i));
        if (t->scale == QN_SCALE_NESTED_U6) {
            *ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
            __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t->super_mins + si)));
            __m128i mn = _mm_loadu_si128((const __m128i *)((const uint8_t *)t->offsets + i));
            __m512 prod = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
            *wo = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(prod), _mm512_set1_epi32((int)0x80000000u)));
        } else {
            *ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
            *wz = _mm512_set1_epi32(1 << (t->bits - 1));
        }
        return;
    }
    *ws = scale16(t->scales, t->scale, i);
    if (t->kind == QN_SYM) *wz = _mm512_set1_epi32(1 << (t->bits - 1));
    else if (t->offset == QN_OFF_ZERO)
        *wz = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)t->offsets + i)));
    else if (t->offset == QN_OFF_MIN) *wo = scale16(t->offsets, t->scale, i);
}

/* ---- int path ---- */

/* Scale the int32 block sums into the fp32 accumulators (block b, group gi). */
#define QN_FLUSH_INT(MR, NP)                                                                       \
    do {                                                                                           \
        for (int p = 0; p < NP; p++) {                                                             \
            __m512 wsv, wov = _mm512_setzero_ps();                                                 \
            __m512i wzv = _mm512_setzero_si512();                                                  \
            group_scales(t, p0 + p, gi, &wsv, &wzv, &wov);                                         \
            for (int r = 0; r < MR; r++) {                                                         \
                int64_t xb = (int64_t)(m0 + r) * t->ldxb + b;                                      \
                __m512i dot = iacc[r][p];                                                          \
                if (has_z) dot = _mm512_sub_epi32(dot, _mm512_mullo_epi32(wzv, _mm512_set1_epi32(t->xisum[xb]))); \
                facc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),                              \
                                             _mm512_mul_ps(wsv, _mm512_set1_ps(t->xd[xb])), facc[r][p]); \
                if (has_o) facc[r][p] = _mm512_fmadd_ps(wov, _mm512_set1_ps(t->xsum[xb]), facc[r][p]); \
                iacc[r][p] = _mm512_setzero_si512();                                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

QN_INLINE void int_quads(__m512i iacc[4][4], const uint8_t *const *pc, const int8_t *const *xr,
                         int64_t c, int64_t cb, const int bits, const int MR, const int NP, const int qa,
                         const int qb) {
    for (int q = qa; q < qb; q++) {
        __m512i wv[4];
        for (int p = 0; p < NP; p++) wv[p] = quad_avx512(pc[p] + c * cb, bits, q);
        for (int r = 0; r < MR; r++) {
            int32_t x4;
            memcpy(&x4, xr[r] + c * 32 + q * 4, 4);
            __m512i xv = _mm512_set1_epi32(x4);
            for (int p = 0; p < NP; p++) iacc[r][p] = _mm512_dpbusd_epi32(iacc[r][p], wv[p], xv);
        }
    }
}

QN_INLINE void int_tile(const qn_qtile *t, int m0, int p0, const int bits, const int MR, const int NP) {
    const int64_t cb = QN_CHUNK_BYTES(bits), nchunks = t->Kp / QN_CHUNK;
    const uint8_t *pc[4];
    const int8_t *xr[4];
    __m512i iacc[4][4];
    __m512 facc[4][4];
    const int has_o = t->offset == QN_OFF_MIN, has_z = !has_o;
    for (int p = 0; p < NP; p++) pc[p] = t->codes + (int64_t)(p0 + p) * t->panel_bytes;
    for (int r = 0; r < MR; r++) xr[r] = t->xq + (int64_t)(m0 + r) * t->ldxq;
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) {
            iacc[r][p] = _mm512_setzero_si512();
            facc[r][p] = _mm512_setzero_ps();
        }
    if (t->fb == 16) {
        /* two blocks per chunk (group 16) */
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t b = 2 * c, gi = (16 * b) / t->group;
            int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 0, 4);
            QN_FLUSH_INT(MR, NP);
            b = 2 * c + 1;
            gi = (16 * b) / t->group;
            int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 4, 8);
            QN_FLUSH_INT(MR, NP);
        }
    } else {
        int64_t cpb = t->fb / QN_CHUNK; /* chunks per block */
        int64_t nb = qn_ceil_div(nchunks, cpb);
        for (int64_t b = 0; b < nb; b++) {
            int64_t c1 = qn_min64((b + 1) * cpb, nchunks), gi = (b * t->fb) / t->group;
            for (int64_t c = b * cpb; c < c1; c++) {
                if (c + 2 < c1)
                    for (int p = 0; p < NP; p++) _mm_prefetch((const char *)(pc[p] + (c + 8) * cb), _MM_HINT_T0);
                int_quads(iacc, pc, xr, c, cb, bits, MR, NP, 0, 8);
            }
            QN_FLUSH_INT(MR, NP);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int p = 0; p < NP; p++) {
            int64_t c0 = (int64_t)(p0 + p) * 16;
            _mm512_mask_storeu_ps(t->y + (int64_t)(m0 + r) * t->ldy + c0, col_mask(t->ncols, c0), facc[r][p]);
        }
}

#define QN_INT_VARIANTS(BITS)                                                                      \
    static void int_tiles_##BITS(const qn_qtile *t) {                                             \
        int m = 0;                                                                                 \
        for (; m + 4 <= t->mr; m += 4) {                                                           \
            int p = 0;                                                                             \
            for (; p + 2 <= t->np; p += 2) int_tile(t, m, p, BITS, 4, 2);                          \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 4, 1);                                  \
        }                                                                                          \
        int rem = t->mr - m;                                                                       \
        int p = 0;                                                                                 \
        if (rem == 3) {                                                                            \
            for (; p + 2 <= t->np; p += 2) int_tile(t, m, p, BITS, 3, 2);                          \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 3, 1);                                  \
        } else if (rem == 2) {                                                                     \
            for (; p + 4 <= t->np; p += 4) int_tile(t, m, p, BITS, 2, 4);                          \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 2, 1);                                  \
        } else if (rem == 1) {                                                                     \
            for (; p + 4 <= t->np; p += 4) int_tile(t, m, p, BITS, 1, 4);                          \
            for (; p < t->np; p++) int_tile(t, m, p, BITS, 1, 1);                                  \
        }                                                                                          \
    }

QN_INT_VARIANTS(2)
QN_INT_VARIANTS(3)
QN_INT_VARIANTS(4)
QN_INT_VARIANTS(5)
QN_INT_VARIANTS(6)
QN_INT_VARIANTS(8)

void qn_qtile_int_avx512(const qn_qtile *t) {
    switch (t->bits) {
    case 2: int_tiles_2(t); break;
    case 3: int_tiles_3(t); break;
    case 4: int_tiles_4(t); break;
    case 5: int_tiles_5(t); break;
    case 6: int_tiles_6(t); break;
    default: int_tiles_8(t); break;
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
        for (int p = 0; p < NP; p++) {                                                             \
            __m512 wsv, wov;                                                                       \
            __m512i wzv;                                                                           \
            group_scales(t, p0 + p, gi, &wsv, &wzv, &wov);                                         \
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
