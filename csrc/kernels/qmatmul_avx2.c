/* qmatmul_avx2.c — AVX2 + FMA + F16C inner kernels for qmatmul.h.
 *
 * A panel is handled as two halves of 8 rows (32-byte quads). Int formats: u8 codes x s8
 * activations with vpmaddubsw + vpmaddwd; 8-bit codes would saturate vpmaddubsw, so they
 * are re-centred to signed (code - 128) and multiplied with the sign trick, and the
 * 128 * sum(x) is added back as an integer: the same int32 sums as the reference.
 * LUT formats: table values by gather, FMA with fp32 activations.
 * Same operation order as the _ref kernels in qmatmul.c. Single-threaded.
 */
#include <immintrin.h>

#include "qmatmul.h"

/* Quad q of a chunk, half h (rows 8h .. 8h+7), as 32 unsigned bytes. */
QN_INLINE __m256i quad_avx2(const uint8_t *c, const int bits, const int q, const int h) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), m1 = _mm256_set1_epi8(0x01);
    c += 32 * h;
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)(c + q * 64));
    __m256i v = _mm256_setzero_si256();
    int sh = 0;
    if (bits >= 4) {
        __m256i n = _mm256_loadu_si256((const __m256i *)(c + (q / 2) * 64));
        v = (q & 1) ? _mm256_and_si256(_mm256_srli_epi16(n, 4), m4) : _mm256_and_si256(n, m4);
        sh = 4;
    }
    if (bits == 6 || bits == 3 || bits == 2) {
        int off = bits >= 4 ? 256 : 0;
        __m256i cr = _mm256_loadu_si256((const __m256i *)(c + off + (q / 4) * 64));
        cr = _mm256_and_si256(_mm256_srli_epi16(cr, 2 * (q & 3)), m2);
        v = sh ? _mm256_or_si256(v, _mm256_slli_epi16(cr, sh)) : cr;
        sh += 2;
    }
    if (bits == 5 || bits == 3) {
        int off = bits == 5 ? 256 : 128;
        __m256i b = _mm256_loadu_si256((const __m256i *)(c + off));
        b = _mm256_and_si256(_mm256_srli_epi16(b, q), m1);
        v = _mm256_or_si256(v, _mm256_slli_epi16(b, sh));
    }
    return v;
}

QN_INLINE void store_cols(float *y, int64_t ncols, int64_t c0, __m256 v) {
    int64_t n = ncols - c0;
    if (n >= 8) { _mm256_storeu_ps(y + c0, v); return; }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int64_t i = 0; i < n; i++) y[c0 + i] = tmp[i];
}

/* ---- scales of one group for 8 rows (half h of a panel): twin of qn_qtile_group_scale ---- */

QN_INLINE __m256 scale8(const void *base, int scale, int64_t i) {
    if (scale == QN_SCALE_F32) return _mm256_loadu_ps((const float *)base + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (scale == QN_SCALE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

QN_INLINE __m128i load8_u8(const void *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return _mm_cvtsi64_si128(v);
}

QN_INLINE void group_scales8(const qn_qtile *t, int64_t p, int64_t gi, int h, __m256 *ws, __m256i *wz, __m256 *wo) {
    int64_t i = (p * t->n_groups + gi) * 16 + 8 * h;
    *wz = _mm256_setzero_si256();
    *wo = _mm256_setzero_ps();
    if (t->scale == QN_SCALE_NESTED_U6 || t->scale == QN_SCALE_NESTED_I8) {
        int64_t si = (p * t->n_super + (gi * t->group) / QN_SUPER) * 16 + 8 * h;
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t->supers + si)));
        __m128i sc = load8_u8((const uint8_t *)t->scales + i);
        if (t->scale == QN_SCALE_NESTED_U6) {
            *ws = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
            __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t->super_mins + si)));
            __m256 prod = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8_u8((const uint8_t *)t->offsets + i))));
            *wo = _mm256_xor_ps(prod, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
        } else {
            *ws = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
            *wz = _mm256_set1_epi32(1 << (t->bits - 1));
        }
        return;
    }
    *ws = scale8(t->scales, t->scale, i);
    if (t->kind == QN_SYM) *wz = _mm256_set1_epi32(1 << (t->bits - 1));
    else if (t->offset == QN_OFF_ZERO) *wz = _mm256_cvtepu8_epi32(load8_u8((const uint8_t *)t->offsets + i));
    else if (t->offset == QN_OFF_MIN) *wo = scale8(t->offsets, t->scale, i);
}

/* ---- int path: MR rows x one panel (two halves) ---- */

