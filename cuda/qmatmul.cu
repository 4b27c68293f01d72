/* qmatmul.cu — quantized matmul on the GPU: y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * W is in the panel layout of csrc/qn_formats.h (the CPU's bytes, copied as they are): per
 * panel of 16 rows and chunk of 32 inputs, bit planes of 4-input "quads". One lane of a warp
 * decodes rows 4t..4t+3 x inputs 8v..8v+7 of a chunk with one 128-bit load per plane, which is
 * the unit both kernels below build on.
 *   qn_qgemv_kernel     M <= 16. One block of 8 warps per panel; the warps split K, each lane
 *                       dequantizes in registers and accumulates MB rows of x in fp32; warp
 *                       shuffles, then shared memory, reduce. Weight bytes are read once.
 *   qn_qgemm_kernel     sm_80+, larger M. 64x64 output tiles, K in steps of 64: x converted to
 *                       f16/bf16 and W dequantized to the same type into shared memory, then
 *                       mma.sync m16n8k16 with fp32 accumulators (4 warps, 32x32 each).
 *   qn_qgemm_fp8_kernel sm_89+, fp8_e4m3 weights with one scale per row: the codes are e4m3
 *                       already; x is cast to e4m3 with a per-row scale (absmax / 448, from
 *                       qn_row_absmax_kernel) and mma.sync m16n8k32 e4m3 runs on both.
 * Threading: blocks over panels (GEMV) or output tiles (GEMM); no atomics, so results are
 * deterministic. Every launch is checked and reported by kernel name.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "qn_cuda.h"

namespace {

constexpr int GEMV_WARPS = 8;
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

/* (s, m) of row n of panel p for input k: w = s * q + m (int kinds) or s * lut[q] (m = 0). */
__device__ __forceinline__ void group_params(const QW &w, int64_t p, int n, int k, float &s, float &m) {
    const int64_t i = (p * w.ngroups + k / w.group) * 16 + n;
    if (w.scale == QN_SCALE_NESTED_U6 || w.scale == QN_SCALE_NESTED_I8) {
        const int64_t si = (p * w.nsuper + k / QN_SUPER) * 16 + n;
        const float d = __half2float(w.supers[si]);
        s = d * (w.scale == QN_SCALE_NESTED_U6 ? static_cast<float>(static_cast<const uint8_t *>(w.scales)[i])
                                               : static_cast<float>(static_cast<const int8_t *>(w.scales)[i]));
        if (w.kind == QN_ASYM)
            m = -(__half2float(w.super_mins[si]) * static_cast<float>(static_cast<const uint8_t *>(w.offsets)[i]));
        else
            m = -s * static_cast<float>(1 << (w.bits - 1));
        return;
    }
    s = load_scale(w.scales, i, w.scale);
    if (w.kind == QN_LUT)
        m = 0.0f;
    else if (w.kind == QN_SYM)
        m = -s * static_cast<float>(1 << (w.bits - 1));
    else if (w.offset == QN_OFF_ZERO)
        m = -s * static_cast<float>(static_cast<const uint8_t *>(w.offsets)[i]);
    else
        m = load_scale(w.offsets, i, w.scale);
}

