/* norm.c — RMSNorm y[M, N] = v / sqrt(mean(v^2) + eps) * w[N], optionally after the residual
 * add res[M, N] += x, and the elementwise add y = a + b.
 *
 * Rows are independent: `omp parallel for` over rows (a team only for several rows and enough
 * work), one thread per row, a fixed order of operations inside a row (sums of squares in
 * double), so results do not depend on the thread count. Plain C the compiler vectorizes for
 * the baseline ISA.
 */
#include "norm.h"

#include <math.h>

static inline float load_f(const void *x, int dt, int64_t i) {
    switch (dt) {
    case 1: return qn_f16_to_f32(((const uint16_t *)x)[i]);
    case 2: return qn_bf16_to_f32(((const uint16_t *)x)[i]);
    default: return ((const float *)x)[i];
    }
}

qn_status qn_rmsnorm(float *QN_RESTRICT y, float *res, const void *x, int xdtype, const float *QN_RESTRICT w,
                     int64_t M, int64_t N, float eps) {
    if (M < 0 || N <= 0 || xdtype < 0 || xdtype > 2 || !(eps >= 0.0f))
        return qn_set_error(QN_EINVAL, "rmsnorm: bad arguments M=%lld N=%lld dtype=%d eps=%g", (long long)M,
                            (long long)N, xdtype, (double)eps);
    const int xs = xdtype == 0 ? 4 : 2;
    /* a decode step's few rows are cheaper than waking the team */
#pragma omp parallel for schedule(static) if (M > 1 && M * N >= 16384)
    for (int64_t m = 0; m < M; m++) {
        const void *xr = (const char *)x + m * N * xs;
        float *yr = y + m * N;
        double ss = 0.0;
        if (res) {
            float *rr = res + m * N;
            for (int64_t n = 0; n < N; n++) {
                rr[n] += load_f(xr, xdtype, n);
                ss += (double)rr[n] * rr[n];
            }
            float r = (float)(1.0 / sqrt(ss / (double)N + (double)eps));
            for (int64_t n = 0; n < N; n++) yr[n] = rr[n] * r * w[n];
        } else {
            for (int64_t n = 0; n < N; n++) {
                double v = load_f(xr, xdtype, n);
                ss += v * v;
            }
            float r = (float)(1.0 / sqrt(ss / (double)N + (double)eps));
            for (int64_t n = 0; n < N; n++) yr[n] = load_f(xr, xdtype, n) * r * w[n];
        }
    }
    return QN_OK;
}

qn_status qn_add(float *y, const void *a, int adtype, const void *b, int bdtype, int64_t n) {
    if (n < 0 || adtype < 0 || adtype > 2 || bdtype < 0 || bdtype > 2)
        return qn_set_error(QN_EINVAL, "add: bad arguments n=%lld dtypes %d, %d", (long long)n, adtype, bdtype);
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n; c += chunk) {
        int64_t e = qn_min64(n, c + chunk);
        if (adtype == 0 && bdtype == 0) {
            const float *fa = a, *fb = b;
            for (int64_t i = c; i < e; i++) y[i] = fa[i] + fb[i];
        } else {
            for (int64_t i = c; i < e; i++) y[i] = load_f(a, adtype, i) + load_f(b, bdtype, i);
        }
    }
    return QN_OK;
}
