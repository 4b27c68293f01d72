/* qn_common.h — status codes, the thread-local error message, small inline helpers.
 *
 * Shared by every C file of quanta (kernels and binding) and by the CUDA sources.
 * Kernels report bad input by returning a status and setting a message with
 * qn_set_error(); the binding turns the pair into a Python exception.
 * Everything here is baseline C11: no ISA-specific code may live in this header.
 */
#ifndef QN_COMMON_H
#define QN_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__cplusplus)
#define QN_RESTRICT __restrict__
#else
#define QN_RESTRICT restrict
#endif

#define QN_INLINE static inline __attribute__((always_inline))
#define QN_LIKELY(x) __builtin_expect(!!(x), 1)
#define QN_UNLIKELY(x) __builtin_expect(!!(x), 0)

typedef enum qn_status {
    QN_OK = 0,
    QN_EINVAL = 1,        /* bad argument: ValueError */
    QN_ENOMEM = 2,        /* allocation failed (binding only): MemoryError */
    QN_EUNSUPPORTED = 3,  /* valid but not implemented: NotImplementedError */
    QN_ECUDA = 4,         /* CUDA runtime error: RuntimeError */
} qn_status;

/* Thread-local last error message; set by a failing call, read by the binding. */
qn_status qn_set_error(qn_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
const char *qn_last_error(void);

/* OpenMP queries that also compile without OpenMP (one thread). */
QN_INLINE int qn_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
QN_INLINE int qn_omp_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

QN_INLINE int64_t qn_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
QN_INLINE int64_t qn_ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }
QN_INLINE int64_t qn_min64(int64_t a, int64_t b) { return a < b ? a : b; }
QN_INLINE int64_t qn_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- scalar half / bfloat16 conversions (exact, round-to-nearest-even) ---- */

QN_INLINE uint32_t qn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
QN_INLINE float qn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

QN_INLINE float qn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return qn_bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in float32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return qn_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

QN_INLINE uint16_t qn_f32_to_f16(float f) {
    uint32_t x = qn_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {
        /* result is subnormal (or zero): scale so the unit is 2^-24, round to even */
        if (ax < 0x33000000u) return (uint16_t)sign; /* < 2^-25: rounds to zero */
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e; /* value = m * 2^(e-150); unit 2^-24 -> shift = 126 - e */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0x0FFF + ((ax >> 13) & 1); /* round to nearest even on the dropped 13 bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

QN_INLINE float qn_bf16_to_f32(uint16_t b) { return qn_bits_f32((uint32_t)b << 16); }

QN_INLINE uint16_t qn_f32_to_bf16(float f) {
    uint32_t x = qn_f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
    return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

#ifdef __cplusplus
}
#endif
#endif /* QN_COMMON_H */
