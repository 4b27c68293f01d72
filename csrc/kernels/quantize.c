/* quantize.c — quantization of float32 W[N, K] into the panel layout, dequantization,
 * and packing of row-major codes into panels (used by GGUF import/export).
 *
 * Work is split by panel (16 rows) with OpenMP; each thread quantizes its rows into a
 * row-major code buffer from the workspace ([16][Kp] bytes) and packs it. The rules that
 * reproduce GGUF's reference quantizers (q4_0, q4_1, q8_0) follow their float32 operation
 * order exactly; this file is compiled with -ffp-contract=off so no FMA changes a rounding.
 * Scalar C only: quantization runs once per weight, at load time.
 */
#include "quantize.h"

#include <math.h>
#include <stdlib.h>

#include "qmatmul.h"


/* ---- packing ---- */

static void pack_panel(uint8_t *out, const uint8_t *rows, int64_t ldr, int nrows, int bits, int64_t Kp) {
    qn_planes pl = qn_fmt_planes(bits);
    int64_t cb = QN_CHUNK_BYTES(bits);
    memset(out, 0, (size_t)((Kp / QN_CHUNK) * cb));
    for (int64_t c = 0; c < Kp / QN_CHUNK; c++) {
        uint8_t *o = out + c * cb;
        for (int n = 0; n < nrows; n++) {
            const uint8_t *r = rows + n * ldr + c * QN_CHUNK;
            for (int kk = 0; kk < QN_CHUNK; kk++) {
                int v = r[kk], quad = kk / 4, idx = n * 4 + kk % 4, sh = 0;
                if (bits == 8) { o[quad * 64 + idx] = (uint8_t)v; continue; }
                if (pl.nib >= 0) {
                    o[pl.nib + (quad / 2) * 64 + idx] |= (uint8_t)((v & 15) << ((quad & 1) * 4));
                    sh = 4;
                }
                if (pl.crumb >= 0) {
                    o[pl.crumb + (quad / 4) * 64 + idx] |= (uint8_t)(((v >> sh) & 3) << ((quad & 3) * 2));
                    sh += 2;
                }
                if (pl.bit >= 0) o[pl.bit + idx] |= (uint8_t)(((v >> sh) & 1) << quad);
            }
        }
    }
}

qn_status qn_pack_codes(uint8_t *out, const uint8_t *codes, int bits, int64_t N, int64_t K, int64_t ld) {
    if (K % QN_CHUNK) return qn_set_error(QN_EINVAL, "pack_codes: K must be a multiple of 32");
    int64_t np = qn_npanels(N), pbytes = (K / QN_CHUNK) * QN_CHUNK_BYTES(bits);
    uint8_t lim = (uint8_t)((1 << bits) - 1);
    for (int64_t i = 0; i < N; i++)
        for (int64_t k = 0; k < K; k++)
            if (codes[i * ld + k] > lim)
                return qn_set_error(QN_EINVAL, "pack_codes: code %d at [%lld, %lld] exceeds %d bits",
                                    codes[i * ld + k], (long long)i, (long long)k, bits);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++) {
        int nrows = (int)qn_min64(QN_PANEL, N - p * QN_PANEL);
        pack_panel(out + p * pbytes, codes + p * QN_PANEL * ld, ld, nrows, bits, K);
    }
    return QN_OK;
}

qn_status qn_unpack_codes(uint8_t *codes, const uint8_t *packed, int bits, int64_t N, int64_t K, int64_t ld) {
    if (K % QN_CHUNK) return qn_set_error(QN_EINVAL, "unpack_codes: K must be a multiple of 32");
    int64_t pbytes = (K / QN_CHUNK) * QN_CHUNK_BYTES(bits);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const uint8_t *pc = packed + (i / QN_PANEL) * pbytes;
        for (int64_t k = 0; k < K; k++) codes[i * ld + k] = (uint8_t)qn_code_at(pc, bits, i % QN_PANEL, k);
    }
    return QN_OK;
}

/* ---- scale storage ---- */

static inline float round_scale(float s, int scale) {
    switch (scale) {
    case QN_SCALE_F16: return qn_f16_to_f32(qn_f32_to_f16(s));
    case QN_SCALE_BF16: return qn_bf16_to_f32(qn_f32_to_bf16(s));
    default: return s;
    }
}

