/* matmul.cu — float matmul on the GPU: y[M, N] = x[M, K] @ w[N, K]^T with fp32 accumulation.
 *
 * x and w row-major float32 / float16 / bfloat16 (any pair), row strides in elements; y in
 * float32 / float16 / bfloat16. Three kernels, the CPU's csrc/kernels/matmul.c beside them:
 *   qn_matmul_gemv_kernel  M <= 16 (decode). A warp owns two weight rows and streams them with
 *                          16-byte loads (8 f16/bf16 or 4 f32 inputs per lane per load), dotting
 *                          them with the x rows staged in shared memory as fp32, in K tiles of
 *                          8192 / MB inputs; per-lane partial sums, then warp shuffles.
 *   qn_matmul_gemm_kernel  sm_80+, x and w of one 16-bit type, larger M. 128x128 output tiles
 *                          (64x64 when that leaves SMs idle), K steps of 32 double-buffered with
 *                          cp.async, mma.sync m16n8k16 (mma.cuh) on 64x32 (32x32) warp tiles.
 *   qn_matmul_fma_kernel   everything else with larger M (float32 or mixed dtypes): 64x64 tiles,
 *                          K steps of 16 converted to fp32 in shared memory, 4x4 outputs per
 *                          thread, each step's 16 products summed before joining the total.
 * Blocks own disjoint outputs (no atomics), so results are deterministic. Every launch is
 * checked and reported by kernel name and shape.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "qn_cuda.h"

namespace {

constexpr int GEMV_ROWS = 2;           /* weight rows per warp */
constexpr int GEMV_UNROLL = 2;         /* 16-byte loads per weight row in flight per lane */
constexpr int GEMV_MAX_WARPS = 8;
constexpr int GEMV_SMEM_FLOATS = 8192; /* x tile: MB rows x 8192 / MB inputs = 32 KiB */
constexpr int GEMM_BK = 32;
constexpr int FMA_BM = 64, FMA_BN = 64, FMA_BK = 16, FMA_THREADS = 256;
constexpr int64_t MAX_N = 65535LL * 64; /* grid.y limit times the narrowest column tile */

/* Raw bits of one element: 16-bit types are loaded as integers, as qmatmul.cu loads scales. */
template <typename T>
using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;

/* Elements k .. k+VEC-1 of a row (VEC = 16 / sizeof(T)) as raw bits, zeros at k >= K: one
 * 16-byte load when `vec` (rows 16-byte aligned) and the vector is whole, else one by one. */
template <typename T>
__device__ __forceinline__ uint4 load_vec(const T *row, int k, int K, bool vec) {
    constexpr int VEC = 16 / sizeof(T);
    if (vec && k + VEC <= K) return __ldg(reinterpret_cast<const uint4 *>(row + k));
    const Bits<T> *r = reinterpret_cast<const Bits<T> *>(row);
    uint32_t u[4] = {0, 0, 0, 0};
#pragma unroll
    for (int e = 0; e < VEC; e++)
        if (k + e < K) {
            if constexpr (sizeof(T) == 4) u[e] = r[k + e];
            else u[e / 2] |= static_cast<uint32_t>(r[k + e]) << (16 * (e % 2));
        }
    return make_uint4(u[0], u[1], u[2], u[3]);
}

/* The 16 / sizeof(T) elements of a 16-byte vector as floats (exact). */
template <typename T>
__device__ __forceinline__ void unpack_vec(uint4 v, float *f) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if constexpr (std::is_same<T, float>::value) {
            f[i] = __uint_as_float(u[i]);
        } else if constexpr (std::is_same<T, __half>::value) {
            f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] & 0xFFFF)));
            f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] >> 16)));
        } else {
            f[2 * i] = __uint_as_float(u[i] << 16);
            f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
        }
    }
}

/* ---- GEMV: M <= 16 ---- */

/* Where input j of a K tile sits in shared memory. A warp-wide load covers a run of 32 * VEC
 * inputs, lane l taking VEC*l .. VEC*l + VEC-1; those go to 4l .. 4l+3 and (VEC = 8) 128 + 4l
 * .. 128 + 4l+3 of the run, so the lane reads its x as float4s at 4l and 128 + 4l, which the
 * 32 lanes do without bank conflicts. For VEC = 4 this is the identity. */
