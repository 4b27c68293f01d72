/* cpu_features.h — one probe of what the CPU and OS support (CPUID + XGETBV).
 * QUANTA_DISABLE_ISA=avx512,avx2 (read once, at the probe) masks levels off. */
#ifndef QN_CPU_FEATURES_H
#define QN_CPU_FEATURES_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qn_cpu_features {
    int avx2, fma, f16c;                 /* AVX2 + FMA + F16C: the "avx2" level */
    int avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, avx512bf16; /* "avx512" needs f,bw,vl,dq,vnni */
    int disabled_avx512, disabled_avx2;  /* masked off by QUANTA_DISABLE_ISA */
} qn_cpu_features;

/* The ISA levels, lowest first. */
enum qn_isa { QN_ISA_REF = 0, QN_ISA_AVX2 = 1, QN_ISA_AVX512 = 2 };

const qn_cpu_features *qn_cpu_probe(void);
/* Highest level the CPU and OS support and QUANTA_DISABLE_ISA allows. */
int qn_cpu_best_isa(void);
/* Highest level the hardware supports, ignoring QUANTA_DISABLE_ISA. */
int qn_cpu_hw_isa(void);
const char *qn_isa_name(int isa);

#ifdef __cplusplus
}
#endif
#endif
