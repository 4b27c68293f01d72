/* act_avx2.c — the silu(gate) * up loop of act_impl.h compiled for AVX2. */
#include "act.h"
#include "act_impl.h"

void qn_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    silu_mul_body(out, gate, up, n);
}