template <int VEC>
__device__ __forceinline__ int x_slot(int j) {
    const int run = j / (32 * VEC) * (32 * VEC), l = j % (32 * VEC) / VEC, e = j % VEC;
    return run + e / 4 * 128 + 4 * l + e % 4;
}

/* Block = blockDim.x / 32 warps; warp i of block b owns weight rows n0 = GEMV_ROWS * (b *
 * warps + i) .. n0 + GEMV_ROWS-1. Per K tile of KT inputs: x rows 0..M-1 into s_x as fp32
 * (zeros past K up to a whole run), then each lane dots its 16-byte vectors of its rows (inputs
 * VEC * lane + 32 * VEC * s) with them: a chain of VEC FMAs per vector, added to the lane's sum;
 * the lanes' sums are combined by shuffles at the end. Weight loads run one step ahead (the
 * first step's while x is staged). Rows of x past M are never read. */
template <typename XT, typename WT, int MB>
static __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32)
    qn_matmul_gemv_kernel(void *y,     /* [M, N], row stride ldy, dtype ydt */
                          int ydt, int64_t ldy,
                          const XT *x, /* [M, K], row stride ldx */
                          int64_t ldx,
                          const WT *w, /* [N, K], row stride ldw */
                          int64_t ldw, int M, int N, int K, bool wvec) {
    constexpr int VEC = 16 / sizeof(WT), RUN = 32 * VEC, KT = GEMV_SMEM_FLOATS / MB;
    static_assert(KT % (RUN * GEMV_UNROLL) == 0, "an x tile holds whole unrolled steps");
    __shared__ __align__(16) float s_x[GEMV_SMEM_FLOATS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp) * GEMV_ROWS;
    const WT *wrow[GEMV_ROWS];
    bool live[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        live[r] = n0 + r < N;
        wrow[r] = w + (live[r] ? n0 + r : 0) * ldw;
    }
    float acc[GEMV_ROWS][MB];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int mm = 0; mm < MB; mm++) acc[r][mm] = 0.0f;

    /* this lane's vectors of step kb (inputs k0 + kb + u * RUN + VEC * lane), zeros past the tile */
    auto load_step = [&](uint4(&v)[GEMV_UNROLL][GEMV_ROWS], int k0, int kb, int kt) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                const int kp = kb + u * RUN + VEC * lane;
                v[u][r] = live[r] && kp < kt ? load_vec(wrow[r], k0 + kp, K, wvec) : make_uint4(0, 0, 0, 0);
            }
    };

    for (int k0 = 0; k0 < K; k0 += KT) {
        const int kt = min(KT, K - k0);
        const int ktr = (kt + RUN - 1) / RUN * RUN;
        uint4 next[GEMV_UNROLL][GEMV_ROWS];
        load_step(next, k0, 0, kt); /* in flight while x is staged */
        __syncthreads();            /* every warp is done with the previous tile */
        for (int i = threadIdx.x; i < M * ktr; i += blockDim.x) {
            const int mm = i / ktr, j = i - mm * ktr;
            s_x[mm * KT + x_slot<VEC>(j)] = j < kt ? to_f32(x[mm * ldx + k0 + j]) : 0.0f;
        }
        __syncthreads();
        for (int kb = 0; kb < kt; kb += RUN * GEMV_UNROLL) {
            uint4 wv[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) wv[u][r] = next[u][r];
            if (kb + RUN * GEMV_UNROLL < kt) load_step(next, k0, kb + RUN * GEMV_UNROLL, kt); /* one step ahead */
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                if (kb + u * RUN >= kt) break; /* past the filled part of s_x (the same for the warp) */
                float wf[GEMV_ROWS][VEC];
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) unpack_vec<WT>(wv[u][r], wf[r]);
                const float *xs = s_x + kb + u * RUN + 4 * lane;
#pragma unroll
                for (int mm = 0; mm < MB; mm++) {
                    if (mm >= M) break;
                    float xv[VEC];
#pragma unroll
                    for (int h = 0; h < VEC / 4; h++) {
                        const float4 t = *reinterpret_cast<const float4 *>(xs + mm * KT + 128 * h);
                        xv[4 * h] = t.x;
                        xv[4 * h + 1] = t.y;
                        xv[4 * h + 2] = t.z;
                        xv[4 * h + 3] = t.w;
                    }
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; r++) {
                        float d = 0.0f;
#pragma unroll
                        for (int e = 0; e < VEC; e++) d = fmaf(wf[r][e], xv[e], d);
                        acc[r][mm] += d;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int mm = 0; mm < MB; mm++) {
            float a = acc[r][mm];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            if (lane == (r * MB + mm) % 32 && live[r] && mm < M) store_y(y, ydt, mm * ldy + n0 + r, a);
        }
}