__device__ __forceinline__ uint4 load16(const uint8_t *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

/* Codes of rows 4t..4t+3 and inputs 8v..8v+7 of one chunk: q[r][i] is row 4t+r, input 8v+i.
 * Plane offsets follow qn_fmt_planes(); a plane's 32-bit word for row n sits at 16t + 4(n%4)
 * of its 64-byte quad, byte j holding input 4 * quad + j. */
template <int BITS>
__device__ __forceinline__ void decode_codes(const uint8_t *chunk, int v, int t, uint32_t q[4][8]) {
    if constexpr (BITS == 8) {
        const uint4 a = load16(chunk + 64 * (2 * v) + 16 * t), b = load16(chunk + 64 * (2 * v + 1) + 16 * t);
        const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                q[r][j] = (wa[r] >> (8 * j)) & 0xFF;
                q[r][4 + j] = (wb[r] >> (8 * j)) & 0xFF;
            }
    } else {
        constexpr int NIB = BITS >= 4 ? 0 : -1;
        constexpr int CRUMB = BITS == 6 ? 256 : (BITS == 2 || BITS == 3) ? 0 : -1;
        constexpr int BIT = BITS == 5 ? 256 : BITS == 3 ? 128 : -1;
        uint32_t nib[4] = {0, 0, 0, 0}, crumb[4] = {0, 0, 0, 0}, bit[4] = {0, 0, 0, 0};
        if constexpr (NIB >= 0) {
            const uint4 u = load16(chunk + NIB + 64 * v + 16 * t);
            nib[0] = u.x; nib[1] = u.y; nib[2] = u.z; nib[3] = u.w;
        }
        if constexpr (CRUMB >= 0) {
            const uint4 u = load16(chunk + CRUMB + 64 * (v >> 1) + 16 * t);
            crumb[0] = u.x; crumb[1] = u.y; crumb[2] = u.z; crumb[3] = u.w;
        }
        if constexpr (BIT >= 0) {
            const uint4 u = load16(chunk + BIT + 16 * t);
            bit[0] = u.x; bit[1] = u.y; bit[2] = u.z; bit[3] = u.w;
        }
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    /* input 8v + 4h + j is quad 2v + h */
                    const uint32_t n4 = (nib[r] >> (8 * j + 4 * h)) & 15;
                    const uint32_t c2 = (crumb[r] >> (8 * j + 2 * (2 * (v & 1) + h))) & 3;
                    const uint32_t b1 = (bit[r] >> (8 * j + 2 * v + h)) & 1;
                    uint32_t c;
                    if constexpr (BITS == 6) c = n4 | c2 << 4;
                    else if constexpr (BITS == 5) c = n4 | b1 << 4;
                    else if constexpr (BITS == 4) c = n4;
                    else if constexpr (BITS == 3) c = c2 | b1 << 2;
                    else c = c2;
                    q[r][4 * h + j] = c;
                }
    }
}

/* Rows 4t..4t+3, inputs k0..k0+7 of panel p, chunk c, as floats: s*q + m or s*lut[q];
 * zeros past the last panel or chunk. */
template <int BITS>
__device__ __forceinline__ void dequant_lane(const QW &w, const float *lut, int64_t p, int c, int v, int t,
                                             float out[4][8]) {
    if (p >= w.n_panels || c >= w.n_chunks) {
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int i = 0; i < 8; i++) out[r][i] = 0.0f;
        return;
    }
    uint32_t q[4][8];
    decode_codes<BITS>(w.codes + (p * w.n_chunks + c) * (64 * BITS), v, t, q);
    const int k0 = c * QN_CHUNK + 8 * v;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        float s, m;
        group_params(w, p, 4 * t + r, k0, s, m);
#pragma unroll
        for (int i = 0; i < 8; i++)
            out[r][i] = w.kind == QN_LUT ? s * lut[q[r][i]] : fmaf(s, static_cast<float>(q[r][i]), m);
    }
}

/* x[k0 .. k0+7] of one row as floats, zeros at k >= K; `vec`: the row is 16-byte aligned. */
template <typename XT>
__device__ __forceinline__ void load_x8(const XT *row, int k0, int K, bool vec, float xv[8]) {
    if (vec && k0 + 8 <= K) {
        if constexpr (sizeof(XT) == 2) {
            const uint4 u = __ldg(reinterpret_cast<const uint4 *>(row + k0));
            const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                XT lo, hi;
                const uint16_t l16 = words[i] & 0xFFFF, h16 = words[i] >> 16;
                memcpy(&lo, &l16, 2);
                memcpy(&hi, &h16, 2);
                xv[2 * i] = to_f32(lo);
                xv[2 * i + 1] = to_f32(hi);
            }
        } else {
            const float4 a = __ldg(reinterpret_cast<const float4 *>(row + k0));
            const float4 b = __ldg(reinterpret_cast<const float4 *>(row + k0 + 4));
            xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
            xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) xv[i] = k0 + i < K ? to_f32(row[k0 + i]) : 0.0f;
}

