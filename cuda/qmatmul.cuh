/* qmatmul.cuh — what the quantized-matmul translation units share: the weight and call
 * descriptions, the launch check, and run_bits<BITS>, the GEMV / GEMM entry for BITS-bit
 * weights. Its kernels (qmatmul_kernels.cuh) are compiled once per bit width, in
 * qmatmul_b<BITS>.cu, so the build runs them in parallel; qmatmul.cu holds the FP8 kernel,
 * the planning and the C entry points. See qmatmul.cu for the design.
 */
#ifndef QN_CUDA_QMATMUL_CUH
#define QN_CUDA_QMATMUL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "qn_cuda.h"

namespace qn_qmm {

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_UNROLL = 4; /* chunks whose loads a GEMV lane issues together */
constexpr int GEMM_THREADS = 128;
constexpr int BM = 64, BN = 64, BK = 64; /* GEMM tile: x rows, weight rows (4 panels), inputs */

/* The weight as kernels see it (device pointers, sizes as ints: checked by the launcher). */
struct QW {
    const uint8_t *codes;     /* [n_panels][n_chunks][64 * bits] */
    const void *scales;       /* [n_panels][ngroups][16] */
    const void *offsets;      /* [n_panels][ngroups][16] or NULL */
    const __half *supers;     /* [n_panels][nsuper][16] or NULL */
    const __half *super_mins; /* [n_panels][nsuper][16] or NULL */
    int N, K, n_panels, n_chunks, group, ngroups, nsuper;
    int gshift; /* log2(group) when a power of two, else -1 */
    int bits, kind, offset, scale;
};

/* Lookup table passed by value (1 KiB of kernel parameters), copied to shared memory. */
struct Lut {
    float v[256];
};

__device__ __forceinline__ float load_scale(const void *p, int64_t i, int scale) {
    if (scale == QN_SCALE_F32) return static_cast<const float *>(p)[i];
    if (scale == QN_SCALE_F16) return __half2float(static_cast<const __half *>(p)[i]);
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t *>(p)[i]) << 16); /* bf16 */
}

/* What a call runs: the path, the GEMM's tile rows and K splits, and the workspace it needs. */
struct Plan {
    int path, tm, splits, split_chunks;
    int64_t workspace;
};

struct Call {
    void *y;
    int ydt;
    int64_t ldy;
    QW w;
    const Lut *lut;
    const void *x;
    int xdt;
    int64_t ldx, M;
    float *xscale; /* FP8: [M] */
    float *part;   /* GEMM with splits: [splits][M][N] */
    Plan plan;
    cudaStream_t stream;
};

inline qn_status launch_status(const char *kernel, const Call &c, cudaStream_t stream) {
    static const char *dts[] = {"float32", "float16", "bfloat16"};
    char name[128];
    snprintf(name, sizeof name, "%s (%d-bit weights, x %s, M=%lld)", kernel, c.w.bits, dts[c.xdt],
             static_cast<long long>(c.M));
    return qn_cuda_launch_status(name, stream);
}

/* Defined in qmatmul_kernels.cuh, instantiated in qmatmul_b<BITS>.cu. */
template <int BITS>
qn_status run_bits(const Call &c, int path);

}  // namespace qn_qmm

#endif /* QN_CUDA_QMATMUL_CUH */
