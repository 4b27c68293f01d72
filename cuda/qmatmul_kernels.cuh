/* qmatmul_kernels.cuh — the GEMV and tensor-core GEMM kernels of quantized matmul and their
 * launchers, templated on the weight's bit width (see qmatmul.cu for the design). Included by
 * qmatmul_b<BITS>.cu alone, each instantiating run_bits<BITS>.
 */
#ifndef QN_CUDA_QMATMUL_KERNELS_CUH
#define QN_CUDA_QMATMUL_KERNELS_CUH

#include "qmatmul.cuh"

namespace qn_qmm {

/* Four consecutive values of a scale array (fp32 / f16 / bf16) from index i0 (a multiple of 4:
 * one 16- or 8-byte load). */
__device__ __forceinline__ void load_scale4(const void *p, int64_t i0, int scale, float out[4]) {
    if (scale == QN_SCALE_F32) {
        const float4 v = __ldg(reinterpret_cast<const float4 *>(static_cast<const float *>(p) + i0));
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
        return;
    }
    const uint2 u = __ldg(reinterpret_cast<const uint2 *>(static_cast<const uint16_t *>(p) + i0));
    const uint32_t h[4] = {u.x & 0xFFFF, u.x >> 16, u.y & 0xFFFF, u.y >> 16};
#pragma unroll
    for (int r = 0; r < 4; r++) {
        if (scale == QN_SCALE_F16) {
            const __half v = __ushort_as_half(static_cast<unsigned short>(h[r]));
            out[r] = __half2float(v);
        } else {
            out[r] = __uint_as_float(h[r] << 16); /* bf16 */
        }
    }
}

/* Four bytes of an 8-bit array from index i0 (a multiple of 4), as floats; `sign`: int8. */
__device__ __forceinline__ void load_bytes4(const void *p, int64_t i0, bool sign, float out[4]) {
    const uint32_t u = __ldg(reinterpret_cast<const uint32_t *>(static_cast<const uint8_t *>(p) + i0));
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const uint32_t b = (u >> (8 * r)) & 0xFF;
        out[r] = sign ? static_cast<float>(static_cast<int8_t>(b)) : static_cast<float>(b);
    }
}

/* (s, m) of rows 4t..4t+3 of panel p for input k: w = s * q + m (int kinds) or s * lut[q]
 * (m = 0). The four rows sit side by side in every parameter array, so each array is one load. */
__device__ __forceinline__ void group_params4(const QW &w, int64_t p, int t, int k, float s[4], float m[4]) {
    const int gi = w.ngroups == 1 ? 0 : w.gshift >= 0 ? k >> w.gshift : k / w.group;
    const int64_t i0 = (p * w.ngroups + gi) * 16 + 4 * t;
    if (w.scale == QN_SCALE_NESTED_U6 || w.scale == QN_SCALE_NESTED_I8) {
        const int64_t si0 = (p * w.nsuper + k / QN_SUPER) * 16 + 4 * t;
        float d[4], sub[4];
        load_scale4(w.supers, si0, QN_SCALE_F16, d);
        load_bytes4(w.scales, i0, w.scale == QN_SCALE_NESTED_I8, sub);
#pragma unroll
        for (int r = 0; r < 4; r++) s[r] = d[r] * sub[r];
        if (w.kind == QN_ASYM) {
            float dmin[4], off[4];
            load_scale4(w.super_mins, si0, QN_SCALE_F16, dmin);
            load_bytes4(w.offsets, i0, false, off);
#pragma unroll
            for (int r = 0; r < 4; r++) m[r] = -(dmin[r] * off[r]);
        } else {
#pragma unroll
            for (int r = 0; r < 4; r++) m[r] = -s[r] * static_cast<float>(1 << (w.bits - 1));
        }
        return;
    }
    load_scale4(w.scales, i0, w.scale, s);
    if (w.kind == QN_LUT) {
#pragma unroll
        for (int r = 0; r < 4; r++) m[r] = 0.0f;
    } else if (w.kind == QN_SYM) {
#pragma unroll
        for (int r = 0; r < 4; r++) m[r] = -s[r] * static_cast<float>(1 << (w.bits - 1));
    } else if (w.offset == QN_OFF_ZERO) {
        float z[4];
        load_bytes4(w.offsets, i0, false, z);
#pragma unroll
        for (int r = 0; r < 4; r++) m[r] = -s[r] * z[r];
    } else {
        load_scale4(w.offsets, i0, w.scale, m);
    }
}