/* ---- GEMV: M <= 16 ---- */

/* Block = one panel (16 output rows), GEMV_WARPS warps splitting its chunks; lane
 * (cpar, v, t) = (lane >> 4, lane >> 2 & 3, lane & 3) takes chunk 2 * (warp + GEMV_WARPS * i)
 * + cpar, rows 4t..4t+3, inputs 8v..8v+7. MB (>= M) rows of x are processed per pass. */
template <int BITS, typename XT, int MB>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    qn_qgemv_kernel(void *y,       /* [M, N], row stride ldy, dtype ydt */
                    int ydt, int64_t ldy, QW w, Lut lut,
                    const XT *x,   /* [M, K], row stride ldx */
                    int64_t ldx, int M, bool xvec) {
    __shared__ float s_lut[256];
    __shared__ float s_red[GEMV_WARPS][MB][16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = lane & 3, v = (lane >> 2) & 3, cpar = lane >> 4;
    const int64_t p = blockIdx.x;
    if (w.kind == QN_LUT)
        for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) s_lut[i] = lut.v[i];
    __syncthreads();

    float acc[4][MB];
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int mm = 0; mm < MB; mm++) acc[r][mm] = 0.0f;

    for (int c = 2 * warp + cpar; c < w.n_chunks; c += 2 * GEMV_WARPS) {
        uint32_t q[4][8];
        decode_codes<BITS>(w.codes + (p * w.n_chunks + c) * (64 * BITS), v, t, q);
        const int k0 = c * QN_CHUNK + 8 * v;
        float s[4], m[4], wq[4][8];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            group_params(w, p, 4 * t + r, k0, s[r], m[r]);
#pragma unroll
            for (int i = 0; i < 8; i++) wq[r][i] = w.kind == QN_LUT ? s_lut[q[r][i]] : static_cast<float>(q[r][i]);
        }
#pragma unroll
        for (int mm = 0; mm < MB; mm++) {
            if (mm >= M) break;
            float xv[8], xs = 0.0f;
            load_x8<XT>(x + mm * ldx, k0, w.K, xvec, xv);
#pragma unroll
            for (int i = 0; i < 8; i++) xs += xv[i];
#pragma unroll
            for (int r = 0; r < 4; r++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) d = fmaf(wq[r][i], xv[i], d);
                /* sum_i (s q_i + m) x_i = s * sum q_i x_i + m * sum x_i */
                acc[r][mm] += fmaf(s[r], d, m[r] * xs);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int mm = 0; mm < MB; mm++) {
            float a = acc[r][mm];
            a += __shfl_xor_sync(0xffffffffu, a, 4);
            a += __shfl_xor_sync(0xffffffffu, a, 8);
            a += __shfl_xor_sync(0xffffffffu, a, 16);
            if (lane < 4) s_red[warp][mm][4 * lane + r] = a;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < MB * 16; i += blockDim.x) {
        const int mm = i / 16, n = i % 16;
        const int64_t row = p * 16 + n;
        if (mm >= M || row >= w.N) continue;
        float sum = 0.0f;
#pragma unroll
        for (int wi = 0; wi < GEMV_WARPS; wi++) sum += s_red[wi][mm][n];
        store_y(y, ydt, mm * ldy + row, sum);
    }
}

/* ---- GEMM: tensor cores on f16 / bf16 tiles ---- */