QN_INLINE void int_tile2(const qn_qtile *t, int m0, int p0, const int bits, const int MR) {
    const int64_t cb = QN_CHUNK_BYTES(bits), nchunks = t->Kp / QN_CHUNK;
    const uint8_t *pc = t->codes + (int64_t)p0 * t->panel_bytes;
    const int8_t *xr[2];
    __m256i iacc[2][2];
    __m256 facc[2][2];
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    const int has_o = t->offset == QN_OFF_MIN, has_z = !has_o;
    for (int r = 0; r < MR; r++) {
        xr[r] = t->xq + (int64_t)(m0 + r) * t->ldxq;
        for (int h = 0; h < 2; h++) { iacc[r][h] = _mm256_setzero_si256(); facc[r][h] = _mm256_setzero_ps(); }
    }
    int64_t qpb = t->fb / 4; /* quads per activation block */
    int64_t nquads = nchunks * 8;
    for (int64_t q0 = 0, b = 0; q0 < nquads; q0 += qpb, b++) {
        int64_t q1 = qn_min64(q0 + qpb, nquads);
        for (int64_t qq = q0; qq < q1; qq++) {
            int64_t c = qq / 8;
            int q = (int)(qq % 8);
            for (int h = 0; h < 2; h++) {
                __m256i w;
                switch (q) { /* constant quad index for the unpacking shifts */
                case 0: w = quad_avx2(pc + c * cb, bits, 0, h); break;
                case 1: w = quad_avx2(pc + c * cb, bits, 1, h); break;
                case 2: w = quad_avx2(pc + c * cb, bits, 2, h); break;
                case 3: w = quad_avx2(pc + c * cb, bits, 3, h); break;
                case 4: w = quad_avx2(pc + c * cb, bits, 4, h); break;
                case 5: w = quad_avx2(pc + c * cb, bits, 5, h); break;
                case 6: w = quad_avx2(pc + c * cb, bits, 6, h); break;
                default: w = quad_avx2(pc + c * cb, bits, 7, h); break;
                }
                if (bits == 8) w = _mm256_xor_si256(w, flip); /* code - 128 as signed */
                for (int r = 0; r < MR; r++) {
                    int32_t x4;
                    memcpy(&x4, xr[r] + qq * 4, 4);
                    __m256i xv = _mm256_set1_epi32(x4), prod;
                    if (bits == 8) prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                    else prod = _mm256_maddubs_epi16(w, xv);
                    iacc[r][h] = _mm256_add_epi32(iacc[r][h], _mm256_madd_epi16(prod, ones));
                }
            }
        }
        int64_t gi = t->n_groups == 1 ? 0 : b; /* a block is a group or a slice of the per-row group */
        for (int h = 0; h < 2; h++) {
            __m256 wsv, wov;
            __m256i wzv;
            group_scales8(t, p0, gi, h, &wsv, &wzv, &wov);
            if (bits == 8) wzv = _mm256_sub_epi32(wzv, _mm256_set1_epi32(128));
            for (int r = 0; r < MR; r++) {
                int64_t xb = (int64_t)(m0 + r) * t->ldxb + b;
                __m256i dot = iacc[r][h];
                if (has_z || bits == 8)
                    dot = _mm256_sub_epi32(dot, _mm256_mullo_epi32(wzv, _mm256_set1_epi32(t->xisum[xb])));
                facc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wsv, _mm256_set1_ps(t->xd[xb])),
                                             facc[r][h]);
                if (has_o) facc[r][h] = _mm256_fmadd_ps(wov, _mm256_set1_ps(t->xsum[xb]), facc[r][h]);
                iacc[r][h] = _mm256_setzero_si256();
            }
        }
    }
    for (int r = 0; r < MR; r++)
        for (int h = 0; h < 2; h++)
            store_cols(t->y + (int64_t)(m0 + r) * t->ldy, t->ncols, (int64_t)p0 * 16 + 8 * h, facc[r][h]);
}

#define QN_INT2_VARIANT(BITS)                                                                      \
    static void int_tiles2_##BITS(const qn_qtile *t) {                                            \
        for (int p = 0; p < t->np; p++) {                                                          \
            int m = 0;                                                                             \
            for (; m + 2 <= t->mr; m += 2) int_tile2(t, m, p, BITS, 2);                            \
            if (m < t->mr) int_tile2(t, m, p, BITS, 1);                                            \
        }                                                                                          \
    }
QN_INT2_VARIANT(2)
QN_INT2_VARIANT(3)
QN_INT2_VARIANT(4)
QN_INT2_VARIANT(5)
QN_INT2_VARIANT(6)
QN_INT2_VARIANT(8)

void qn_qtile_int_avx2(const qn_qtile *t) {
    switch (t->bits) {
    case 2: int_tiles2_2(t); break;
    case 3: int_tiles2_3(t); break;
    case 4: int_tiles2_4(t); break;
    case 5: int_tiles2_5(t); break;
    case 6: int_tiles2_6(t); break;
    default: int_tiles2_8(t); break;
    }
}

/* ---- lut path: one row x one panel; table values by gather ---- */