/* An unsigned code below 2^23 as a float: or-ing it into 2^23's mantissa and subtracting 2^23
 * is exact and cheaper than an integer conversion. */
__device__ __forceinline__ float code_f32(uint32_t q) { return __uint_as_float(0x4B000000u | q) - 8388608.0f; }

__device__ __forceinline__ uint4 load16(const uint8_t *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

/* The bit planes one lane reads of a chunk (at most two 128-bit loads), kept apart from their
 * decoding so a kernel can issue the loads of its next step before it computes this one. */
struct Codes {
    uint4 u[2];
};

/* Byte offset of each bit plane in a chunk (-1: absent) and its slot in Codes::u. */
__host__ __device__ constexpr int plane_nib(int bits) { return bits >= 4 && bits < 8 ? 0 : -1; }
__host__ __device__ constexpr int plane_crumb(int bits) { return bits == 6 ? 256 : (bits == 2 || bits == 3) ? 0 : -1; }
__host__ __device__ constexpr int plane_bit(int bits) { return bits == 5 ? 256 : bits == 3 ? 128 : -1; }
__host__ __device__ constexpr int slot_crumb(int bits) { return plane_nib(bits) >= 0 ? 1 : 0; }
__host__ __device__ constexpr int slot_bit(int bits) { return (plane_nib(bits) >= 0) + (plane_crumb(bits) >= 0); }

/* Loads of rows 4t..4t+3, inputs 8v..8v+7 of one chunk. Plane offsets follow qn_fmt_planes();
 * a plane's 32-bit word for row n sits at 16t + 4(n%4) of its 64-byte quad, byte j holding
 * input 4 * quad + j. */
template <int BITS>
__device__ __forceinline__ void load_codes(const uint8_t *chunk, int v, int t, Codes &cr) {
    if constexpr (BITS == 8) {
        cr.u[0] = load16(chunk + 64 * (2 * v) + 16 * t);
        cr.u[1] = load16(chunk + 64 * (2 * v + 1) + 16 * t);
    } else {
        if constexpr (plane_nib(BITS) >= 0) cr.u[0] = load16(chunk + plane_nib(BITS) + 64 * v + 16 * t);
        if constexpr (plane_crumb(BITS) >= 0)
            cr.u[slot_crumb(BITS)] = load16(chunk + plane_crumb(BITS) + 64 * (v >> 1) + 16 * t);
        if constexpr (plane_bit(BITS) >= 0) cr.u[slot_bit(BITS)] = load16(chunk + plane_bit(BITS) + 16 * t);
    }
}

/* q[r][i]: the code of row 4t+r, input 8v+i, from what load_codes read. */
template <int BITS>
__device__ __forceinline__ void decode_raw(const Codes &cr, int v, uint32_t q[4][8]) {
    if constexpr (BITS == 8) {
        const uint32_t wa[4] = {cr.u[0].x, cr.u[0].y, cr.u[0].z, cr.u[0].w};
        const uint32_t wb[4] = {cr.u[1].x, cr.u[1].y, cr.u[1].z, cr.u[1].w};
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                q[r][j] = (wa[r] >> (8 * j)) & 0xFF;
                q[r][4 + j] = (wb[r] >> (8 * j)) & 0xFF;
            }
    } else {
        uint32_t nib[4] = {0, 0, 0, 0}, crumb[4] = {0, 0, 0, 0}, bit[4] = {0, 0, 0, 0};
        if constexpr (plane_nib(BITS) >= 0) {
            nib[0] = cr.u[0].x; nib[1] = cr.u[0].y; nib[2] = cr.u[0].z; nib[3] = cr.u[0].w;
        }
        if constexpr (plane_crumb(BITS) >= 0) {
            const uint4 u = cr.u[slot_crumb(BITS)];
            crumb[0] = u.x; crumb[1] = u.y; crumb[2] = u.z; crumb[3] = u.w;
        }
        if constexpr (plane_bit(BITS) >= 0) {
            const uint4 u = cr.u[slot_bit(BITS)];
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

    /* one chunk's share: sum_i (s q_i + m) x_i = s * sum q_i x_i + m * sum x_i per row */
    auto accumulate = [&](const Codes &cr, const float s[4], const float m[4], int c) {
        uint32_t q[4][8];
        decode_raw<BITS>(cr, v, q);
        const int k0 = c * QN_CHUNK + 8 * v;
        float wq[4][8];
        if (w.kind == QN_LUT) { /* uniform: one branch a chunk, not a select per weight */
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int i = 0; i < 8; i++) wq[r][i] = s_lut[q[r][i]];
        } else {
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int i = 0; i < 8; i++) wq[r][i] = code_f32(q[r][i]);
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
                acc[r][mm] += fmaf(s[r], d, m[r] * xs);
            }
        }
    };
    auto fetch = [&](int c, Codes &cr, float s[4], float m[4]) {
        load_codes<BITS>(w.codes + (p * w.n_chunks + c) * (64 * BITS), v, t, cr);
        group_params4(w, p, t, c * QN_CHUNK + 8 * v, s, m);
    };
    /* GEMV_UNROLL chunks' loads in flight per lane before any of them is used */
    constexpr int STRIDE = 2 * GEMV_WARPS;
    int c = 2 * warp + cpar;
    for (; c + (GEMV_UNROLL - 1) * STRIDE < w.n_chunks; c += GEMV_UNROLL * STRIDE) {
        Codes cr[GEMV_UNROLL];
        float s[GEMV_UNROLL][4], m[GEMV_UNROLL][4];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) fetch(c + u * STRIDE, cr[u], s[u], m[u]);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) accumulate(cr[u], s[u], m[u], c + u * STRIDE);
    }
    for (; c < w.n_chunks; c += STRIDE) {
        Codes cr;
        float s[4], m[4];
        fetch(c, cr, s, m);
        accumulate(cr, s, m, c);
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

/* Output tile x rows m0 .. m0+TM-1 (TM = 16 or 64) x weight rows 16*p0 .. 16*p0+63 (4 panels),
 * over chunks [c_begin, c_end) of K (blockIdx.z's split; one split unless the tiles alone
 * would leave the GPU idle). 4 warps: 2x2 of 32x32 (TM = 64) or 1x4 of 16x16 (TM = 16).
 * Per step of 64 inputs, double-buffered in shared memory ([row][k], rows padded by 8
 * elements so fragment loads hit distinct banks): the loads of step s+1 (x rows, weight code
 * planes, group parameters) are issued into registers, the mma.sync of step s runs, then
 * step s+1 is converted (x) or dequantized (W) to f16/bf16 into the other buffer: one barrier
 * a step. Fragments (PTX m16n8k16): a = x[g | g+8][2tq .. 2tq+1 | +8], b = W[col g][2tq ..
 * 2tq+1 | +8], c = y[g | g+8][2tq .. 2tq+1], g = lane / 4, tq = lane % 4. With several splits
 * each writes its fp32 partial tile to part[z] and qn_splitk_reduce_kernel sums them in order. */
template <int BITS, typename XT, typename CT, int TM>
static __global__ void __launch_bounds__(GEMM_THREADS)
    qn_qgemm_kernel(void *y, int ydt, int64_t ldy, QW w, Lut lut, const XT *x, int64_t ldx, int64_t M, bool xvec,
                    int split_chunks, float *part /* [gridDim.z][M][N] when gridDim.z > 1 */) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int LDS = BK + 8;
    constexpr int WGM = TM == 64 ? 2 : 1, WGN = 4 / WGM; /* warp grid */
    constexpr int WTM = TM / WGM, WTN = BN / WGN;        /* warp tile */
    constexpr int MI = WTM / 16, NJ = WTN / 8;
    constexpr int XU = TM * BK / 8 / GEMM_THREADS;       /* 8-input x pieces per thread */
    static_assert(TM == 16 || TM == 64, "tile rows");
    __shared__ __align__(16) CT xs[2][TM][LDS];
    __shared__ __align__(16) CT ws[2][BN][LDS];
    __shared__ float s_lut[256];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / WGN, wn = warp % WGN, g = lane >> 2, tq = lane & 3;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TM;
    const int64_t p0 = static_cast<int64_t>(blockIdx.y) * (BN / 16);
    const int c_begin = static_cast<int>(blockIdx.z) * split_chunks;
    const int c_end = min(c_begin + split_chunks, w.n_chunks);
    /* dequantizing role: panel p0 + dp, chunk parity dc, (dv, dt) as in the GEMV */
    const int dp = tid / 32, dc = lane >> 4, dv = (lane >> 2) & 3, dt = lane & 3;
    const int64_t wp = p0 + dp;
    if (w.kind == QN_LUT)
        for (int i = tid; i < (1 << BITS); i += GEMM_THREADS) s_lut[i] = lut.v[i];

    float acc[MI][NJ][4];
    zero_tiles(acc);

    float xv[XU][8];
    Codes cr;
    float ps[4], pm[4];
    bool wvalid = false;
    auto fetch = [&](int kc) {
#pragma unroll
        for (int u = 0; u < XU; u++) {
            const int e = tid + u * GEMM_THREADS, r = e / (BK / 8), c8 = e % (BK / 8);
            if (m0 + r < M)
                load_x8<XT>(x + (m0 + r) * ldx, kc * QN_CHUNK + 8 * c8, w.K, xvec, xv[u]);
            else
#pragma unroll
                for (int i = 0; i < 8; i++) xv[u][i] = 0.0f;
        }
        const int c = kc + dc;
        wvalid = wp < w.n_panels && c < c_end;
        if (wvalid) {
            load_codes<BITS>(w.codes + (wp * w.n_chunks + c) * (64 * BITS), dv, dt, cr);
            group_params4(w, wp, dt, c * QN_CHUNK + 8 * dv, ps, pm);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int u = 0; u < XU; u++) {
            const int e = tid + u * GEMM_THREADS, r = e / (BK / 8), c8 = e % (BK / 8);
            __align__(16) CT packed[8];
#pragma unroll
            for (int i = 0; i < 8; i++) packed[i] = from_f32<CT>(xv[u][i]);
            *reinterpret_cast<uint4 *>(&xs[buf][r][8 * c8]) = *reinterpret_cast<const uint4 *>(packed);
        }
        __align__(16) CT packed[4][8];
        if (!wvalid) {
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int i = 0; i < 8; i++) packed[r][i] = from_f32<CT>(0.0f);
        } else {
            uint32_t q[4][8];
            decode_raw<BITS>(cr, dv, q);
            if (w.kind == QN_LUT) {
#pragma unroll
                for (int r = 0; r < 4; r++)
#pragma unroll
                    for (int i = 0; i < 8; i++) packed[r][i] = from_f32<CT>(ps[r] * s_lut[q[r][i]]);
            } else {
#pragma unroll
                for (int r = 0; r < 4; r++)
#pragma unroll
                    for (int i = 0; i < 8; i++) packed[r][i] = from_f32<CT>(fmaf(ps[r], code_f32(q[r][i]), pm[r]));
            }
        }
#pragma unroll
        for (int r = 0; r < 4; r++)
            *reinterpret_cast<uint4 *>(&ws[buf][dp * 16 + 4 * dt + r][dc * QN_CHUNK + 8 * dv]) =
                *reinterpret_cast<const uint4 *>(packed[r]);
    };

    __syncthreads(); /* s_lut */
    fetch(c_begin);
    store(0);
    __syncthreads();
    int buf = 0;
    for (int kc = c_begin; kc < c_end; kc += BK / QN_CHUNK, buf ^= 1) {
        const bool more = kc + BK / QN_CHUNK < c_end;
        if (more) fetch(kc + BK / QN_CHUNK);
        warp_mma_tile<CT, MI, NJ, BK, LDS>(acc, xs[buf], ws[buf], wm * WTM, wn * WTN, g, tq);
        if (more) store(buf ^ 1);
        __syncthreads();
    }
    float *pz = gridDim.z > 1 ? part + static_cast<int64_t>(blockIdx.z) * M * w.N : nullptr;
    const int64_t row0 = m0 + wm * WTM, col0 = p0 * 16 + wn * WTN;
    if (pz)
        for_each_acc(acc, row0, col0, g, tq, [&](int64_t row, int64_t col, float v) {
            if (row < M && col < w.N) pz[row * w.N + col] = v;
        });
    else
        for_each_acc(acc, row0, col0, g, tq, [&](int64_t row, int64_t col, float v) {
            if (row < M && col < w.N) store_y(y, ydt, row * ldy + col, v);
        });