/* Output tile rows m0..m0+63 (x rows) x weight rows 16*p0 .. 16*p0+63 (4 panels); 4 warps in
 * 2x2, each 32x32 = 2 x 4 mma tiles. Per step of 64 inputs: x tile and dequantized W tile into
 * shared memory ([row][k], rows padded by 8 elements so fragment loads hit distinct banks),
 * then 4 k16 steps. Fragments (PTX m16n8k16): a = x[g | g+8][2tq .. 2tq+1 | +8],
 * b = W[col g][2tq .. 2tq+1 | +8], c = y[g | g+8][2tq .. 2tq+1], g = lane / 4, tq = lane % 4. */
template <int BITS, typename XT, typename CT>
static __global__ void __launch_bounds__(GEMM_THREADS)
    qn_qgemm_kernel(void *y, int ydt, int64_t ldy, QW w, Lut lut, const XT *x, int64_t ldx, int64_t M) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int LDS = BK + 8;
    __shared__ __align__(16) CT xs[BM][LDS];
    __shared__ __align__(16) CT ws[BN][LDS];
    __shared__ float s_lut[256];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, tq = lane & 3;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t p0 = static_cast<int64_t>(blockIdx.y) * (BN / 16);
    /* dequantizing role: panel p0 + tid / 32, chunk parity, (v, t) as in the GEMV */
    const int dp = tid / 32, dc = (lane >> 4), dv = (lane >> 2) & 3, dt = lane & 3;
    if (w.kind == QN_LUT)
        for (int i = tid; i < (1 << BITS); i += GEMM_THREADS) s_lut[i] = lut.v[i];
    __syncthreads();

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    for (int kc = 0; kc < w.n_chunks; kc += BK / QN_CHUNK) {
        const int kbase = kc * QN_CHUNK;
        for (int e = tid; e < BM * BK; e += GEMM_THREADS) {
            const int r = e / BK, cidx = e % BK;
            const int64_t gm = m0 + r;
            const int gk = kbase + cidx;
            xs[r][cidx] = from_f32<CT>(gm < M && gk < w.K ? to_f32(x[gm * ldx + gk]) : 0.0f);
        }
        {
            float wv[4][8];
            dequant_lane<BITS>(w, s_lut, p0 + dp, kc + dc, dv, dt, wv);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                __align__(16) CT packed[8];
#pragma unroll
                for (int i = 0; i < 8; i++) packed[i] = from_f32<CT>(wv[r][i]);
                *reinterpret_cast<uint4 *>(&ws[dp * 16 + 4 * dt + r][dc * QN_CHUNK + 8 * dv]) =
                    *reinterpret_cast<const uint4 *>(packed);
            }
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            uint32_t a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int row = wm * 32 + i * 16 + g;
                a[i][0] = lds32(&xs[row][ks + 2 * tq]);
                a[i][1] = lds32(&xs[row + 8][ks + 2 * tq]);
                a[i][2] = lds32(&xs[row][ks + 2 * tq + 8]);
                a[i][3] = lds32(&xs[row + 8][ks + 2 * tq + 8]);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int col = wn * 32 + j * 8 + g;
                b[j][0] = lds32(&ws[col][ks + 2 * tq]);
                b[j][1] = lds32(&ws[col][ks + 2 * tq + 8]);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma_16816<CT>(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t row = m0 + wm * 32 + i * 16 + g + (e >= 2 ? 8 : 0);
                const int64_t col = p0 * 16 + wn * 32 + j * 8 + 2 * tq + (e & 1);
                if (row < M && col < w.N) store_y(y, ydt, row * ldy + col, acc[i][j][e]);
            }
#endif
}

/* ---- FP8: e4m3 x e4m3 tensor cores ---- */

/* scale[row] = max_k |x[row, k]| / 448 (e4m3's largest finite value); one block per row. */
template <typename XT>
static __global__ void qn_row_absmax_kernel(float *scale, /* [M] */ const XT *x, int64_t ldx, int K) {
    __shared__ float s_max[32];
    const int64_t row = blockIdx.x;
    float mx = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) mx = fmaxf(mx, fabsf(to_f32(x[row * ldx + k])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x % 32 == 0) s_max[threadIdx.x / 32] = mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < static_cast<int>(blockDim.x / 32); i++) mx = fmaxf(mx, s_max[i]);
        scale[row] = fmaxf(mx, s_max[0]) / 448.0f;
    }
}

