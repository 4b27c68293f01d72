/* rope.h — rotary position embedding in place on float32 q or k [T, nh, D].
 *
 * Interleaved (GPT-J / Meta Llama: pairs 2i, 2i+1) and NeoX (HF Llama: pairs i, i + rot/2)
 * pairing; the frequencies (plain, linear, Llama-3, YaRN) come from quanta.ops as inv_freq.
 * Plain C11 loops the compiler vectorizes for the baseline ISA; the driver owns OpenMP over
 * rows (tokens); each row is computed by one thread in a fixed order, so results do not
 * depend on the thread count.
 */
#ifndef QN_ROPE_H
#define QN_ROPE_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Rotary embedding in place on x[T, nh, D] (float32): for token t and pair i < rot / 2, with
 * a = pos[t] * inv_freq[i] (in double), c = mscale * cos a, s = mscale * sin a,
 * (x1, x2) becomes (x1 c - x2 s, x1 s + x2 c). Pairs are (2i, 2i + 1) when interleaved,
 * (i, i + rot / 2) for NeoX; dims past rot are left as they are. mscale is YaRN's
 * attention factor (1 otherwise). */
qn_status qn_rope(float *x,                      /* [T, nh, D] */
                  const int32_t *pos,            /* [T] */
                  const double *inv_freq,        /* [rot / 2] */
                  int64_t T, int64_t nh, int64_t D, int64_t rot, float mscale, int neox);

#ifdef __cplusplus
}
#endif
#endif
