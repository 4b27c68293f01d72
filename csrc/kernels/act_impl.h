/* act_impl.h — the silu(gate) * up loop, included by act.c (the scalar _ref twin) and by
 * act_avx2.c / act_avx512.c, which compile the same source with their ISA flags so the
 * compiler vectorizes it: the same float operations per element (no contraction, no
 * reassociation), so every path gives identical bits. */
#ifndef QN_ACT_IMPL_H
#define QN_ACT_IMPL_H

#include "../qn_common.h"

/* The clamps below are compares; with trapping math assumed gcc will not if-convert them
 * and the loop stays scalar. No exception flags are read anywhere in quanta. */
#define QN_VEC_MATH __attribute__((optimize("no-trapping-math")))

QN_VEC_MATH static inline float exp_cephes(float x) {
    x = x < -87.0f ? -87.0f : x; /* NaN passes both clamps and stays NaN */
    x = x > 88.0f ? 88.0f : x;
    float kf = x * 1.44269504088896341f + 12582912.0f; /* round to nearest: n in the low bits */
    uint32_t kb = qn_f32_bits(kf);
    kf = kf - 12582912.0f;
    float r = x - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    uint32_t n = kb - 0x4B400000u; /* n, two's complement, |n| <= 127 */
    return p * qn_bits_f32((n + 127u) << 23);
}

QN_VEC_MATH static inline void silu_mul_body(float *out, const float *gate,
                                             const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + exp_cephes(-g)) * up[i];
    }
}

#endif