/* Same tiling as qn_qgemm_kernel with bytes: k steps of 32 (PTX m16n8k32 e4m3 fragments:
 * a = x[g | g+8][4tq .. 4tq+3 | +16], b = W[col g][4tq .. 4tq+3 | +16]). The W tile is the
 * codes themselves: word (quad qd, row n) of a chunk holds inputs 4qd .. 4qd+3 of row n. Codes
 * 0x7F / 0xFF (e4m3 NaN) read as +-448, as on the CPU. y = acc * xscale[row] * wscale[col]. */
template <typename XT>
static __global__ void __launch_bounds__(GEMM_THREADS)
    qn_qgemm_fp8_kernel(void *y, int ydt, int64_t ldy, QW w, const XT *x, int64_t ldx, int64_t M,
                        const float *xscale /* [M] */) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    constexpr int LDS = BK + 16;
    __shared__ __align__(16) uint8_t xs[BM][LDS];
    __shared__ __align__(16) uint8_t ws[BN][LDS];
    __shared__ float s_inv[BM];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, tq = lane & 3;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t p0 = static_cast<int64_t>(blockIdx.y) * (BN / 16);
    for (int r = tid; r < BM; r += GEMM_THREADS) {
        const float s = m0 + r < M ? xscale[m0 + r] : 0.0f;
        s_inv[r] = s > 0.0f ? 1.0f / s : 0.0f;
    }
    __syncthreads();

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    for (int kc = 0; kc < w.n_chunks; kc += BK / QN_CHUNK) {
        const int kbase = kc * QN_CHUNK;
        for (int e = tid; e < BM * BK; e += GEMM_THREADS) {
            const int r = e / BK, cidx = e % BK;
            const int64_t gm = m0 + r;
            const int gk = kbase + cidx;
            const float v = gm < M && gk < w.K ? to_f32(x[gm * ldx + gk]) * s_inv[r] : 0.0f;
            xs[r][cidx] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
        }
        /* 4 panels x 2 chunks x 128 words */
        for (int e = tid; e < 4 * 2 * 128; e += GEMM_THREADS) {
            const int pp = e / 256, cc = (e / 128) % 2, wi = e % 128, qd = wi / 16, n = wi % 16;
            const int64_t p = p0 + pp;
            const int c = kc + cc;
            uint32_t word = 0;
            if (p < w.n_panels && c < w.n_chunks) {
                word = __ldg(reinterpret_cast<const uint32_t *>(w.codes + (p * w.n_chunks + c) * 512 + 64 * qd + 4 * n));
#pragma unroll
                for (int b = 0; b < 4; b++)
                    if (((word >> (8 * b)) & 0x7F) == 0x7F) word -= 1u << (8 * b);
            }
            *reinterpret_cast<uint32_t *>(&ws[pp * 16 + n][cc * QN_CHUNK + 4 * qd]) = word;
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 32) {
            uint32_t a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int row = wm * 32 + i * 16 + g;
                a[i][0] = lds32(&xs[row][ks + 4 * tq]);
                a[i][1] = lds32(&xs[row + 8][ks + 4 * tq]);
                a[i][2] = lds32(&xs[row][ks + 4 * tq + 16]);
                a[i][3] = lds32(&xs[row + 8][ks + 4 * tq + 16]);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int col = wn * 32 + j * 8 + g;
                b[j][0] = lds32(&ws[col][ks + 4 * tq]);
                b[j][1] = lds32(&ws[col][ks + 4 * tq + 16]);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float *c = acc[i][j];
                    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, "
                                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                                 : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]),
                                   "r"(b[j][1]));
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t row = m0 + wm * 32 + i * 16 + g + (e >= 2 ? 8 : 0);
                const int64_t col = p0 * 16 + wn * 32 + j * 8 + 2 * tq + (e & 1);
                if (row < M && col < w.N) {
                    const float ws_ = load_scale(w.scales, col, w.scale) /* one group: [n_panels][1][16] */;
                    store_y(y, ydt, row * ldy + col, acc[i][j][e] * xscale[row] * ws_);
                }
            }
