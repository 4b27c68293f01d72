/* test_attention.c — the attention kernels from C alone: every ISA path against the _ref tile
 * kernel (prefill and paged decode, float and int8 / fp8 caches), paged decode against prefill
 * over the same keys, guard bytes around outputs, zeros for fully masked rows, and invalid
 * arguments returning QN_EINVAL. Run: make -C tests/c run */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cpu_features.h"
#include "dispatch.h"
#include "kernels/attention.h"

#include "test_util.h"

#define GUARD 64
static const float GUARD_VAL = -12345.0f;

static float *guarded(int64_t n) {
    float *p = aligned_alloc(64, (size_t)qn_round_up((n + 2 * GUARD) * 4, 64));
    for (int64_t i = 0; i < n + 2 * GUARD; i++) p[i] = GUARD_VAL;
    return p + GUARD;
}
static int guards_ok(const float *p, int64_t n) {
    for (int64_t i = 1; i <= GUARD; i++)
        if (p[-i] != GUARD_VAL || p[n + i - 1] != GUARD_VAL) return 0;
    return 1;
}
static void guarded_free(float *p) { free(p - GUARD); }

static void *xalloc(int64_t bytes) { return aligned_alloc(64, (size_t)qn_round_up(bytes > 0 ? bytes : 1, 64)); }

/* input buffer of n values in dtype dt (0 f32, 1 f16, 2 bf16, 3 int8, 4 fp8) */
static void *make_input(int dt, int64_t n) {
    int es = dt == QN_A_F32 ? 4 : dt <= QN_A_BF16 ? 2 : 1;
    char *p = xalloc(n * es);
    for (int64_t i = 0; i < n; i++) {
        float x = nrand();
        if (dt == QN_A_F32) ((float *)p)[i] = x;
        else if (dt == QN_A_F16) ((uint16_t *)p)[i] = qn_f32_to_f16(x);
        else if (dt == QN_A_BF16) ((uint16_t *)p)[i] = qn_f32_to_bf16(x);
        else if (dt == QN_A_I8) ((int8_t *)p)[i] = (int8_t)(int)(x * 40.0f);
        else { /* fp8 e4m3fn codes, avoiding the NaN codes 0x7F / 0xFF */
            uint8_t b = (uint8_t)(urand() * 256.0);
            if ((b & 0x7F) == 0x7F) b ^= 1;
            ((uint8_t *)p)[i] = b;
        }
    }
    return p;
}

static double max_rel_diff(const float *a, const float *b, int64_t n) {
    double md = 0.0, mx = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= md)) md = d; /* NaN counts as a failure */
        if (fabs((double)b[i]) > mx) mx = fabs((double)b[i]);
    }
    return md / mx;
}

static float *run_prefill(qn_attn_params *p) {
    int64_t n = p->T * p->H * p->D;
    float *o = guarded(n);
    p->o = o;
    int64_t wsb = qn_attention_workspace_size(p, 64);
    void *ws = xalloc(wsb);
    qn_status st = qn_attention(p, ws, wsb);
    CHECK(st == QN_OK, "attention: %s", qn_last_error());
    CHECK(guards_ok(o, n), "attention wrote outside its output");
    free(ws);
    return o;
}

static void test_prefill(int dt, int64_t T, int64_t S, int64_t H, int64_t Hkv, int64_t D, int causal, int64_t window,
                         float softcap) {
    void *q = make_input(dt, T * H * D), *k = make_input(dt, S * Hkv * D), *v = make_input(dt, S * Hkv * D);
    qn_attn_params p = {NULL, q, k, v, dt, dt, T, S, H, Hkv, D, causal, window, 1.0f / sqrtf((float)D), softcap,
                        NULL, NULL, 0};
    qn_dispatch_set_isa(QN_ISA_REF);
    float *ref = run_prefill(&p);
    /* rows that see no key are zero */
    for (int64_t i = 0; i < T; i++) {
        int64_t pos = i + S - T, lo = window >= 0 ? pos - window : 0, hi = causal ? pos : S - 1;
        if (!causal && window >= 0) hi = pos + window;
        if (lo < 0) lo = 0;
        if (hi > S - 1) hi = S - 1;
        if (lo > hi)
            for (int64_t j = 0; j < H * D; j++) CHECK(ref[i * H * D + j] == 0.0f, "masked row %lld not zero", (long long)i);
    }
    for (int isa = QN_ISA_AVX2; isa <= qn_cpu_best_isa(); isa++) {
        qn_dispatch_set_isa(isa);
        float *o = run_prefill(&p);
        double e = max_rel_diff(o, ref, T * H * D);
        CHECK(e < 5e-5, "prefill dt=%d T=%lld S=%lld H=%lld Hkv=%lld D=%lld causal=%d window=%lld softcap=%g: "
              "%s differs from ref by %.3e", dt, (long long)T, (long long)S, (long long)H, (long long)Hkv,
              (long long)D, causal, (long long)window, softcap, qn_isa_name(isa), e);
        guarded_free(o);
    }
    qn_dispatch_init();
    guarded_free(ref);
    free(q); free(k); free(v);
}