static inline void store_scale(void *dst, int scale, int64_t i, float s) {
    switch (scale) {
    case QN_SCALE_F16: ((uint16_t *)dst)[i] = qn_f32_to_f16(s); break;
    case QN_SCALE_BF16: ((uint16_t *)dst)[i] = qn_f32_to_bf16(s); break;
    default: ((float *)dst)[i] = s; break;
    }
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
/* Round half to even for |v| < 2^22 without libm (baseline x86-64 has no roundss). */
static inline float nearestf(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}
static inline int nearest(float v) {
    v = v > 4194304.0f ? 4194304.0f : (v < -4194304.0f ? -4194304.0f : v);
    return (int)nearestf(v);
}
/* roundf (half away from zero) as GGUF's reference computes it: floor(a) + floor(2(a - floor(a))). */
static inline float roundf_gguf(float x) {
    float a = fabsf(x);
    float fl = (float)(int)a;
    float b = fl + (float)(int)(2.0f * (a - fl));
    return x < 0.0f ? -b : b;
}

/* ---- per-group rules; each writes codes q[0..n) and returns the stored scale/offset ---- */

/* q4_0 generalized: d = signed absmax / -2^(b-1). Same float ops as GGUF's quantizer. */
static void rule_q4_0(const float *x, int n, int bits, uint8_t *q, float *d_out) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
    int half = 1 << (bits - 1), qmax = (1 << bits) - 1;
    float d = max / (float)-half;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    float bias = (float)half + 0.5f;
    for (int i = 0; i < n; i++) {
        float v = x[i] * id + bias;
        q[i] = (uint8_t)clampi((int)v, 0, qmax);
    }
    *d_out = d;
}

/* q8_0 generalized: d = absmax / (2^(b-1) - 1), codes roundf(x / d) + 2^(b-1). */
static void rule_q8_0(const float *x, int n, int bits, uint8_t *q, float *d_out) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    int half = 1 << (bits - 1);
    float d = amax / (float)(half - 1);
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) q[i] = (uint8_t)clampi((int)roundf_gguf(x[i] * id) + half, 0, 2 * half - 1);
    *d_out = d;
}

/* q4_1 generalized: d = (max - min) / (2^b - 1), m = min. */
static void rule_q4_1(const float *x, int n, int bits, uint8_t *q, float *d_out, float *m_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; i++) { mn = x[i] < mn ? x[i] : mn; mx = x[i] > mx ? x[i] : mx; }
    int qmax = (1 << bits) - 1;
    float d = (mx - mn) / (float)qmax;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) q[i] = (uint8_t)clampi((int)((x[i] - mn) * id + 0.5f), 0, qmax);
    *d_out = d;
    *m_out = mn;
}

/* Zero-point asym (GPTQ/AWQ style): range includes 0, s = range / (2^b - 1), z = round(-min/s). */
static void rule_zero(const float *x, int n, int bits, int scale, uint8_t *q, float *s_out, int *z_out) {
    float mn = 0.0f, mx = 0.0f;
    for (int i = 0; i < n; i++) { mn = x[i] < mn ? x[i] : mn; mx = x[i] > mx ? x[i] : mx; }
    int qmax = (1 << bits) - 1;
    float s = round_scale((mx - mn) / (float)qmax, scale);
    if (s == 0.0f) {
        for (int i = 0; i < n; i++) q[i] = 0;
        *s_out = 0.0f;
        *z_out = 0;
        return;
    }
    int z = clampi(nearest(-mn / s), 0, qmax);
    for (int i = 0; i < n; i++) q[i] = (uint8_t)clampi(nearest(x[i] / s) + z, 0, qmax);
    *s_out = s;
    *z_out = z;
}

/* Lookup table: s = absmax / max|lut| (rounded to the scale dtype), codes = nearest entry. */
/* The table sorted by value, duplicates removed, with the midpoints between neighbours. */
typedef struct lut_sorted { float v[256], mid[256]; uint8_t idx[256]; int n, kind; float vmax; } lut_sorted;