#endif
}

/* ---- launchers ---- */

struct Call {
    void *y;
    int ydt;
    int64_t ldy;
    QW w;
    const Lut *lut;
    const void *x;
    int xdt;
    int64_t ldx, M;
    float *xscale;
    cudaStream_t stream;
};

qn_status launch_status(const char *kernel, const Call &c, cudaStream_t stream) {
    static const char *dts[] = {"float32", "float16", "bfloat16"};
    char name[128];
    snprintf(name, sizeof name, "%s (%d-bit weights, x %s, M=%lld)", kernel, c.w.bits, dts[c.xdt],
             static_cast<long long>(c.M));
    return qn_cuda_launch_status(name, stream);
}

template <int BITS, typename XT, int MB>
qn_status gemv_launch(const Call &c, const XT *x, void *y, int m) {
    const bool xvec = reinterpret_cast<uintptr_t>(c.x) % 16 == 0 && (c.ldx * sizeof(XT)) % 16 == 0;
    qn_qgemv_kernel<BITS, XT, MB><<<c.w.n_panels, GEMV_WARPS * 32, 0, c.stream>>>(y, c.ydt, c.ldy, c.w, *c.lut, x,
                                                                                  c.ldx, m, xvec);
    return launch_status("qn_qgemv_kernel", c, c.stream);
}

template <int BITS, typename XT>
qn_status gemv(const Call &c) {
    const int esize = c.ydt == 0 ? 4 : 2;
    for (int64_t m0 = 0; m0 < c.M; m0 += QN_CUDA_GEMV_MAX_M) {
        const int m = static_cast<int>(c.M - m0 < QN_CUDA_GEMV_MAX_M ? c.M - m0 : QN_CUDA_GEMV_MAX_M);
        const XT *x = static_cast<const XT *>(c.x) + m0 * c.ldx;
        void *y = static_cast<char *>(c.y) + m0 * c.ldy * esize;
        qn_status st;
        if (m == 1) st = gemv_launch<BITS, XT, 1>(c, x, y, m);
        else if (m <= 2) st = gemv_launch<BITS, XT, 2>(c, x, y, m);
        else if (m <= 4) st = gemv_launch<BITS, XT, 4>(c, x, y, m);
        else if (m <= 8) st = gemv_launch<BITS, XT, 8>(c, x, y, m);
        else st = gemv_launch<BITS, XT, 16>(c, x, y, m);
        if (st != QN_OK) return st;
    }
    return QN_OK;
}

template <int BITS, typename XT>
qn_status gemm(const Call &c) {
    /* f16 tiles for f16 x; bf16 (float32's range) for bf16 and float32 x */
    using CT = typename std::conditional<std::is_same<XT, __half>::value, __half, __nv_bfloat16>::type;
    const dim3 grid(static_cast<unsigned>((c.M + BM - 1) / BM), static_cast<unsigned>((c.w.n_panels + 3) / 4));
    qn_qgemm_kernel<BITS, XT, CT><<<grid, GEMM_THREADS, 0, c.stream>>>(c.y, c.ydt, c.ldy, c.w, *c.lut,
                                                                       static_cast<const XT *>(c.x), c.ldx, c.M);
    return launch_status("qn_qgemm_kernel", c, c.stream);
}

