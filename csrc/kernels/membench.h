/* membench.h — memory read bandwidth probe used by benchmarks/. */
#ifndef QN_MEMBENCH_H
#define QN_MEMBENCH_H
#include "../qn_common.h"

/* Sum of a[0 .. n) (uint64), read by all threads; the benchmark's bandwidth reference. */
uint64_t qn_membench_read(const uint64_t *QN_RESTRICT a, int64_t n);
#endif
