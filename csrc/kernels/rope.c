/* rope.c — rotary position embedding in place on x[T, nh, D] (float32).
 *
 * For token t and pair i < rot / 2: a = pos[t] * inv_freq[i] in double (exact enough for
 * positions in the millions), c = mscale cos a, s = mscale sin a, and the pair (x1, x2) ->
 * (x1 c - x2 s, x1 s + x2 c); pairs (2i, 2i + 1) interleaved or (i, i + rot / 2) NeoX.
 * cos / sin are computed once per token into a stack buffer (rot <= QN_ROPE_MAX_ROT) and
 * applied to every head; `omp parallel for` over tokens (a team only for several tokens).
 */
#include "rope.h"

#include <math.h>

#define QN_ROPE_MAX_ROT 1024

qn_status qn_rope(float *x, const int32_t *pos, const double *inv_freq, int64_t T, int64_t nh, int64_t D,
                  int64_t rot, float mscale, int neox) {
    if (T < 0 || nh <= 0 || D <= 0 || rot < 2 || rot > D || rot % 2 || rot > QN_ROPE_MAX_ROT)
        return qn_set_error(QN_EINVAL, "rope: bad sizes T=%lld heads=%lld D=%lld rotary_dim=%lld (even, <= D, <= %d)",
                            (long long)T, (long long)nh, (long long)D, (long long)rot, QN_ROPE_MAX_ROT);
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) if (T > 1 && T * nh * half >= 4096)
    for (int64_t t = 0; t < T; t++) {
        float c[QN_ROPE_MAX_ROT / 2], s[QN_ROPE_MAX_ROT / 2];
        for (int64_t i = 0; i < half; i++) {
            double a = (double)pos[t] * inv_freq[i];
            c[i] = (float)(mscale * cos(a));
            s[i] = (float)(mscale * sin(a));
        }
        for (int64_t h = 0; h < nh; h++) {
            float *xr = x + (t * nh + h) * D;
            const int64_t step = neox ? 1 : 2, off = neox ? half : 1;
            for (int64_t i = 0; i < half; i++) {
                float x1 = xr[i * step], x2 = xr[i * step + off];
                xr[i * step] = x1 * c[i] - x2 * s[i];
                xr[i * step + off] = x1 * s[i] + x2 * c[i];
            }
        }
    }
    return QN_OK;
}