template <typename XT>
qn_status gemm_fp8(const Call &c) {
    const XT *x = static_cast<const XT *>(c.x);
    qn_row_absmax_kernel<XT><<<static_cast<unsigned>(c.M), 256, 0, c.stream>>>(c.xscale, x, c.ldx, c.w.K);
    qn_status st = launch_status("qn_row_absmax_kernel", c, c.stream);
    if (st != QN_OK) return st;
    const dim3 grid(static_cast<unsigned>((c.M + BM - 1) / BM), static_cast<unsigned>((c.w.n_panels + 3) / 4));
    qn_qgemm_fp8_kernel<XT><<<grid, GEMM_THREADS, 0, c.stream>>>(c.y, c.ydt, c.ldy, c.w, x, c.ldx, c.M, c.xscale);
    return launch_status("qn_qgemm_fp8_kernel", c, c.stream);
}

template <typename XT>
qn_status run_x(const Call &c, int path) {
    if (path == QN_CUDA_PATH_FP8) return gemm_fp8<XT>(c);
#define QN_BITS_CASE(B) \
    case B: return path == QN_CUDA_PATH_GEMV ? gemv<B, XT>(c) : gemm<B, XT>(c);
    switch (c.w.bits) {
        QN_BITS_CASE(2)
        QN_BITS_CASE(3)
        QN_BITS_CASE(4)
        QN_BITS_CASE(5)
        QN_BITS_CASE(6)
        QN_BITS_CASE(8)
    }
#undef QN_BITS_CASE
    return qn_set_error(QN_EINVAL, "qmatmul (cuda): unsupported bits %d", c.w.bits);
}

bool fp8_native_format(const qn_format *f) {
    return f->kind == QN_LUT && f->lut_kind == QN_LUT_FP8_E4M3 && f->group == 0 &&
           (f->scale == QN_SCALE_F32 || f->scale == QN_SCALE_F16 || f->scale == QN_SCALE_BF16);
}

qn_status check_weight(const qn_qweight *w) {
    const qn_format *f = w->fmt;
    if (!f) return qn_set_error(QN_EINVAL, "qmatmul (cuda): weight has no format");
    if (f->bits != 2 && f->bits != 3 && f->bits != 4 && f->bits != 5 && f->bits != 6 && f->bits != 8)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): bits must be 2, 3, 4, 5, 6 or 8, got %d", f->bits);
    if (w->N <= 0 || w->K <= 0 || w->K > (int64_t)1 << 30 || w->N > (int64_t)1 << 30)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): weight shape (%lld, %lld) out of range",
                            (long long)w->N, (long long)w->K);
    if (!w->codes || !w->scales || (f->offset != QN_OFF_NONE && !w->offsets) ||
        (qn_fmt_nested(f) && !w->supers) || (f->scale == QN_SCALE_NESTED_U6 && f->kind == QN_ASYM && !w->super_mins))
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): weight arrays missing for format");
    if (reinterpret_cast<uintptr_t>(w->codes) % 16)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): weight codes must be 16-byte aligned");
    return QN_OK;
}

}  // namespace

extern "C" int64_t qn_cuda_qmatmul_workspace(const qn_qweight *w, int64_t M) {
    return w && w->fmt && fp8_native_format(w->fmt) && M > QN_CUDA_GEMV_MAX_M ? M * (int64_t)sizeof(float) : 0;
}

extern "C" qn_status qn_cuda_qmatmul_path(const qn_qweight *w, int64_t M, int dev, int *path) {
    int cc;
    qn_status st = qn_cuda_device_arch("qmatmul (cuda)", dev, &cc, NULL);
    if (st != QN_OK) return st;
    if (M <= QN_CUDA_GEMV_MAX_M || cc < 80) *path = QN_CUDA_PATH_GEMV;
    else if (cc >= 89 && fp8_native_format(w->fmt)) *path = QN_CUDA_PATH_FP8;
    else *path = QN_CUDA_PATH_GEMM;
    return QN_OK;
}