static void lut_sort(lut_sorted *ls, const float *lut, int n, int kind) {
    ls->n = n;
    ls->kind = kind;
    ls->vmax = 0.0f;
    for (int i = 0; i < n; i++) {
        ls->v[i] = lut[i];
        ls->idx[i] = (uint8_t)i;
        if (fabsf(lut[i]) > ls->vmax) ls->vmax = fabsf(lut[i]);
    }
    for (int i = 1; i < n; i++) { /* insertion sort, stable: equal values keep the lower index first */
        float v = ls->v[i];
        uint8_t id = ls->idx[i];
        int j = i - 1;
        while (j >= 0 && ls->v[j] > v) { ls->v[j + 1] = ls->v[j]; ls->idx[j + 1] = ls->idx[j]; j--; }
        ls->v[j + 1] = v;
        ls->idx[j + 1] = id;
    }
    /* equal values (+0/-0, clamped fp8 codes) keep only the lowest code */
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (m > 0 && ls->v[i] == ls->v[m - 1]) continue;
        ls->v[m] = ls->v[i];
        ls->idx[m] = ls->idx[i];
        m++;
    }
    ls->n = m;
    for (int i = 0; i + 1 < m; i++) ls->mid[i] = 0.5f * (ls->v[i] + ls->v[i + 1]);
}

/* Nearest FP8 code (round half to even, saturating) of t, |t| <= the format's max. */
static uint8_t fp8_code(float t, int kind) {
    float a = fabsf(t);
    int mbits = kind == QN_LUT_FP8_E4M3 ? 3 : 2, bias = kind == QN_LUT_FP8_E4M3 ? 7 : 15;
    int emin = 1 - bias, maxcode = kind == QN_LUT_FP8_E4M3 ? 0x7E : 0x7B;
    int e = (int)((qn_f32_bits(a) >> 23) & 0xFF) - 127;
    int code;
    if (e < emin) {
        code = nearest(a * qn_bits_f32((uint32_t)(127 - emin + mbits) << 23)); /* quantum 2^(emin - mbits) */
    } else {
        int m = nearest(a * qn_bits_f32((uint32_t)(127 - e + mbits) << 23)); /* in [2^mbits, 2^(mbits+1)] */
        code = ((e + bias) << mbits) + (m - (1 << mbits));
    }
    if (code > maxcode) code = maxcode;
    return (uint8_t)(code | (t < 0.0f && code ? 0x80 : 0));
}

static uint8_t lut_nearest(const lut_sorted *ls, float t) {
    if (ls->kind != QN_LUT_TABLE) return fp8_code(t, ls->kind);
    int n = ls->n;
    if (n <= 64) { /* branchless: the number of midpoints below t */
        int c = 0;
        for (int i = 0; i + 1 < n; i++) c += t > ls->mid[i];
        return ls->idx[c];
    }
    int lo = 0, hi = n - 1; /* invariant: mid[lo-1] < t <= mid[hi] */
    while (lo < hi) {
        int m = (lo + hi) / 2;
        if (t > ls->mid[m]) lo = m + 1; else hi = m;
    }
    return ls->idx[lo];
}

static void rule_lut(const float *x, int n, const lut_sorted *ls, int scale, uint8_t *q, float *s_out) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float s = ls->vmax > 0.0f ? round_scale(amax / ls->vmax, scale) : 0.0f;
    /* a rounded-down scale must not push the largest value off the table */
    if (s != 0.0f && amax / s > ls->vmax) s = round_scale(amax / ls->vmax * (1.0f + 1.0f / 256), scale);
    float id = s != 0.0f ? 1.0f / s : 0.0f;
    for (int i = 0; i < n; i++) q[i] = lut_nearest(ls, x[i] * id);
    *s_out = s;
}

/* K-quant sub-block search (asym, n = 32): choose scale and min minimizing the weighted
 * squared error over a grid of candidate inverse scales, solving least squares for each.
 * The error of a candidate follows from the sums the fit needs; sums run in 8 lanes so
 * the compiler vectorizes them. */
