/* membench.c — memory read bandwidth probe for the benchmarks: sums a buffer as uint64
 * with several independent streams per thread (OpenMP over contiguous slices), the
 * access pattern a weight-streaming GEMV needs. Baseline C; the compiler vectorizes it. */
#include "membench.h"

uint64_t qn_membench_read(const uint64_t *QN_RESTRICT a, int64_t n) {
    uint64_t total = 0;
#pragma omp parallel reduction(+ : total)
    {
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n / 8; i++) {
            const uint64_t *p = a + 8 * i;
            s0 += p[0]; s1 += p[1]; s2 += p[2]; s3 += p[3];
            s4 += p[4]; s5 += p[5]; s6 += p[6]; s7 += p[7];
        }
        total += s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
    }
    for (int64_t i = n / 8 * 8; i < n; i++) total += a[i];
    return total;
}
