/* mma.cuh — device helpers shared by the matmul kernels (qmatmul.cu, matmul.cu): dtype
 * conversions, the output store, and the operand fragments of mma.sync m16n8k16.
 *
 * Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (PTX ISA), with
 * g = lane / 4 and tq = lane % 4, each 32-bit register holding two consecutive k:
 *   a[0..3] = A[g][2tq..], A[g+8][2tq..], A[g][2tq+8..], A[g+8][2tq+8..]   (A: 16 x 16, row-major)
 *   b[0..1] = B[2tq..][g], B[2tq+8..][g]                                   (B: 16 x 8, k-major per column)
 *   c[0..3] = C[g][2tq], C[g][2tq+1], C[g+8][2tq], C[g+8][2tq+1]            (C: 16 x 8, fp32)
 * With tiles in shared memory as [row][k] (x rows for A, weight rows for B), every fragment
 * register is one 32-bit load, `lds32(&tile[row][k])`.
 * Everything here sits in an unnamed namespace: each translation unit gets its own copy.
 */
#ifndef QN_CUDA_MMA_CUH
#define QN_CUDA_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdint.h>

#include <type_traits>

namespace {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

/* y[i] = v in y's dtype: 0 float32, 1 float16, 2 bfloat16 (round to nearest even). */
__device__ __forceinline__ void store_y(void *y, int ydt, int64_t i, float v) {
    if (ydt == 0) static_cast<float *>(y)[i] = v;
    else if (ydt == 1) static_cast<__half *>(y)[i] = __float2half_rn(v);
    else static_cast<__nv_bfloat16 *>(y)[i] = __float2bfloat16_rn(v);
}

/* c += a b on f16 (CT = __half) or bf16 (CT = __nv_bfloat16) fragments; sm_80+. */
template <typename CT>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<CT, __half>::value)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

/* One fragment register: two consecutive 16-bit elements (or four bytes) of shared memory. */
__device__ __forceinline__ uint32_t lds32(const void *p) { return *static_cast<const uint32_t *>(p); }

/* Zeroes a warp's MI x NJ grid of fp32 accumulator fragments. */
template <int MI, int NJ>
__device__ __forceinline__ void zero_tiles(float (&acc)[MI][NJ][4]) {
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
}

/* fn(row, col, value) for every element of a warp's MI x NJ accumulator grid whose tiles start
 * at row row0 and column col0 (C fragments: rows g and g + 8, columns 2tq and 2tq + 1). */
template <int MI, int NJ, typename F>
__device__ __forceinline__ void for_each_acc(const float (&acc)[MI][NJ][4], int64_t row0, int64_t col0, int g, int tq,
                                             F &&fn) {
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                fn(row0 + i * 16 + g + (e >= 2 ? 8 : 0), col0 + j * 8 + 2 * tq + (e & 1), acc[i][j][e]);
}

/* acc += A B over BK inputs for one warp's MI x NJ grid of m16n8k16 tiles: A rows row0 + 16i
 * (+ g, + 8) of xs, B columns col0 + 8j (+ g) of ws, both shared-memory tiles [row][k] of
 * LDS elements a row. g = lane / 4, tq = lane % 4. */
template <typename CT, int MI, int NJ, int BK, int LDS>
__device__ __forceinline__ void warp_mma_tile(float (&acc)[MI][NJ][4], const CT (*xs)[LDS], const CT (*ws)[LDS],
                                              int row0, int col0, int g, int tq) {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
        uint32_t a[MI][4], b[NJ][2];
#pragma unroll
        for (int i = 0; i < MI; i++) {
            const int row = row0 + i * 16 + g;
            a[i][0] = lds32(&xs[row][ks + 2 * tq]);
            a[i][1] = lds32(&xs[row + 8][ks + 2 * tq]);
            a[i][2] = lds32(&xs[row][ks + 2 * tq + 8]);
            a[i][3] = lds32(&xs[row + 8][ks + 2 * tq + 8]);
        }
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int col = col0 + j * 8 + g;
            b[j][0] = lds32(&ws[col][ks + 2 * tq]);
            b[j][1] = lds32(&ws[col][ks + 2 * tq + 8]);
        }
#pragma unroll
        for (int i = 0; i < MI; i++)
#pragma unroll
            for (int j = 0; j < NJ; j++) mma_16816<CT>(acc[i][j], a[i], b[j]);
    }
}

}  // namespace

#endif /* QN_CUDA_MMA_CUH */