#endif
}

/* y[m, n] = sum over splits z = 0, 1, ... of part[z][m][n], in that order (deterministic). */
static __global__ void qn_splitk_reduce_kernel(void *y, int ydt, int64_t ldy, const float *part, int64_t M, int N,
                                               int splits) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    float sum = 0.0f;
    for (int z = 0; z < splits; z++) sum += part[z * M * N + i];
    store_y(y, ydt, (i / N) * ldy + i % N, sum);
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

template <int BITS, typename XT, int TM>
qn_status gemm_launch(const Call &c) {
    /* f16 tiles for f16 x; bf16 (float32's range) for bf16 and float32 x */
    using CT = typename std::conditional<std::is_same<XT, __half>::value, __half, __nv_bfloat16>::type;
    const bool xvec = reinterpret_cast<uintptr_t>(c.x) % 16 == 0 && (c.ldx * sizeof(XT)) % 16 == 0;
    const dim3 grid(static_cast<unsigned>((c.M + TM - 1) / TM), static_cast<unsigned>((c.w.n_panels + 3) / 4),
                    static_cast<unsigned>(c.plan.splits));
    qn_qgemm_kernel<BITS, XT, CT, TM><<<grid, GEMM_THREADS, 0, c.stream>>>(
        c.y, c.ydt, c.ldy, c.w, *c.lut, static_cast<const XT *>(c.x), c.ldx, c.M, xvec, c.plan.split_chunks,
        c.part);
    qn_status st = launch_status("qn_qgemm_kernel", c, c.stream);
    if (st != QN_OK || c.plan.splits == 1) return st;
    const int64_t n = c.M * c.w.N;
    qn_splitk_reduce_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, c.stream>>>(c.y, c.ydt, c.ldy, c.part,
                                                                                        c.M, c.w.N, c.plan.splits);
    return launch_status("qn_splitk_reduce_kernel", c, c.stream);
}

template <int BITS, typename XT>
qn_status gemm(const Call &c) {
    return c.plan.tm == 16 ? gemm_launch<BITS, XT, 16>(c) : gemm_launch<BITS, XT, 64>(c);
}

/* The GEMV or GEMM path for BITS-bit weights, dispatched on x's dtype. */
template <int BITS>
qn_status run_bits(const Call &c, int path) {
    if (c.xdt == 0) return path == QN_CUDA_PATH_GEMV ? gemv<BITS, float>(c) : gemm<BITS, float>(c);
    if (c.xdt == 1) return path == QN_CUDA_PATH_GEMV ? gemv<BITS, __half>(c) : gemm<BITS, __half>(c);
    return path == QN_CUDA_PATH_GEMV ? gemv<BITS, __nv_bfloat16>(c) : gemm<BITS, __nv_bfloat16>(c);
}

}  // namespace qn_qmm

#define QN_QMM_INSTANTIATE(BITS) template qn_status qn_qmm::run_bits<BITS>(const qn_qmm::Call &, int);

#endif /* QN_CUDA_QMATMUL_KERNELS_CUH */
