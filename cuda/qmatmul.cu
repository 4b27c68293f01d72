/* qmatmul.cu — quantized matmul on the GPU: y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * W is in the panel layout of csrc/qn_formats.h (the CPU's bytes, copied as they are): per
 * panel of 16 rows and chunk of 32 inputs, bit planes of 4-input "quads". One lane of a warp
 * decodes rows 4t..4t+3 x inputs 8v..8v+7 of a chunk with one 128-bit load per plane, which is
 * the unit both kernels below build on.
 *   qn_qgemv_kernel     M <= 4 by default. One block of 8 warps per panel; the warps split K,
 *                       each lane issues the loads of 4 chunks together, dequantizes in
 *                       registers and accumulates MB rows of x in fp32; warp shuffles, then
 *                       shared memory, reduce. Weight bytes are read once.
 *   qn_qgemm_kernel     sm_80+, larger M. 16- or 64-row output tiles x 64 weight rows, K in
 *                       steps of 64, double-buffered: the next step's x and code planes are
 *                       loaded into registers while mma.sync m16n8k16 (fp32 accumulators) runs
 *                       on this one, then converted / dequantized to f16 or bf16 in shared
 *                       memory. Few tiles: K is split across blocks, partials summed in order.
 *   qn_qgemm_fp8_kernel sm_89+, only when asked for (path "fp8"): fp8_e4m3 weights with one
 *                       scale per row are e4m3 codes already; x is cast to e4m3 with a per-row
 *                       scale (absmax / 448, from qn_row_absmax_kernel) and mma.sync m16n8k32
 *                       e4m3 runs on both.
 * Threading: blocks over panels (GEMV) or output tiles and K splits (GEMM); no atomics, so
 * results are deterministic. Every launch is checked and reported by kernel name. The GEMV and
 * GEMM kernels live in qmatmul_kernels.cuh, compiled once per bit width (qmatmul_b<BITS>.cu).
 */
#include "qmatmul.cuh"

namespace qn_qmm {

extern template qn_status run_bits<2>(const Call &, int);
extern template qn_status run_bits<3>(const Call &, int);
extern template qn_status run_bits<4>(const Call &, int);
extern template qn_status run_bits<5>(const Call &, int);
extern template qn_status run_bits<6>(const Call &, int);
extern template qn_status run_bits<8>(const Call &, int);

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
    zero_tiles(acc);

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
    for_each_acc(acc, m0 + wm * 32, p0 * 16 + wn * 32, g, tq, [&](int64_t row, int64_t col, float v) {
        if (row < M && col < w.N) {
            const float ws_ = load_scale(w.scales, col, w.scale) /* one group: [n_panels][1][16] */;
            store_y(y, ydt, row * ldy + col, v * xscale[row] * ws_);
        }
    });
#endif
}

/* ---- launchers ---- */

bool fp8_native_format(const qn_format *f) {
    return f->kind == QN_LUT && f->lut_kind == QN_LUT_FP8_E4M3 && f->group == 0 &&
           (f->scale == QN_SCALE_F32 || f->scale == QN_SCALE_F16 || f->scale == QN_SCALE_BF16);
}

/* `path` is the one asked for (AUTO picks). GEMM: 16-row tiles up to M = 16, else 64; when the
 * tiles number fewer than two per multiprocessor, K is split (each split keeps >= 4 steps of
 * 64 inputs) and the fp32 partials go to the workspace. */
qn_status make_plan(const qn_qweight *w, int64_t M, int dev, int path, Plan &pl) {
    int cc, sms;
    qn_status st = qn_cuda_device_arch("qmatmul (cuda)", dev, &cc, &sms);
    if (st != QN_OK) return st;
    const qn_format *f = w->fmt;
    if (path == QN_CUDA_PATH_AUTO) {
        /* The FP8 kernel is only ever asked for: measured on an H100 (bench_qmatmul --device
         * cuda) it is slower than dequantizing e4m3 to f16 for the GEMM at every M. */
        path = M <= QN_CUDA_GEMV_AUTO_M || cc < 80 ? QN_CUDA_PATH_GEMV : QN_CUDA_PATH_GEMM;
    }
    pl.path = path;
    pl.tm = M <= 16 ? 16 : 64;
    pl.splits = 1;
    const int n_chunks = static_cast<int>(qn_fmt_kpad(f, w->K) / QN_CHUNK);
    pl.split_chunks = n_chunks;
    pl.workspace = 0;
    if (path == QN_CUDA_PATH_FP8) {
        pl.workspace = M * static_cast<int64_t>(sizeof(float));
    } else if (path == QN_CUDA_PATH_GEMM) {
        const int64_t tiles = (M + pl.tm - 1) / pl.tm * ((qn_npanels(w->N) + 3) / 4);
        const int64_t want = tiles >= 2 * sms ? 1 : (2 * sms + tiles - 1) / tiles;
        const int most = n_chunks / 8 > 1 ? n_chunks / 8 : 1;
        int splits = static_cast<int>(want < most ? want : most);
        if (splits > 1) {
            int per = (n_chunks + splits - 1) / splits;
            per += per & 1; /* whole steps of two chunks */
            pl.split_chunks = per;
            pl.splits = (n_chunks + per - 1) / per;
            if (pl.splits > 1) pl.workspace = pl.splits * M * w->N * static_cast<int64_t>(sizeof(float));
            else pl.split_chunks = n_chunks;
        }
    }
    return QN_OK;
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
    switch (c.w.bits) {
        case 2: return run_bits<2>(c, path);
        case 3: return run_bits<3>(c, path);
        case 4: return run_bits<4>(c, path);
        case 5: return run_bits<5>(c, path);
        case 6: return run_bits<6>(c, path);
        case 8: return run_bits<8>(c, path);
    }
    return qn_set_error(QN_EINVAL, "qmatmul (cuda): unsupported bits %d", c.w.bits);
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

}  // namespace qn_qmm

using namespace qn_qmm;

extern "C" qn_status qn_cuda_qmatmul_plan(const qn_qweight *w, int64_t M, int dev, int *path, int64_t *workspace) {
    if (!w || !w->fmt) return qn_set_error(QN_EINVAL, "qmatmul (cuda): weight has no format");
    Plan pl;
    qn_status st = make_plan(w, M, dev, *path, pl);
    if (st != QN_OK) return st;
    *path = pl.path;
    *workspace = pl.workspace;
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
    if (path < QN_CUDA_PATH_AUTO || path > QN_CUDA_PATH_FP8)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): unknown path %d", path);
    int cc;
    st = qn_cuda_device_arch("qmatmul (cuda)", dev, &cc, NULL);
    if (st != QN_OK) return st;
    Plan plan;
    st = make_plan(w, M, dev, path, plan);
    if (st != QN_OK) return st;
    path = plan.path;
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
    }
    if (plan.workspace && !workspace)
        return qn_set_error(QN_EINVAL, "qmatmul (cuda): this call needs a workspace of %lld bytes",
                            (long long)plan.workspace);
    Call c;
    c.y = y;
    c.ydt = ydt;
    c.ldy = ldy;
    c.x = x;
    c.xdt = xdt;
    c.ldx = ldx;
    c.M = M;
    c.xscale = path == QN_CUDA_PATH_FP8 ? static_cast<float *>(workspace) : nullptr;
    c.part = path == QN_CUDA_PATH_GEMM ? static_cast<float *>(workspace) : nullptr;
    c.plan = plan;
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
    c.w.gshift = -1;
    for (int sh = 0; sh < 31; sh++)
        if (c.w.group == 1 << sh) c.w.gshift = sh;
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
