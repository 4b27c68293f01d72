/* cpu_features.c — CPUID/XGETBV probe, run once; see cpu_features.h. */
#include "cpu_features.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
static unsigned long long qn_xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static qn_cpu_features g_feat;
static int g_probed = 0;

static int env_disables(const char *env, const char *name) {
    /* comma-separated, case-sensitive names: "avx512,avx2" */
    size_t n = strlen(name);
    const char *p = env;
    while (p && *p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len && *p == ' ') { p++; len--; }
        while (len && p[len - 1] == ' ') len--;
        if (len == n && strncmp(p, name, n) == 0) return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

const qn_cpu_features *qn_cpu_probe(void) {
    if (g_probed) return &g_feat;
    memset(&g_feat, 0, sizeof g_feat);
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
        int fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
        unsigned long long xcr0 = osxsave ? qn_xgetbv0() : 0;
        int os_ymm = (xcr0 & 0x6) == 0x6;
        int os_zmm = (xcr0 & 0xE6) == 0xE6;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && avx && os_ymm) {
            g_feat.avx2 = (b >> 5) & 1;
            g_feat.fma = fma;
            g_feat.f16c = f16c;
            if (os_zmm) {
                g_feat.avx512f = (b >> 16) & 1;
                g_feat.avx512dq = (b >> 17) & 1;
                g_feat.avx512bw = (b >> 30) & 1;
                g_feat.avx512vl = (b >> 31) & 1;
                g_feat.avx512vnni = (c >> 11) & 1;
                unsigned int a1, b1, c1, d1;
                if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) g_feat.avx512bf16 = (a1 >> 5) & 1;
            }
        }
    }
#endif
    const char *env = getenv("QUANTA_DISABLE_ISA");
    if (env) {
        g_feat.disabled_avx512 = env_disables(env, "avx512") || env_disables(env, "avx2");
        g_feat.disabled_avx2 = env_disables(env, "avx2");
    }
    g_probed = 1;
    return &g_feat;
}

int qn_cpu_hw_isa(void) {
    const qn_cpu_features *f = qn_cpu_probe();
    if (f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq && f->avx512vnni && f->avx2 &&
        f->fma && f->f16c)
        return QN_ISA_AVX512;
    if (f->avx2 && f->fma && f->f16c) return QN_ISA_AVX2;
    return QN_ISA_REF;
}

int qn_cpu_best_isa(void) {
    const qn_cpu_features *f = qn_cpu_probe();
    int isa = qn_cpu_hw_isa();
    if (isa == QN_ISA_AVX512 && f->disabled_avx512) isa = QN_ISA_AVX2;
    if (isa == QN_ISA_AVX2 && f->disabled_avx2) isa = QN_ISA_REF;
    return isa;
}

const char *qn_isa_name(int isa) {
    switch (isa) {
    case QN_ISA_AVX512: return "avx512";
    case QN_ISA_AVX2: return "avx2";
    default: return "ref";
    }
}