/* Paged decode of B sequences against prefill over each sequence's keys gathered contiguously. */
static void test_paged(int kvdt, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, const int32_t *lens) {
    int64_t maxb = 0, nb = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t need = qn_ceil_div(lens[b], bs);
        maxb = need > maxb ? need : maxb;
        nb += need;
    }
    nb += 3; /* unused blocks */
    if (maxb == 0) maxb = 1;
    int64_t blk = bs * Hkv * D;
    char *kc = make_input(kvdt, nb * blk), *vc = make_input(kvdt, nb * blk);
    float *ks = NULL, *vs = NULL;
    if (kvdt >= QN_A_I8) {
        ks = xalloc(nb * Hkv * 4);
        vs = xalloc(nb * Hkv * 4);
        for (int64_t i = 0; i < nb * Hkv; i++) { ks[i] = 0.01f + (float)urand() * 0.05f; vs[i] = 0.01f + (float)urand() * 0.05f; }
    }
    int32_t *tab = xalloc(B * maxb * 4);
    int64_t next = nb - 1; /* hand out blocks from the top, in reverse, to test the indirection */
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < maxb; i++) tab[b * maxb + i] = i < qn_ceil_div(lens[b], bs) ? (int32_t)next-- : -7;
    float *q = make_input(QN_A_F32, B * H * D);
    qn_paged_params p = {NULL, q, kc, vc, ks, vs, QN_A_F32, kvdt, tab, lens, B, H, Hkv, D, nb, bs, maxb,
                         1.0f / sqrtf((float)D), 0.0f, -1};
    float *ref = NULL;
    for (int isa = QN_ISA_REF; isa <= qn_cpu_best_isa(); isa++) {
        qn_dispatch_set_isa(isa);
        float *o = guarded(B * H * D);
        p.o = o;
        int64_t wsb = qn_paged_attention_workspace_size(&p, 64);
        void *ws = xalloc(wsb);
        qn_status st = qn_paged_attention(&p, ws, wsb);
        CHECK(st == QN_OK, "paged_attention: %s", qn_last_error());
        CHECK(guards_ok(o, B * H * D), "paged_attention wrote outside its output");
        free(ws);
        if (!ref) { ref = o; continue; }
        double e = max_rel_diff(o, ref, B * H * D);
        /* int8 caches round q to int16 on the AVX-512 path (tests/tolerances.py: attention_i8_cache) */
        CHECK(e < (kvdt == QN_A_I8 ? 2e-4 : 5e-5), "paged kvdt=%d B=%lld H=%lld Hkv=%lld D=%lld bs=%lld: %s differs from ref by %.3e", kvdt,
              (long long)B, (long long)H, (long long)Hkv, (long long)D, (long long)bs, qn_isa_name(isa), e);
        guarded_free(o);
    }
    qn_dispatch_init();
    /* against prefill (T = 1) over the dequantized keys of each sequence, in f32 */
    for (int64_t b = 0; b < B; b++) {
        int64_t n = lens[b];
        float *k = xalloc(n * Hkv * D * 4 + 4), *v = xalloc(n * Hkv * D * 4 + 4);
        for (int64_t j = 0; j < n; j++)
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t d = 0; d < D; d++) {
                    int64_t page = tab[b * maxb + j / bs], idx = page * blk + (j % bs) * Hkv * D + h * D + d;
                    float kx, vx;
                    if (kvdt == QN_A_F32) { kx = ((float *)kc)[idx]; vx = ((float *)vc)[idx]; }
                    else if (kvdt == QN_A_F16) { kx = qn_f16_to_f32(((uint16_t *)kc)[idx]); vx = qn_f16_to_f32(((uint16_t *)vc)[idx]); }
                    else if (kvdt == QN_A_BF16) { kx = qn_bf16_to_f32(((uint16_t *)kc)[idx]); vx = qn_bf16_to_f32(((uint16_t *)vc)[idx]); }
                    else if (kvdt == QN_A_I8) { kx = (float)((int8_t *)kc)[idx]; vx = (float)((int8_t *)vc)[idx]; }
                    else { kx = qn_attn_fp8_to_f32(((uint8_t *)kc)[idx]); vx = qn_attn_fp8_to_f32(((uint8_t *)vc)[idx]); }
                    if (ks) { kx *= ks[page * Hkv + h]; vx *= vs[page * Hkv + h]; }
                    k[(j * Hkv + h) * D + d] = kx;
                    v[(j * Hkv + h) * D + d] = vx;
                }
        qn_attn_params pp = {NULL, q + b * H * D, k, v, QN_A_F32, QN_A_F32, 1, n, H, Hkv, D, 0, -1,
                             1.0f / sqrtf((float)D), 0.0f, NULL, NULL, 0};
        float *o = run_prefill(&pp);
        double e = max_rel_diff(ref + b * H * D, o, H * D);
        CHECK(e < (kvdt == QN_A_I8 ? 2e-4 : 5e-5), "paged vs prefill kvdt=%d b=%lld len=%lld: %.3e", kvdt, (long long)b, (long long)n, e);
        if (n == 0)
            for (int64_t i = 0; i < H * D; i++) CHECK(ref[b * H * D + i] == 0.0f, "empty sequence not zero");
        guarded_free(o);
        free(k); free(v);
    }
    guarded_free(ref);
    free(kc); free(vc); free(ks); free(vs); free(tab); free(q);
}