/* ---- GEMM: tensor cores on f16 / bf16 ---- */

/* 16 bytes global -> shared without a register round trip; bytes past src_bytes (0..16) are
 * zero-filled and not read. sm_80+. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}

/* Closes the group of cp.async issued so far (an empty group when there were none). */
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/* Waits until at most N committed groups are still in flight. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* Rows r0 .. r0+ROWS-1, inputs k0 .. k0+GEMM_BK-1 of a [R, K] matrix (row stride ld) into a
 * [ROWS][LDS] shared tile, zeros outside the matrix, in 16-byte pieces: cp.async when ASYNC
 * (base and rows 16-byte aligned, so every piece is), else element by element. */
template <typename T, int ROWS, int THREADS, bool ASYNC, int LDS>
__device__ __forceinline__ void load_tile(T (*tile)[LDS], const T *src, int64_t ld, int64_t r0, int R, int k0, int K,
                                          int tid) {
    constexpr int PIECES = GEMM_BK / 8;
    static_assert(ROWS * PIECES % THREADS == 0, "whole pieces per thread");
#pragma unroll
    for (int i = 0; i < ROWS * PIECES / THREADS; i++) {
        const int c = tid + i * THREADS, r = c / PIECES, kc = c % PIECES * 8;
        const int64_t gr = r0 + r;
        const int gk = k0 + kc;
        const bool in = gr < R && gk < K;
        if constexpr (ASYNC) {
            const int n = in ? min(8, K - gk) : 0;
            cp_async16(&tile[r][kc], in ? src + gr * ld + gk : src, 2 * n);
        } else {
            *reinterpret_cast<uint4 *>(&tile[r][kc]) = in ? load_vec(src + gr * ld, gk, K, false) : make_uint4(0, 0, 0, 0);
        }
    }
}

/* Output tile rows m0 .. m0+BM-1 (x rows) x columns n0 .. n0+BN-1 (weight rows); WM x WN warps,
 * each a (BM/WM) x (BN/WN) tile of m16n8 mma tiles. Both operands sit in shared memory as
 * [row][k] with rows padded by 8 elements (80 bytes: the 8 rows g of a fragment load start in
 * distinct banks), two stages: while stage s feeds the tensor cores, cp.async fills s ^ 1. */
template <typename T, int BM, int BN, int WM, int WN, bool ASYNC>
static __global__ void __launch_bounds__(WM * WN * 32)
    qn_matmul_gemm_kernel(void *y,    /* [M, N], row stride ldy, dtype ydt */
                          int ydt, int64_t ldy,
                          const T *x, /* [M, K], row stride ldx */
                          int64_t ldx,
                          const T *w, /* [N, K], row stride ldw */
                          int64_t ldw, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int THREADS = WM * WN * 32, LDS = GEMM_BK + 8, TM = BM / WM, TN = BN / WN;
    constexpr int MI = TM / 16, NJ = TN / 8;
    static_assert(TM % 16 == 0 && TN % 8 == 0, "warp tiles of whole mma tiles");
    __shared__ __align__(16) T xs[2][BM][LDS];
    __shared__ __align__(16) T ws[2][BN][LDS];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / WN, wn = warp % WN, g = lane >> 2, tq = lane & 3;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
    const int nk = (K + GEMM_BK - 1) / GEMM_BK;

    float acc[MI][NJ][4];
    zero_tiles(acc);

    load_tile<T, BM, THREADS, ASYNC>(xs[0], x, ldx, m0, M, 0, K, tid);
    load_tile<T, BN, THREADS, ASYNC>(ws[0], w, ldw, n0, N, 0, K, tid);
    cp_async_commit();
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt & 1;
        if (kt + 1 < nk) {
            /* stage s ^ 1 was last read in step kt - 1, which ended with a barrier */
            load_tile<T, BM, THREADS, ASYNC>(xs[s ^ 1], x, ldx, m0, M, (kt + 1) * GEMM_BK, K, tid);
            load_tile<T, BN, THREADS, ASYNC>(ws[s ^ 1], w, ldw, n0, N, (kt + 1) * GEMM_BK, K, tid);
            cp_async_commit();
            cp_async_wait<1>(); /* stage s has landed; s ^ 1 may still be in flight */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        warp_mma_tile<T, MI, NJ, GEMM_BK, LDS>(acc, xs[s], ws[s], wm * TM, wn * TN, g, tq);
        __syncthreads(); /* stage s is refilled in step kt + 1 */
    }
    for_each_acc(acc, m0 + wm * TM, n0 + wn * TN, g, tq, [&](int64_t row, int64_t col, float v) {
        if (row < M && col < N) store_y(y, ydt, row * ldy + col, v);
    });
#endif
}