extern "C" qn_status qn_cuda_qmatmul(void *y, int ydt, int64_t ldy, const qn_qweight *w, const void *x, int xdt,
                                     int64_t ldx, int64_t M, void *workspace, int path, int dev, void *stream) {
    qn_status st = check_weight(w);
    if (st != QN_OK) return st;
    const qn_format *f = w->fmt;
    if (xdt < 0 || xdt > 2 || ydt < 0 || ydt > 2)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): dtype codes must be 0, 1 or 2, got x %d, y %d", xdt, ydt);
    if (M < 0 || M > INT32_MAX) return qn_set_error(QN_EINVAL, "qmatmul (cuda): M = %lld out of range", (long long)M);
    if (ldx < w->K || ldy < w->N)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): row strides ldx = %lld, ldy = %lld are below K = %lld, N = %lld",
                            (long long)ldx, (long long)ldy, (long long)w->K, (long long)w->N);
    if (M == 0) return QN_OK;
    if (!x || !y) return qn_set_error(QN_EINVAL, "qmatmul (cuda): x and y must not be NULL");
    int cc;
    st = qn_cuda_device_arch("qmatmul (cuda)", dev, &cc, NULL);
    if (st != QN_OK) return st;
    if (path == QN_CUDA_PATH_AUTO) {
        st = qn_cuda_qmatmul_path(w, M, dev, &path);
        if (st != QN_OK) return st;
    }
    if (path == QN_CUDA_PATH_GEMM && cc < 80)
        return qn_set_error(QN_EUNSUPPORTED, "qmatmul (cuda): the tensor-core path needs sm_80+, device %d is sm_%d",
                            dev, cc);
    if (path == QN_CUDA_PATH_FP8) {
        if (cc < 89)
            return qn_set_error(QN_EUNSUPPORTED, "qmatmul (cuda): the FP8 path needs sm_89+, device %d is sm_%d",
                                dev, cc);
        if (!fp8_native_format(f))
            return qn_set_error(QN_EUNSUPPORTED,
                                "qmatmul (cuda): the FP8 path needs fp8_e4m3 weights with one scale per row");
        if (!workspace) return qn_set_error(QN_EINVAL, "qmatmul (cuda): the FP8 path needs a workspace");
    }
    if (path < QN_CUDA_PATH_GEMV || path > QN_CUDA_PATH_FP8)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): unknown path %d", path);

    Call c;
    c.y = y;
    c.ydt = ydt;
    c.ldy = ldy;
    c.x = x;
    c.xdt = xdt;
    c.ldx = ldx;
    c.M = M;
    c.xscale = static_cast<float *>(workspace);
    c.stream = static_cast<cudaStream_t>(stream);
    const int64_t Kp = qn_fmt_kpad(f, w->K);
    c.w.codes = w->codes;
    c.w.scales = w->scales;
    c.w.offsets = w->offsets;
    c.w.supers = reinterpret_cast<const __half *>(w->supers);
    c.w.super_mins = reinterpret_cast<const __half *>(w->super_mins);
    c.w.N = static_cast<int>(w->N);
    c.w.K = static_cast<int>(w->K);
    c.w.n_panels = static_cast<int>(qn_npanels(w->N));
    c.w.n_chunks = static_cast<int>(Kp / QN_CHUNK);
    c.w.group = static_cast<int>(qn_fmt_group(f, w->K));
    c.w.ngroups = static_cast<int>(qn_fmt_ngroups(f, w->K));
    c.w.nsuper = static_cast<int>(Kp / QN_SUPER);
    c.w.bits = f->bits;
    c.w.kind = f->kind;
    c.w.offset = f->offset;
    c.w.scale = f->scale;
    Lut lut;
    for (int i = 0; i < 256; i++) lut.v[i] = f->kind == QN_LUT && i < (1 << f->bits) ? f->lut[i] : 0.0f;
    c.lut = &lut;

    int prev = -1;
    QN_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) QN_CUDA_CHECK(cudaSetDevice(dev));
    if (xdt == 0) st = run_x<float>(c, path);
    else if (xdt == 1) st = run_x<__half>(c, path);
    else st = run_x<__nv_bfloat16>(c, path);
    if (prev != dev) (void)cudaSetDevice(prev);
    return st;
}