static void kq_search_asym(const float *x, const float *wt, int nmax, float rmin, float rdelta, int nstep,
                           float *scale_out, float *min_out) {
    enum { n = 32, V = 8 };
    float mn = x[0], mx = x[0], sum_w = 0.0f, sum_x = 0.0f, sum_x2 = 0.0f;
    for (int i = 0; i < n; i++) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
        sum_w += wt[i];
        sum_x += wt[i] * x[i];
        sum_x2 += wt[i] * x[i] * x[i];
    }
    if (mn > 0.0f) mn = 0.0f;
    if (mx == mn) { *scale_out = 0.0f; *min_out = -mn; return; }
    const float fmax = (float)nmax, x0 = mn;
    float best = -1.0f, scale = 0.0f;
    for (int is = -1; is <= nstep; is++) {
        /* is = -1: the plain (max - min) / nmax scale; then the grid */
        float isc = is < 0 ? fmax / (mx - x0) : (rmin + rdelta * (float)is + fmax) / (mx - x0);
        float sl[V] = {0}, sl2[V] = {0}, sxl[V] = {0};
        for (int j = 0; j < n; j += V)
            for (int v = 0; v < V; v++) {
                float l = nearestf(isc * (x[j + v] - x0));
                l = l < 0.0f ? 0.0f : (l > fmax ? fmax : l);
                float wl = wt[j + v] * l;
                sl[v] += wl;
                sl2[v] += wl * l;
                sxl[v] += wl * x[j + v];
            }
        float SL = 0, SL2 = 0, SXL = 0;
        for (int v = 0; v < V; v++) { SL += sl[v]; SL2 += sl2[v]; SXL += sxl[v]; }
        float this_scale, this_min;
        if (is < 0) {
            this_scale = 1.0f / isc;
            this_min = x0;
        } else {
            float D = sum_w * SL2 - SL * SL;
            if (D <= 0.0f) continue;
            this_scale = (sum_w * SXL - sum_x * SL) / D;
            this_min = (SL2 * sum_x - SL * SXL) / D;
            if (this_min > 0.0f) { this_min = 0.0f; this_scale = SL2 > 0 ? SXL / SL2 : 0.0f; }
        }
        /* sum w (s*l + m - x)^2 expanded over the sums */
        float mad = this_scale * this_scale * SL2 + 2.0f * this_scale * this_min * SL - 2.0f * this_scale * SXL +
                    this_min * this_min * sum_w - 2.0f * this_min * sum_x + sum_x2;
        if (best < 0.0f || mad < best) { best = mad; scale = this_scale; mn = this_min; }
    }
    *scale_out = scale;
    *min_out = -mn;
}

/* K-quant sub-block search (sym, n = 16): codes in [-nmax, nmax-1], weights x^2. */
static float kq_search_sym(const float *x, int nmax) {
    enum { n = 16, V = 8 };
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
    if (amax == 0.0f) return 0.0f;
    float best_scale = 0.0f, best = -1.0f;
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    for (int is = -9; is <= 9; is++) {
        float iscale = -((float)nmax + 0.1f * (float)is) / max;
        float slx[V] = {0}, sl2[V] = {0};
        for (int j = 0; j < n; j += V)
            for (int v = 0; v < V; v++) {
                float xi = x[j + v], l = nearestf(iscale * xi);
                l = l < lo ? lo : (l > hi ? hi : l);
                float w = xi * xi;
                slx[v] += w * xi * l;
                sl2[v] += w * l * l;
            }
        float SLX = 0, SL2 = 0;
        for (int v = 0; v < V; v++) { SLX += slx[v]; SL2 += sl2[v]; }
        if (SL2 > 0.0f && (best < 0.0f || SLX * SLX > best * SL2)) {
            best_scale = SLX / SL2;
            best = best_scale * SLX;
        }
    }
    return best_scale;
}

