/* act_avx512.c — the silu(gate) * up loop of act_impl.h compiled for AVX512. */
#include "act.h"
#include "act_impl.h"

void qn_silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n) {
    silu_mul_body(out, gate, up, n);
}
