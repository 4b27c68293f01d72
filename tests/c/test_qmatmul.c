/* test_qmatmul.c — the quantized-matmul kernels from C alone: every ISA path against the
 * _ref kernels (bitwise), dequantize against the layout's scalar definition, guard bytes
 * around outputs, and invalid arguments returning QN_EINVAL. Run: make -C tests/c run */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cpu_features.h"
#include "dispatch.h"
#include "kernels/qmatmul.h"
#include "kernels/quantize.h"

#include "test_util.h"

typedef struct qbuf {
    qn_qweight w;
    qn_qweight_out o;
} qbuf;

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    memset(p, 0, (n + 63) / 64 * 64 + 64);
    return p;
}

static void make_q(qbuf *q, const qn_format *f, const float *w, int64_t N, int64_t K) {
    int64_t np = qn_npanels(N), Kp = qn_fmt_kpad(f, K), ng = qn_fmt_ngroups(f, K);
    int sb = qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale), ob = qn_offset_bytes(f);
    memset(q, 0, sizeof *q);
    q->o.codes = xalloc((size_t)(np * (Kp / 32) * QN_CHUNK_BYTES(f->bits)));
    q->o.scales = xalloc((size_t)(np * ng * 16 * sb));
    q->o.offsets = ob ? xalloc((size_t)(np * ng * 16 * ob)) : NULL;
    if (qn_fmt_nested(f)) {
        q->o.supers = xalloc((size_t)(np * (Kp / 256) * 16 * 2));
        if (f->scale == QN_SCALE_NESTED_U6) q->o.super_mins = xalloc((size_t)(np * (Kp / 256) * 16 * 2));
    }
    int64_t wsb = qn_quantize_workspace_size(f, K, 64);
    void *ws = xalloc((size_t)wsb);
    qn_status st = qn_quantize(f, w, N, K, K, &q->o, ws, wsb);
    CHECK(st == QN_OK, "quantize: %s", qn_last_error());
    free(ws);
    q->w = (qn_qweight){f, N, K, q->o.codes, q->o.scales, q->o.offsets, q->o.supers, q->o.super_mins};
}

static void free_q(qbuf *q) {
    free(q->o.codes); free(q->o.scales); free(q->o.offsets); free(q->o.supers); free(q->o.super_mins);
}

/* y[M, N] through the dispatched kernels, with guard bytes around the output rows */
static float *run(const qn_qweight *w, const float *x, int64_t M, int64_t ldy) {
    float *y = xalloc((size_t)((M + 2) * ldy * 4));
    for (int64_t i = 0; i < (M + 2) * ldy; i++) y[i] = -12345.0f;
    int64_t wsb = qn_qmatmul_workspace_size(w, M, 64);
    void *ws = xalloc((size_t)wsb);
    qn_status st = qn_qmatmul(y + ldy, w, x, QN_X_F32, M, w->K, ldy, ws, wsb);
    CHECK(st == QN_OK, "qmatmul: %s", qn_last_error());
    free(ws);
    for (int64_t i = 0; i < ldy; i++) CHECK(y[i] == -12345.0f && y[(M + 1) * ldy + i] == -12345.0f, "guard row written");
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = w->N; n < ldy; n++) CHECK(y[(m + 1) * ldy + n] == -12345.0f, "guard column written");
    return y;
}

static void test_paths(const qn_format *f, int64_t M, int64_t N, int64_t K) {
    float *w = malloc((size_t)(N * K * 4)), *x = malloc((size_t)(M * K * 4 + 4));
    for (int64_t i = 0; i < N * K; i++) w[i] = nrand();
    for (int64_t i = 0; i < M * K; i++) x[i] = nrand();
    qbuf q;
    make_q(&q, f, w, N, K);
    int64_t ldy = N + 3;
    qn_dispatch_set_isa(QN_ISA_REF);
    float *yr = run(&q.w, x, M, ldy);
    for (int isa = QN_ISA_AVX2; isa <= qn_cpu_best_isa(); isa++) {
        qn_dispatch_set_isa(isa);
        float *y = run(&q.w, x, M, ldy);
        int bad = 0;
        for (int64_t i = ldy; i < (M + 1) * ldy; i++) bad += memcmp(&y[i], &yr[i], 4) != 0;
        CHECK(bad == 0, "bits=%d group=%d kind=%d M=%lld N=%lld K=%lld: %s differs from ref in %d values", f->bits,
              f->group, f->kind, (long long)M, (long long)N, (long long)K, qn_isa_name(isa), bad);
        free(y);
    }
    /* dequantize equals the layout's definition, element by element */
    float *dq = malloc((size_t)(N * K * 4));
    CHECK(qn_dequantize(dq, &q.w, K) == QN_OK, "dequantize: %s", qn_last_error());
    qn_qtile t;
    int bad = 0;
    for (int64_t r = 0; r < N; r++) {
        qn_qtile_for_panels(&t, &q.w, r / 16, 1);
        for (int64_t k = 0; k < K; k++) {
            float s, o;
            int32_t z;
            qn_qtile_group_scale(&t, 0, k / t.group, (int)(r % 16), &s, &z, &o);
            int c = qn_code_at(t.codes, f->bits, r % 16, k);
            float v = f->kind == QN_LUT ? s * f->lut[c] : f->offset == QN_OFF_MIN ? s * (float)c + o : s * (float)(c - z);
            bad += memcmp(&v, &dq[r * K + k], 4) != 0;
        }
    }
    CHECK(bad == 0, "dequantize differs from the layout in %d values", bad);
    free(dq);
    free(yr);
    free_q(&q);
    free(w);
    free(x);
    qn_dispatch_init();
}