/* q4_k / q5_k: one super-block of 256 inputs of one row. */
static void rule_kq_asym(const float *x, int bits, uint8_t *q, uint8_t *sc, uint8_t *mn, uint16_t *d16,
                         uint16_t *dmin16) {
    int nmax = (1 << bits) - 1, nsub = QN_SUPER / 32;
    float wt[32], scales[8], mins[8], sum2 = 0.0f;
    for (int i = 0; i < QN_SUPER; i++) sum2 += x[i] * x[i];
    float av = sqrtf(sum2 / QN_SUPER);
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < nsub; j++) {
        for (int i = 0; i < 32; i++) wt[i] = av + fabsf(x[32 * j + i]);
        if (bits == 4) kq_search_asym(x + 32 * j, wt, nmax, -1.0f, 0.1f, 20, &scales[j], &mins[j]);
        else kq_search_asym(x + 32 * j, wt, nmax, -0.5f, 0.1f, 15, &scales[j], &mins[j]);
        max_scale = scales[j] > max_scale ? scales[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    *d16 = qn_f32_to_f16(max_scale / 63.0f);
    *dmin16 = qn_f32_to_f16(max_min / 63.0f);
    float d = qn_f16_to_f32(*d16), dmin = qn_f16_to_f32(*dmin16);
    for (int j = 0; j < nsub; j++) {
        sc[j] = (uint8_t)clampi(nearest(inv_scale * scales[j]), 0, 63);
        mn[j] = (uint8_t)clampi(nearest(inv_min * mins[j]), 0, 63);
        float dl = d * (float)sc[j], dm = dmin * (float)mn[j];
        for (int i = 0; i < 32; i++)
            q[32 * j + i] = dl != 0.0f ? (uint8_t)clampi(nearest((x[32 * j + i] + dm) / dl), 0, nmax) : 0;
    }
}

/* q6_k: one super-block of 256 inputs, 16 sub-blocks of 16, int8 sub-scales. */
static void rule_kq_sym6(const float *x, uint8_t *q, int8_t *sc, uint16_t *d16) {
    float scales[16], max_scale = 0.0f, amax = 0.0f;
    for (int j = 0; j < 16; j++) {
        scales[j] = kq_search_sym(x + 16 * j, 32);
        if (fabsf(scales[j]) > amax) { amax = fabsf(scales[j]); max_scale = scales[j]; }
    }
    if (amax == 0.0f) {
        *d16 = 0;
        for (int j = 0; j < 16; j++) sc[j] = 0;
        for (int i = 0; i < QN_SUPER; i++) q[i] = 32;
        return;
    }
    float iscale = -128.0f / max_scale;
    *d16 = qn_f32_to_f16(1.0f / iscale);
    float d = qn_f16_to_f32(*d16);
    for (int j = 0; j < 16; j++) {
        sc[j] = (int8_t)clampi(nearest(iscale * scales[j]), -128, 127);
        float dl = d * (float)sc[j];
        for (int i = 0; i < 16; i++)
            q[16 * j + i] = dl != 0.0f ? (uint8_t)(clampi(nearest(x[16 * j + i] / dl), -32, 31) + 32) : 32;
    }
}

/* ---- driver ---- */

static int resolve_rule(const qn_format *f) {
    if (qn_fmt_nested(f)) return QN_RULE_KQUANT;
    if (f->rule != QN_RULE_DEFAULT) return f->rule;
    if (f->kind == QN_SYM) return f->bits == 8 ? QN_RULE_Q8_0 : QN_RULE_Q4_0;
    if (f->kind == QN_ASYM && f->offset == QN_OFF_MIN) return QN_RULE_Q4_1;
    return QN_RULE_DEFAULT;
}

/* Everything the per-row quantizer needs about a format and a matrix width. */
typedef struct row_quantizer {
    const qn_format *f;
    int rule;
    lut_sorted ls;
    int64_t Kp, ng, g, nsb;
} row_quantizer;

static void row_quantizer_init(row_quantizer *rq, const qn_format *f, int64_t K) {
    rq->f = f;
    rq->rule = resolve_rule(f);
    if (f->kind == QN_LUT) lut_sort(&rq->ls, f->lut, 1 << f->bits, f->lut_kind);
    rq->Kp = qn_fmt_kpad(f, K);
    rq->ng = qn_fmt_ngroups(f, K);
    rq->g = qn_fmt_group(f, K);
    rq->nsb = rq->Kp / QN_SUPER;
}

/* Inputs [k0, k1) of row n of panel p (k0, k1 on group boundaries; on super-block
 * boundaries for nested formats): codes into qr and the row's scale entries into out.
 * xr and qr are indexed from input 0; xr is zero beyond K. */
static void quantize_row_range(const row_quantizer *rq, const float *xr, uint8_t *qr, int64_t k0, int64_t k1,
                               int64_t p, int n, qn_qweight_out *out) {
    const qn_format *f = rq->f;
    int64_t ng = rq->ng, g = rq->g, nsb = rq->nsb;
    if (rq->rule == QN_RULE_KQUANT) {
        int64_t gpb = QN_SUPER / g; /* groups per super-block */
        for (int64_t s = k0 / QN_SUPER; s < k1 / QN_SUPER; s++) {
            int64_t sbi = (p * nsb + s) * QN_PANEL + n;
            uint8_t scb[16], mnb[16];
            if (f->scale == QN_SCALE_NESTED_U6) {
                rule_kq_asym(xr + s * QN_SUPER, f->bits, qr + s * QN_SUPER, scb, mnb, &out->supers[sbi],
                             &out->super_mins[sbi]);
                for (int64_t j = 0; j < gpb; j++) {
                    int64_t si = (p * ng + s * gpb + j) * QN_PANEL + n;
                    ((uint8_t *)out->scales)[si] = scb[j];
                    ((uint8_t *)out->offsets)[si] = mnb[j];
                }
            } else {
                rule_kq_sym6(xr + s * QN_SUPER, qr + s * QN_SUPER, (int8_t *)scb, &out->supers[sbi]);
                for (int64_t j = 0; j < gpb; j++)
                    ((int8_t *)out->scales)[(p * ng + s * gpb + j) * QN_PANEL + n] = ((int8_t *)scb)[j];
            }
        }
        return;
    }
    for (int64_t gi = k0 / g; gi < ng && gi * g < k1; gi++) {
        int64_t kg = gi * g, kn = qn_min64(g, rq->Kp - kg);
        int64_t si = (p * ng + gi) * QN_PANEL + n;
        const float *xg = xr + kg;
        uint8_t *qg = qr + kg;
        float d = 0.0f, m = 0.0f;
        int z = 0;
        switch (f->kind) {
        case QN_SYM:
            if (rq->rule == QN_RULE_Q8_0) rule_q8_0(xg, (int)kn, f->bits, qg, &d);
            else rule_q4_0(xg, (int)kn, f->bits, qg, &d);
            store_scale(out->scales, f->scale, si, d);
            break;
        case QN_ASYM:
            if (f->offset == QN_OFF_MIN) {
                rule_q4_1(xg, (int)kn, f->bits, qg, &d, &m);
                store_scale(out->scales, f->scale, si, d);
                store_scale(out->offsets, f->scale, si, m);
            } else {
                rule_zero(xg, (int)kn, f->bits, f->scale, qg, &d, &z);
                store_scale(out->scales, f->scale, si, d);
                ((uint8_t *)out->offsets)[si] = (uint8_t)z;
            }
            break;
        default:
            rule_lut(xg, (int)kn, &rq->ls, f->scale, qg, &d);
            store_scale(out->scales, f->scale, si, d);
            break;
        }
    }
}

/* Zero scale entries for the padding row n of panel p, so it contributes nothing. */
static void zero_row_scales(const row_quantizer *rq, int64_t p, int n, qn_qweight_out *out) {
    const qn_format *f = rq->f;
    for (int64_t gi = 0; gi < rq->ng; gi++) {
        int64_t si = (p * rq->ng + gi) * QN_PANEL + n;
        if (qn_fmt_nested(f)) {
            ((uint8_t *)out->scales)[si] = 0;
            if (out->offsets) ((uint8_t *)out->offsets)[si] = 0;
        } else {
            store_scale(out->scales, f->scale, si, 0.0f);
            if (f->offset == QN_OFF_ZERO) ((uint8_t *)out->offsets)[si] = 0;
            else if (f->offset == QN_OFF_MIN) store_scale(out->offsets, f->scale, si, 0.0f);
        }
    }
    for (int64_t s = 0; s < rq->nsb && qn_fmt_nested(f); s++) {
        out->supers[(p * rq->nsb + s) * QN_PANEL + n] = 0;
        if (out->super_mins) out->super_mins[(p * rq->nsb + s) * QN_PANEL + n] = 0;
    }
}

int64_t qn_quantize_workspace_size(const qn_format *f, int64_t K, int nthreads) {
    int64_t Kp = qn_fmt_kpad(f, K);
    /* per thread: 16 rows of codes + one row padded with zeros */
    return (int64_t)nthreads * (QN_PANEL * Kp + Kp * 4 + 64) + 64;
}

qn_status qn_quantize(const qn_format *f, const float *w, int64_t N, int64_t K, int64_t ldw,
                      qn_qweight_out *out, void *workspace, int64_t ws_bytes) {
    qn_status st = qn_format_check(f);
    if (st) return st;
    if ((st = qn_format_check_k(f, K))) return st;
    if (N <= 0 || ldw < K) return qn_set_error(QN_EINVAL, "quantize: bad shape N=%lld ldw=%lld", (long long)N, (long long)ldw);
    int nth = qn_omp_max_threads();
    if (ws_bytes < qn_quantize_workspace_size(f, K, nth)) return qn_set_error(QN_EINVAL, "quantize: workspace too small");
    row_quantizer rq;
    row_quantizer_init(&rq, f, K);
    int64_t Kp = rq.Kp, np = qn_npanels(N), pbytes = (Kp / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    char *ws0 = (char *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
    for (int64_t p = 0; p < np; p++) {
        int tid = qn_omp_thread_id();
        uint8_t *rows = (uint8_t *)(ws0 + (int64_t)tid * (QN_PANEL * Kp + Kp * 4 + 64));
        float *xr = (float *)(rows + QN_PANEL * Kp);
        memset(rows, 0, (size_t)(QN_PANEL * Kp));
        for (int n = 0; n < QN_PANEL; n++) {
            int64_t row = p * QN_PANEL + n;
            if (row >= N) {
                zero_row_scales(&rq, p, n, out);
                continue;
            }
            memcpy(xr, w + row * ldw, (size_t)K * sizeof(float));
            for (int64_t k = K; k < Kp; k++) xr[k] = 0.0f;
            quantize_row_range(&rq, xr, rows + n * Kp, 0, Kp, p, n, out);
        }
        /* padding inputs beyond K hold code 0 */
        for (int n = 0; n < QN_PANEL; n++)
            for (int64_t k = K; k < Kp; k++) rows[n * Kp + k] = 0;
        pack_panel(out->codes + p * pbytes, rows, Kp, QN_PANEL, f->bits, Kp);
    }
    return QN_OK;
}

/* ---- GPTQ ---- */

/* The code whose value s * (q - z) + o (or s * lut[q]) lies nearest x. */
static inline uint8_t code_for(const row_quantizer *rq, float x, float s, int32_t z, float o) {
    const qn_format *f = rq->f;
    if (f->kind == QN_LUT) return lut_nearest(&rq->ls, s != 0.0f ? x / s : 0.0f);
    int qmax = (1 << f->bits) - 1;
    if (s == 0.0f) return (uint8_t)clampi(z, 0, qmax);
    return (uint8_t)clampi(nearest((x - o) / s) + z, 0, qmax);
}

static inline float value_of(const row_quantizer *rq, uint8_t q, float s, int32_t z, float o) {
    if (rq->f->kind == QN_LUT) return s * rq->f->lut[q];
    return s * (float)((int32_t)q - z) + o;
}

qn_status qn_gptq(const qn_format *f, const float *W, int64_t N, int64_t K, const float *U, const int64_t *cols,
                  int64_t block, int static_params, qn_qweight_out *out, double *loss) {
    qn_status st = qn_format_check(f);
    if (st) return st;
    if ((st = qn_format_check_k(f, K))) return st;
    if (N <= 0) return qn_set_error(QN_EINVAL, "gptq: N must be positive");
    if (block <= 0) return qn_set_error(QN_EINVAL, "gptq: block must be positive, got %lld", (long long)block);
    row_quantizer rq;
    row_quantizer_init(&rq, f, K);
    int64_t Kp = rq.Kp, g = rq.g, span = qn_fmt_nested(f) ? QN_SUPER : g;
    if (cols && !static_params)
        return qn_set_error(QN_EINVAL, "gptq: a column order needs the group parameters fixed beforehand");
    if (!static_params && span < K && block % span && span % block)
        return qn_set_error(QN_EINVAL, "gptq: block %lld and parameter span %lld must divide one another",
                            (long long)block, (long long)span);
    if (cols) {
        for (int64_t j = 0; j < K; j++)
            if (cols[j] < 0 || cols[j] >= K) return qn_set_error(QN_EINVAL, "gptq: column order entry %lld out of range", (long long)j);
    }
    for (int64_t j = 0; j < K; j++)
        if (!(U[j * K + j] > 0.0f)) /* also catches NaN */
            return qn_set_error(QN_EINVAL, "gptq: the Cholesky factor has a non-positive diagonal at %lld", (long long)j);
    int64_t np = qn_npanels(N), pbytes = (Kp / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    if (block > K) block = K;
    qn_qweight fw = {f, N, K, out->codes, out->scales, out->offsets, out->supers, out->super_mins};
    /* per panel: 16 working rows, 16 code rows, the block's scaled errors, one padded row */
    int64_t per = QN_PANEL * K * 4 + QN_PANEL * Kp + QN_PANEL * block * 4 + Kp * 4 + Kp + 256;
    int nth = qn_omp_max_threads();
    char *ws = (char *)malloc((size_t)(per * nth));
    if (!ws) return qn_set_error(QN_ENOMEM, "gptq: out of memory (%lld bytes)", (long long)(per * nth));
    double total = 0.0;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) reduction(+ : total)
    for (int64_t p = 0; p < np; p++) {
        char *base = ws + (int64_t)qn_omp_thread_id() * per;
        float *wp = (float *)base;
        uint8_t *qr = (uint8_t *)(wp + QN_PANEL * K);
        float *err = (float *)(((uintptr_t)(qr + QN_PANEL * Kp) + 63) & ~(uintptr_t)63);
        float *xr = err + QN_PANEL * block;
        uint8_t *tq = (uint8_t *)(xr + Kp);
        int nr = (int)qn_min64(QN_PANEL, N - p * QN_PANEL);
        memcpy(wp, W + p * QN_PANEL * K, (size_t)(nr * K) * sizeof(float));
        memset(qr, 0, (size_t)(QN_PANEL * Kp));
        qn_qtile t;
        qn_qtile_for_panels(&t, &fw, p, 1);
        int64_t cur[QN_PANEL];
        float sc[QN_PANEL], of[QN_PANEL];
        int32_t zp[QN_PANEL];
        for (int n = 0; n < QN_PANEL; n++) cur[n] = -1;
        double acc = 0.0;
        for (int64_t jb = 0; jb < K; jb += block) {
            int64_t je = qn_min64(jb + block, K);
            for (int64_t j = jb; j < je; j++) {
                int64_t oc = cols ? cols[j] : j;
                if (!static_params && j % span == 0) {
                    /* the parameters of the next span, from the rows as updated so far */
                    int64_t k1 = qn_min64(j + span, Kp);
                    for (int n = 0; n < nr; n++) {
                        for (int64_t k = j; k < k1; k++) xr[k] = k < K ? wp[n * K + k] : 0.0f;
                        quantize_row_range(&rq, xr, tq, j, k1, p, n, out);
                        cur[n] = -1;
                    }
                }
                const float *Uj = U + j * K;
                float d = Uj[j];
                for (int n = 0; n < nr; n++) {
                    int64_t gi = oc / g;
                    if (cur[n] != gi) {
                        qn_qtile_group_scale(&t, 0, gi, n, &sc[n], &zp[n], &of[n]);
                        cur[n] = gi;
                    }
                    float *row = wp + n * K;
                    float x = row[j];
                    uint8_t q = code_for(&rq, x, sc[n], zp[n], of[n]);
                    float r = x - value_of(&rq, q, sc[n], zp[n], of[n]);
                    float e = r / d;
                    qr[n * Kp + oc] = q;
                    err[n * block + (j - jb)] = e;
                    acc += 0.5 * (double)e * (double)e;
                    for (int64_t k = j + 1; k < je; k++) row[k] -= e * Uj[k];
                }
            }
            /* the block's errors reach the later columns in one pass (lazy batch update) */
            for (int64_t j = jb; j < je; j++) {
                const float *Uj = U + j * K;
                for (int n = 0; n < nr; n++) {
                    float e = err[n * block + (j - jb)];
                    float *row = wp + n * K;
                    for (int64_t k = je; k < K; k++) row[k] -= e * Uj[k];
                }
            }
        }
        total += acc;
        pack_panel(out->codes + p * pbytes, qr, Kp, QN_PANEL, f->bits, Kp);
    }
    free(ws);
    if (loss) *loss = total;
    return QN_OK;
}

qn_status qn_dequantize(float *out, const qn_qweight *w, int64_t ldo) {
    const qn_format *f = w->fmt;
    qn_status st = qn_format_check(f);
    if (st) return st;
    if ((st = qn_format_check_k(f, w->K))) return st;
    if (w->N <= 0 || ldo < w->K) return qn_set_error(QN_EINVAL, "dequantize: bad shape");
    int64_t np = qn_npanels(w->N);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++) {
        qn_qtile t;
        qn_qtile_for_panels(&t, w, p, 1);
        for (int n = 0; n < QN_PANEL && p * QN_PANEL + n < w->N; n++) {
            float *o = out + (p * QN_PANEL + n) * ldo;
            float s = 0.0f, m = 0.0f;
            int32_t z = 0;
            for (int64_t k = 0; k < w->K; k++) {
                if (k % t.group == 0) qn_qtile_group_scale(&t, 0, k / t.group, n, &s, &z, &m);
                int q = qn_code_at(t.codes, f->bits, n, k);
                if (f->kind == QN_LUT) o[k] = s * f->lut[q];
                else if (f->offset == QN_OFF_MIN) o[k] = s * (float)q + m;
                else o[k] = s * (float)(q - z);
            }
        }
    }
    return QN_OK;
}