static void test_errors(void) {
    float q[64] = {0}, k[64] = {0}, v[64] = {0}, o[64];
    char ws[1 << 16];
    qn_attn_params p = {o, q, k, v, QN_A_F32, QN_A_F32, 2, 2, 3, 2, 8, 1, -1, 1.0f, 0.0f, NULL, NULL, 0};
    CHECK(qn_attention(&p, ws, sizeof ws) == QN_EINVAL && strstr(qn_last_error(), "Hkv"), "H %% Hkv accepted");
    p.H = 2;
    CHECK(qn_attention(&p, ws, 8) == QN_EINVAL && strstr(qn_last_error(), "workspace"), "small workspace accepted");
    int32_t cq[3] = {0, 2, 1}, ck[3] = {0, 1, 2};
    p.cu_q = cq; p.cu_k = ck; p.n_seq = 2;
    CHECK(qn_attention(&p, ws, sizeof ws) == QN_EINVAL && strstr(qn_last_error(), "cu_seqlens_q"), "bad cu_q accepted");
    p.cu_k = NULL;
    CHECK(qn_attention(&p, ws, sizeof ws) == QN_EINVAL, "cu_q without cu_k accepted");
    int32_t tab[2] = {0, 5}, lens[1] = {3};
    qn_paged_params pp = {o, q, k, v, NULL, NULL, QN_A_F32, QN_A_F32, tab, lens, 1, 2, 2, 4, 2, 2, 2, 1.0f, 0.0f, -1};
    CHECK(qn_paged_attention(&pp, ws, sizeof ws) == QN_EINVAL && strstr(qn_last_error(), "block_tables[0, 1]"),
          "out-of-range block accepted");
    lens[0] = 5;
    CHECK(qn_paged_attention(&pp, ws, sizeof ws) == QN_EINVAL && strstr(qn_last_error(), "seq_lens[0]"),
          "seq_len beyond the table accepted");
    lens[0] = 2;
    pp.kvdtype = QN_A_I8;
    CHECK(qn_paged_attention(&pp, ws, sizeof ws) == QN_EINVAL && strstr(qn_last_error(), "scales"),
          "int8 cache without scales accepted");
}

int main(void) {
    qn_dispatch_init();
    printf("best path: %s\n", qn_isa_name(qn_cpu_best_isa()));
    const int64_t dims[] = {64, 80, 96, 128, 256, 72, 33, 1};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        test_prefill(QN_A_F32, 70, 70, 4, 2, dims[i], 1, -1, 0.0f);
        test_prefill(QN_A_F16, 9, 130, 2, 1, dims[i], 0, -1, 0.0f);
    }
    test_prefill(QN_A_BF16, 65, 65, 8, 1, 128, 1, 20, 0.0f);
    test_prefill(QN_A_F32, 100, 30, 4, 4, 64, 1, -1, 10.0f); /* first 70 rows fully masked */
    test_prefill(QN_A_F32, 50, 90, 4, 2, 64, 0, 5, 0.0f);
    test_prefill(QN_A_F32, 0, 10, 4, 2, 64, 1, -1, 0.0f);
    test_prefill(QN_A_F32, 10, 0, 4, 2, 64, 0, -1, 0.0f);
    const int32_t lens1[] = {1, 17, 0, 700, 1025};
    for (int dt = QN_A_F32; dt <= QN_A_FP8; dt++) {
        test_paged(dt, 5, 8, 2, 128, 16, lens1);
        test_paged(dt, 1, 4, 4, 33, 7, lens1 + 3);
    }
    const int32_t lens2[] = {3, 600};
    test_paged(QN_A_F16, 2, 8, 1, 80, 64, lens2);
    test_errors();
    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("all attention C tests passed\n");
    return 0;
}