static void test_errors(void) {
    qn_format f = fmt(7, 32, QN_SYM, 0, QN_SCALE_F16);
    CHECK(qn_format_check(&f) == QN_EINVAL && strstr(qn_last_error(), "bits"), "bits=7 accepted");
    f = fmt(4, 48, QN_SYM, 0, QN_SCALE_F16);
    CHECK(qn_format_check(&f) == QN_EINVAL && strstr(qn_last_error(), "group"), "group=48 accepted");
    f = fmt(4, 32, QN_ASYM, QN_OFF_NONE, QN_SCALE_F16);
    CHECK(qn_format_check(&f) == QN_EINVAL, "asym without offset accepted");
    f = fmt(4, 32, QN_SYM, 0, QN_SCALE_F16);
    CHECK(qn_format_check_k(&f, 0) == QN_EINVAL && strstr(qn_last_error(), "positive"), "K=0 accepted");
    CHECK(qn_format_check_k(&f, 48) == QN_OK && qn_fmt_kpad(&f, 48) == 64, "K=48 not padded to 64");
    qn_format g128 = fmt(4, 128, QN_SYM, 0, QN_SCALE_F16);
    CHECK(qn_fmt_kpad(&g128, 576) == 640 && qn_fmt_ngroups(&g128, 576) == 5, "K=576 in groups of 128");
    float w[64 * 2] = {0}, x[64] = {0}, y[2] = {0};
    qbuf q;
    make_q(&q, &f, w, 2, 64);
    char ws[8];
    CHECK(qn_qmatmul(y, &q.w, x, QN_X_F32, 1, 64, 2, ws, 8) == QN_EINVAL, "small workspace accepted");
    CHECK(qn_qmatmul(y, &q.w, x, 7, 1, 64, 2, ws, 8) == QN_EINVAL, "bad dtype accepted");
    CHECK(qn_qmatmul(y, &q.w, x, QN_X_F32, 1, 32, 2, ws, 8) == QN_EINVAL, "ldx < K accepted");
    free_q(&q);
}

/* GPTQ with U = I spreads no error (every later column's weight is 0): it must keep
 * round-to-nearest's group parameters and pick, per weight, the nearest value they allow
 * (RTN's rules may round with the unrounded scale, so no weight may end up farther than
 * RTN's); with a real factor it must stay a valid quantization (finite loss, the same
 * parameters as RTN when they are fixed). */
