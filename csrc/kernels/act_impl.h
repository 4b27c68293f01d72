/* act_impl.h — the scalar exp and the silu(gate) * up loop, included by act.c (the _ref
 * twins) and by act_avx2.c / act_avx512.c, which compile the silu loop with their ISA flags
 * so the compiler vectorizes it: the same float operations per element (no contraction, no
 * reassociation), so every path gives identical bits. */
#ifndef QN_ACT_IMPL_H
#define QN_ACT_IMPL_H

#include "act.h"

/* The clamps below are compares; with trapping math assumed gcc will not if-convert them
 * and the loop stays scalar. No exception flags are read anywhere in quanta. */
#define QN_VEC_MATH __attribute__((optimize("no-trapping-math")))

QN_VEC_MATH static inline float exp_cephes(float x) {
    x = x < QN_EXP_LO ? QN_EXP_LO : x; /* NaN passes both clamps and stays NaN */
    x = x > QN_EXP_HI ? QN_EXP_HI : x;
    float kf = x * QN_EXP_LOG2E + QN_EXP_ROUND; /* round to nearest: n in the low bits */
    uint32_t kb = qn_f32_bits(kf);
    kf = kf - QN_EXP_ROUND;
    float r = x - kf * QN_EXP_LN2_HI;
    r = r - kf * QN_EXP_LN2_LO;
    float p = QN_EXP_P0;
    p = p * r + QN_EXP_P1;
    p = p * r + QN_EXP_P2;
    p = p * r + QN_EXP_P3;
    p = p * r + QN_EXP_P4;
    p = p * r + QN_EXP_P5;
    p = p * (r * r) + r + 1.0f;
    uint32_t n = kb - 0x4B400000u; /* n, two's complement, |n| <= 127 */
    return p * qn_bits_f32((n + 127u) << 23);
}

QN_VEC_MATH static inline void silu_mul_body(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + exp_cephes(-g)) * up[i];
    }
}

#endif