/* ---- FMA: fp32 tiles for float32 and mixed dtypes ---- */

/* Output tile rows m0 .. m0+63 x columns n0 .. n0+63; thread (ty, tx) = (tid / 16, tid % 16)
 * owns rows m0 + 4ty .. +3, columns n0 + 4tx .. +3. Per K step of 16: both tiles into shared
 * memory as fp32, k-major ([k][row], padded by 4 floats) so each k reads one float4 of x rows
 * and one of weight rows. */
template <typename XT, typename WT>
static __global__ void __launch_bounds__(FMA_THREADS)
    qn_matmul_fma_kernel(void *y,     /* [M, N], row stride ldy, dtype ydt */
                         int ydt, int64_t ldy,
                         const XT *x, /* [M, K], row stride ldx */
                         int64_t ldx,
                         const WT *w, /* [N, K], row stride ldw */
                         int64_t ldw, int M, int N, int K) {
    static_assert(FMA_BM == FMA_BN && FMA_BM * FMA_BK % FMA_THREADS == 0 && FMA_THREADS == 16 * 16 &&
                      FMA_BM == 4 * 16,
                  "one loop fills both tiles; 16 x 16 threads of 4 x 4 outputs");
    __shared__ __align__(16) float xs[FMA_BK][FMA_BM + 4];
    __shared__ __align__(16) float ws[FMA_BK][FMA_BN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * FMA_BM, n0 = static_cast<int64_t>(blockIdx.y) * FMA_BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += FMA_BK) {
        for (int e = tid; e < FMA_BM * FMA_BK; e += FMA_THREADS) {
            const int r = e / FMA_BK, kk = e % FMA_BK, gk = k0 + kk;
            const int64_t gm = m0 + r, gn = n0 + r;
            xs[kk][r] = gm < M && gk < K ? to_f32(x[gm * ldx + gk]) : 0.0f;
            ws[kk][r] = gn < N && gk < K ? to_f32(w[gn * ldw + gk]) : 0.0f;
        }
        __syncthreads();
        float part[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) part[i][j] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FMA_BK; kk++) {
            const float4 a = *reinterpret_cast<const float4 *>(&xs[kk][4 * ty]);
            const float4 b = *reinterpret_cast<const float4 *>(&ws[kk][4 * tx]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] += part[i][j];
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t row = m0 + 4 * ty + i, col = n0 + 4 * tx + j;
            if (row < M && col < N) store_y(y, ydt, row * ldy + col, acc[i][j]);
        }
}

/* ---- launchers ---- */

struct Call {
    void *y;
    int ydt;
    int64_t ldy;
    const void *x;
    int xdt;
    int64_t ldx;
    const void *w;
    int wdt;
    int64_t ldw;
    int64_t M;
    int N, K, sm_count;
    cudaStream_t stream;
};

const char *dt_name(int dt) { return dt == 0 ? "float32" : dt == 1 ? "float16" : "bfloat16"; }

bool aligned16(const void *p, int64_t ld, int esize) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * esize) % 16 == 0;
}

qn_status launch_status(const char *kernel, const Call &c, int64_t M) {
    char name[128];
    snprintf(name, sizeof name, "%s (x %s, w %s, M=%lld, N=%d, K=%d)", kernel, dt_name(c.xdt), dt_name(c.wdt),
             static_cast<long long>(M), c.N, c.K);
    return qn_cuda_launch_status(name, c.stream);
}

template <typename XT, typename WT, int MB>
qn_status gemv_launch(const Call &c, const XT *x, void *y, int m, int warps) {
    const unsigned blocks = static_cast<unsigned>((c.N + GEMV_ROWS * warps - 1) / (GEMV_ROWS * warps));
    qn_matmul_gemv_kernel<XT, WT, MB><<<blocks, warps * 32, 0, c.stream>>>(
        y, c.ydt, c.ldy, x, c.ldx, static_cast<const WT *>(c.w), c.ldw, m, c.N, c.K,
        aligned16(c.w, c.ldw, sizeof(WT)));
    return launch_status("qn_matmul_gemv_kernel", c, m);
}