void qn_qtile_lut_avx2(const qn_qtile *t) {
    const int bits = t->bits;
    const int64_t cb = QN_CHUNK_BYTES(bits), nchunks = t->Kp / QN_CHUNK;
    const __m256i mff = _mm256_set1_epi32(0xFF);
    for (int m = 0; m < t->mr; m++) {
        const float *xr = t->xf + (int64_t)m * t->ldxf;
        for (int p = 0; p < t->np; p++) {
            const uint8_t *pc = t->codes + (int64_t)p * t->panel_bytes;
            __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            __m256 gacc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            int64_t qpg = t->group / 4, nquads = nchunks * 8;
            for (int64_t q0 = 0, gi = 0; q0 < nquads; q0 += qpg, gi++) {
                int64_t q1 = qn_min64(q0 + qpg, nquads);
                for (int64_t qq = q0; qq < q1; qq++) {
                    int64_t c = qq / 8;
                    int q = (int)(qq % 8);
                    for (int h = 0; h < 2; h++) {
                        __m256i w;
                        switch (q) {
                        case 0: w = quad_avx2(pc + c * cb, bits, 0, h); break;
                        case 1: w = quad_avx2(pc + c * cb, bits, 1, h); break;
                        case 2: w = quad_avx2(pc + c * cb, bits, 2, h); break;
                        case 3: w = quad_avx2(pc + c * cb, bits, 3, h); break;
                        case 4: w = quad_avx2(pc + c * cb, bits, 4, h); break;
                        case 5: w = quad_avx2(pc + c * cb, bits, 5, h); break;
                        case 6: w = quad_avx2(pc + c * cb, bits, 6, h); break;
                        default: w = quad_avx2(pc + c * cb, bits, 7, h); break;
                        }
                        for (int j = 0; j < 4; j++) {
                            __m256i idx = _mm256_and_si256(_mm256_srli_epi32(w, 8 * j), mff);
                            __m256 wv = _mm256_i32gather_ps(t->lut, idx, 4);
                            gacc[h] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xr[qq * 4 + j]), gacc[h]);
                        }
                    }
                }
                for (int h = 0; h < 2; h++) {
                    __m256 wsv, wov;
                    __m256i wzv;
                    group_scales8(t, p, gi, h, &wsv, &wzv, &wov);
                    facc[h] = _mm256_fmadd_ps(gacc[h], wsv, facc[h]);
                    gacc[h] = _mm256_setzero_ps();
                }
            }
            for (int h = 0; h < 2; h++)
                store_cols(t->y + (int64_t)m * t->ldy, t->ncols, (int64_t)p * 16 + 8 * h, facc[h]);
        }
    }
}

/* ---- activation quantization ---- */

QN_INLINE __m256 load8_x(const void *x, int xdtype, int64_t k, int64_t kr) {
    int64_t n = kr - k;
    if (n >= 8) {
        if (xdtype == QN_X_F32) return _mm256_loadu_ps((const float *)x + k);
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + k));
        if (xdtype == QN_X_F16) return _mm256_cvtph_ps(h);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    float tmp[8] = {0};
    for (int64_t i = 0; i < n; i++) {
        if (xdtype == QN_X_F32) tmp[i] = ((const float *)x)[k + i];
        else if (xdtype == QN_X_F16) tmp[i] = qn_f16_to_f32(((const uint16_t *)x)[k + i]);
        else tmp[i] = qn_bf16_to_f32(((const uint16_t *)x)[k + i]);
    }
    return _mm256_loadu_ps(tmp);
}

void qn_quantize_act_row_avx2(int8_t *xq, float *xd, float *xsum, int32_t *xisum, const void *x,
                              int xdtype, int64_t K, int64_t Kp, int64_t fb) {
    int64_t nb = qn_ceil_div(Kp, fb);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < nb; b++) {
        int64_t k0 = b * fb, k1 = qn_min64(k0 + fb, Kp), kr = qn_min64(k1, K);
        __m256 vmax = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 8)
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8_x(x, xdtype, k, kr), absmask));
        float mx[8], amax = 0.0f;
        _mm256_storeu_ps(mx, vmax);
        for (int i = 0; i < 8; i++) amax = mx[i] > amax ? mx[i] : amax;
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i isum = _mm256_setzero_si256();
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        for (int64_t k = k0; k < k1; k += 8) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8_x(x, xdtype, k, kr), idv));
            q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
            isum = _mm256_add_epi32(isum, q);
            int32_t qs[8];
            _mm256_storeu_si256((__m256i *)qs, q);
            for (int i = 0; i < 8; i++) xq[k + i] = (int8_t)qs[i];
        }
        int32_t qs[8], s = 0;
        _mm256_storeu_si256((__m256i *)qs, isum);
        for (int i = 0; i < 8; i++) s += qs[i];
        xd[b] = d;
        xisum[b] = s;
        xsum[b] = d * (float)s;
    }
}