static void test_gptq(const qn_format *f, int64_t N, int64_t K) {
    float *w = xalloc((size_t)(N * K * 4)), *U = xalloc((size_t)(K * K * 4));
    for (int64_t i = 0; i < N * K; i++) w[i] = nrand();
    for (int64_t j = 0; j < K; j++) U[j * K + j] = 1.0f;
    qbuf rtn, g;
    make_q(&rtn, f, w, N, K);
    make_q(&g, f, w, N, K);
    int64_t np = qn_npanels(N), Kp = qn_fmt_kpad(f, K), ng = qn_fmt_ngroups(f, K);
    size_t cb = (size_t)(np * (Kp / 32) * QN_CHUNK_BYTES(f->bits));
    size_t sb = (size_t)(np * ng * 16 * (qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale)));
    memset(g.o.codes, 0, cb);
    memset(g.o.scales, 0, sb);
    double loss = -1;
    qn_status st = qn_gptq(f, w, N, K, U, NULL, 64, 0, &g.o, &loss);
    CHECK(st == QN_OK, "gptq: %s", qn_last_error());
    CHECK(memcmp(g.o.scales, rtn.o.scales, sb) == 0, "gptq with U = I changed RTN's scales (bits %d group %d)",
          f->bits, f->group);
    float *dr = xalloc((size_t)(N * K * 4)), *dg = xalloc((size_t)(N * K * 4));
    CHECK(qn_dequantize(dr, &rtn.w, K) == QN_OK && qn_dequantize(dg, &g.w, K) == QN_OK, "dequantize");
    int farther = 0;
    for (int64_t i = 0; i < N * K; i++) farther += fabsf(dg[i] - w[i]) > fabsf(dr[i] - w[i]) * (1 + 1e-6f) + 1e-7f;
    CHECK(farther == 0, "gptq with U = I put %d weights farther than RTN (bits %d group %d)", farther, f->bits,
          f->group);
    free(dr);
    free(dg);
    CHECK(loss >= 0, "gptq loss %g", loss);
    /* a dense upper factor: errors spread; with fixed parameters the scales stay RTN's */
    for (int64_t j = 0; j < K; j++)
        for (int64_t k = j; k < K; k++) U[j * K + k] = k == j ? 1.0f + 0.01f * (float)(j % 5) : 0.3f * nrand();
    memset(g.o.codes, 0, cb);
    st = qn_gptq(f, w, N, K, U, NULL, 32, 1, &g.o, &loss);
    CHECK(st == QN_OK && loss >= 0 && isfinite(loss), "gptq static: %s", qn_last_error());
    CHECK(memcmp(g.o.scales, rtn.o.scales, sb) == 0, "gptq with fixed parameters changed them");
    U[3 * K + 3] = 0.0f;
    CHECK(qn_gptq(f, w, N, K, U, NULL, 32, 1, &g.o, &loss) == QN_EINVAL, "zero diagonal accepted");
    free_q(&rtn);
    free_q(&g);
    free(w);
    free(U);
}

int main(void) {
    qn_dispatch_init();
    printf("best path: %s\n", qn_isa_name(qn_cpu_best_isa()));
    const int bits[] = {2, 3, 4, 5, 6, 8};
    for (int b = 0; b < 6; b++) {
        qn_format fs[] = {fmt(bits[b], 32, QN_SYM, 0, QN_SCALE_F16), fmt(bits[b], 16, QN_ASYM, QN_OFF_MIN, QN_SCALE_BF16),
                          fmt(bits[b], 128, QN_ASYM, QN_OFF_ZERO, QN_SCALE_F32), fmt(bits[b], 0, QN_SYM, 0, QN_SCALE_F32),
                          fmt(bits[b], 64, QN_LUT, 0, QN_SCALE_F16)};
        for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) {
            test_paths(&fs[i], 1, 37, 256);
            test_paths(&fs[i], 6, 21, 384);
            test_paths(&fs[i], 5, 16, 128);
        }
    }
    qn_format kq4 = fmt(4, 32, QN_ASYM, QN_OFF_MIN, QN_SCALE_NESTED_U6), kq6 = fmt(6, 16, QN_SYM, 0, QN_SCALE_NESTED_I8);
    kq4.rule = kq6.rule = QN_RULE_KQUANT;
    test_paths(&kq4, 3, 40, 512);
    test_paths(&kq6, 7, 17, 256);
    qn_format gf[] = {fmt(4, 32, QN_SYM, 0, QN_SCALE_F16), fmt(4, 128, QN_ASYM, QN_OFF_ZERO, QN_SCALE_F16),
                      fmt(3, 64, QN_ASYM, QN_OFF_MIN, QN_SCALE_BF16), fmt(8, 0, QN_SYM, 0, QN_SCALE_F32),
                      fmt(4, 64, QN_LUT, 0, QN_SCALE_F32), kq4, kq6};
    for (size_t i = 0; i < sizeof gf / sizeof gf[0]; i++) test_gptq(&gf[i], 37, 320);
    qn_format fp8 = fmt(8, 0, QN_LUT, 0, QN_SCALE_F32);
    fp8.lut_kind = QN_LUT_FP8_E5M2;
    for (int i = 0; i < 256; i++) { /* e5m2 = the top byte of fp16; past 0x7B clamps */
        int mag = i & 0x7F;
        if (mag > 0x7B) mag = 0x7B;
        fp8.lut[i] = qn_f16_to_f32((uint16_t)(((i & 0x80) | mag) << 8));
    }
    test_paths(&fp8, 4, 33, 100);
    test_errors();
    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("all qmatmul C tests passed\n");
    return 0;
}