template <typename XT, typename WT>
qn_status gemv(const Call &c) {
    /* narrower blocks while full ones would leave SMs with fewer than two (small N) */
    int warps = GEMV_MAX_WARPS;
    while (warps > 2 && (c.N + GEMV_ROWS * warps - 1) / (GEMV_ROWS * warps) < 2 * c.sm_count) warps /= 2;
    const int ysize = c.ydt == 0 ? 4 : 2;
    for (int64_t m0 = 0; m0 < c.M; m0 += QN_CUDA_GEMV_MAX_M) {
        const int m = static_cast<int>(c.M - m0 < QN_CUDA_GEMV_MAX_M ? c.M - m0 : QN_CUDA_GEMV_MAX_M);
        const XT *x = static_cast<const XT *>(c.x) + m0 * c.ldx;
        void *y = static_cast<char *>(c.y) + m0 * c.ldy * ysize;
        qn_status st;
        if (m == 1) st = gemv_launch<XT, WT, 1>(c, x, y, m, warps);
        else if (m <= 2) st = gemv_launch<XT, WT, 2>(c, x, y, m, warps);
        else if (m <= 4) st = gemv_launch<XT, WT, 4>(c, x, y, m, warps);
        else if (m <= 8) st = gemv_launch<XT, WT, 8>(c, x, y, m, warps);
        else st = gemv_launch<XT, WT, 16>(c, x, y, m, warps);
        if (st != QN_OK) return st;
    }
    return QN_OK;
}

template <typename T, int BM, int BN, int WM, int WN>
qn_status gemm_launch(const Call &c) {
    const dim3 grid(static_cast<unsigned>((c.M + BM - 1) / BM), static_cast<unsigned>((c.N + BN - 1) / BN));
    const T *x = static_cast<const T *>(c.x), *w = static_cast<const T *>(c.w);
    if (aligned16(c.x, c.ldx, 2) && aligned16(c.w, c.ldw, 2))
        qn_matmul_gemm_kernel<T, BM, BN, WM, WN, true><<<grid, WM * WN * 32, 0, c.stream>>>(
            c.y, c.ydt, c.ldy, x, c.ldx, w, c.ldw, static_cast<int>(c.M), c.N, c.K);
    else
        qn_matmul_gemm_kernel<T, BM, BN, WM, WN, false><<<grid, WM * WN * 32, 0, c.stream>>>(
            c.y, c.ydt, c.ldy, x, c.ldx, w, c.ldw, static_cast<int>(c.M), c.N, c.K);
    return launch_status("qn_matmul_gemm_kernel", c, c.M);
}

template <typename T>
qn_status gemm(const Call &c) {
    const int64_t big_tiles = (c.M + 127) / 128 * ((c.N + 127) / 128);
    if (big_tiles >= c.sm_count) return gemm_launch<T, 128, 128, 2, 4>(c);
    return gemm_launch<T, 64, 64, 2, 2>(c);
}

template <typename XT, typename WT>
qn_status fma(const Call &c) {
    const dim3 grid(static_cast<unsigned>((c.M + FMA_BM - 1) / FMA_BM), static_cast<unsigned>((c.N + FMA_BN - 1) / FMA_BN));
    qn_matmul_fma_kernel<XT, WT><<<grid, FMA_THREADS, 0, c.stream>>>(c.y, c.ydt, c.ldy, static_cast<const XT *>(c.x),
                                                                    c.ldx, static_cast<const WT *>(c.w), c.ldw,
                                                                    static_cast<int>(c.M), c.N, c.K);
    return launch_status("qn_matmul_fma_kernel", c, c.M);
}

template <typename XT, typename WT>
qn_status run(const Call &c, int path) {
    if (path == QN_CUDA_PATH_GEMV) return gemv<XT, WT>(c);
    if constexpr (std::is_same<XT, WT>::value && !std::is_same<XT, float>::value)
        if (path == QN_CUDA_PATH_GEMM) return gemm<XT>(c);
    return fma<XT, WT>(c);
}

template <typename XT>
qn_status run_w(const Call &c, int path) {
    if (c.wdt == 0) return run<XT, float>(c, path);
    if (c.wdt == 1) return run<XT, __half>(c, path);
    return run<XT, __nv_bfloat16>(c, path);
}

bool tensor_core_dtypes(int xdt, int wdt) { return xdt == wdt && xdt != 0; }

}  // namespace

extern "C" qn_status qn_cuda_matmul_path(int xdt, int wdt, int64_t M, int dev, int *path) {
    int cc;
    qn_status st = qn_cuda_device_arch("matmul (cuda)", dev, &cc, NULL);
    if (st != QN_OK) return st;
    if (M <= QN_CUDA_GEMV_MAX_M) *path = QN_CUDA_PATH_GEMV;
    else if (cc >= 80 && tensor_core_dtypes(xdt, wdt)) *path = QN_CUDA_PATH_GEMM;
    else *path = QN_CUDA_PATH_FMA;
    return QN_OK;
}

extern "C" qn_status qn_cuda_matmul(void *y, int ydt, int64_t ldy, const void *x, int xdt, int64_t ldx, const void *w,
                                    int wdt, int64_t ldw, int64_t M, int64_t N, int64_t K, int path, int dev,
                                    void *stream) {
    if (xdt < 0 || xdt > 2 || wdt < 0 || wdt > 2 || ydt < 0 || ydt > 2)
        return qn_set_error(QN_EINVAL, "matmul (cuda): dtype codes must be 0, 1 or 2, got x %d, w %d, y %d", xdt, wdt,
                            ydt);
    if (M < 0 || M > INT32_MAX) return qn_set_error(QN_EINVAL, "matmul (cuda): M = %lld out of range", (long long)M);
    if (N < 1 || N > MAX_N || K < 1 || K > (int64_t)1 << 30)
        return qn_set_error(QN_EINVAL, "matmul (cuda): w shape (%lld, %lld) out of range (1 <= N <= %lld, 1 <= K <= 2^30)",
                            (long long)N, (long long)K, (long long)MAX_N);
    if (ldx < K || ldw < K || ldy < N)
        return qn_set_error(QN_EINVAL,
                            "matmul (cuda): row strides ldx = %lld, ldw = %lld, ldy = %lld are below K = %lld, N = %lld",
                            (long long)ldx, (long long)ldw, (long long)ldy, (long long)K, (long long)N);
    if (path != QN_CUDA_PATH_AUTO && path != QN_CUDA_PATH_GEMV && path != QN_CUDA_PATH_GEMM && path != QN_CUDA_PATH_FMA)
        return qn_set_error(QN_EINVAL, "matmul (cuda): unknown path %d", path);
    if (M == 0) return QN_OK;
    if (!x || !w || !y) return qn_set_error(QN_EINVAL, "matmul (cuda): x, w and y must not be NULL");
    int cc, sms;
    qn_status st = qn_cuda_device_arch("matmul (cuda)", dev, &cc, &sms);
    if (st != QN_OK) return st;
    if (path == QN_CUDA_PATH_AUTO) {
        st = qn_cuda_matmul_path(xdt, wdt, M, dev, &path);
        if (st != QN_OK) return st;
    }
    if (path == QN_CUDA_PATH_GEMM && !tensor_core_dtypes(xdt, wdt))
        return qn_set_error(QN_EUNSUPPORTED,
                            "matmul (cuda): the tensor-core path needs x and w both float16 or both bfloat16, got x %s, "
                            "w %s",
                            dt_name(xdt), dt_name(wdt));
    if (path == QN_CUDA_PATH_GEMM && cc < 80)
        return qn_set_error(QN_EUNSUPPORTED, "matmul (cuda): the tensor-core path needs sm_80+, device %d is sm_%d", dev,
                            cc);

    Call c;
    c.y = y;
    c.ydt = ydt;
    c.ldy = ldy;
    c.x = x;
    c.xdt = xdt;
    c.ldx = ldx;
    c.w = w;
    c.wdt = wdt;
    c.ldw = ldw;
    c.M = M;
    c.N = static_cast<int>(N);
    c.K = static_cast<int>(K);
    c.sm_count = sms;
    c.stream = static_cast<cudaStream_t>(stream);

    int prev = -1;
    QN_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) QN_CUDA_CHECK(cudaSetDevice(dev));
    if (xdt == 0) st = run_w<float>(c, path);
    else if (xdt == 1) st = run_w<__half>(c, path);
    else st = run_w<__nv_bfloat16>(c, path);
    if (prev != dev) (void)cudaSetDevice(prev);
    return st;
}
