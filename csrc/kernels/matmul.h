/* matmul.h — float-weight matmul y[M, N] = x[M, K] @ w[N, K]^T, fp32 accumulation.
 *
 * x and w are row-major (k contiguous) in fp32, fp16 or bf16, any combination; y is fp32.
 * Scalar _ref, AVX2 and AVX-512 tile kernels perform the same float operations (the order
 * is defined below), so results are bitwise equal across paths and thread counts. The
 * driver (matmul.c) owns the OpenMP loop over output tiles; tile kernels are single-threaded.
 */
#ifndef QN_MATMUL_H
#define QN_MATMUL_H

#include "../qn_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of x and w (same codes as the binding's QN_DT_F32/F16/BF16). */
enum qn_mm_dtype { QN_MM_F32 = 0, QN_MM_F16 = 1, QN_MM_BF16 = 2 };

/* Summation order, chosen by M alone (never by the ISA or the thread count):
 *   dot  (M <= QN_MM_DOT_MAX_M, decode): y[m, n] is a dot product of two rows. Lane j of a
 *        16-lane partial sum takes k = j, j + 16, ... in order (one fma each), then the lanes
 *        are added as a fixed tree: i + (i+8), i + (i+4), i + (i+2), 0 + 1.
 *   gemm (M > QN_MM_DOT_MAX_M): K is cut into blocks of QN_MM_KC; a block's sum is an fma
 *        chain over its k in order, starting from 0; y[m, n] = ((b_0 + b_1) + b_2) + ...
 * Largest M that takes the dot formulation: up to here streaming w once from memory with
 * several rows of x per pass beats packing it (measured crossover: M = 32 .. 64). */
#define QN_MM_DOT_MAX_M 32
/* GEMM blocking, shared by every ISA: K is walked in blocks of QN_MM_KC (part of the
 * summation order above); a tile holds at most QN_MM_NB columns (a multiple of every ISA's
 * micro-panel width) and QN_MM_MB rows (only speed depends on these two). */
#define QN_MM_KC 256
#define QN_MM_NB 384
#define QN_MM_MB 256
/* Floats of per-thread scratch a GEMM tile needs: one packed micro-panel of w (at most 64
 * columns x QN_MM_KC) and, when x is not fp32, its converted block [QN_MM_MB][QN_MM_KC]. */
#define QN_MM_PANEL_FLOATS ((int64_t)64 * QN_MM_KC)
#define QN_MM_XBLOCK_FLOATS ((int64_t)QN_MM_MB * QN_MM_KC)

/* One tile of output for an inner kernel: rows [0, mr) x columns [0, nr) of the tile. */
typedef struct qn_mm_tile {
    float *y;          /* [mr, nr], row stride ldy */
    int64_t ldy;
    const void *x;     /* [mr, K] in xdtype, row stride ldx (dot tiles: always fp32) */
    int64_t ldx;
    int xdtype;
    const void *w;     /* [nr, K] in wdtype, row stride ldw */
    int64_t ldw;
    int wdtype;
    int64_t mr, nr, K; /* gemm: mr <= QN_MM_MB, nr <= QN_MM_NB */
    float *panel;      /* gemm: QN_MM_PANEL_FLOATS floats, 64-byte aligned */
    float *xblock;     /* gemm with xdtype != fp32: QN_MM_XBLOCK_FLOATS floats, 64-byte aligned */
} qn_mm_tile;

typedef void (*qn_mm_tile_fn)(const qn_mm_tile *t);
/* dst[n] = (float)src[n] for src in dtype (fp32, fp16 or bf16); exact. */
typedef void (*qn_mm_cvt_fn)(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n);

/* Dot formulation: y[m, n] = sum_k x[m, k] * w[n, k] for m < mr, n < nr (x in fp32). */
void qn_matmul_dot_ref(const qn_mm_tile *t);
void qn_matmul_dot_avx2(const qn_mm_tile *t);
void qn_matmul_dot_avx512(const qn_mm_tile *t);

/* GEMM formulation over one tile: packs w into t->panel per K block, converts x into
 * t->xblock when it is not fp32, and runs register-blocked micro-kernels. */
void qn_matmul_gemm_ref(const qn_mm_tile *t);
void qn_matmul_gemm_avx2(const qn_mm_tile *t);
void qn_matmul_gemm_avx512(const qn_mm_tile *t);

void qn_matmul_cvt_ref(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n);
void qn_matmul_cvt_avx2(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n);
void qn_matmul_cvt_avx512(float *QN_RESTRICT dst, const void *QN_RESTRICT src, int dtype, int64_t n);

/* Bytes of workspace qn_matmul needs for these sizes with nthreads threads. */
int64_t qn_matmul_workspace_size(int64_t M, int64_t N, int64_t K, int xdtype, int wdtype, int nthreads);

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx, xdtype) @ w[N, K]^T (row stride ldw,
 * wdtype), fp32 accumulation. Strides are in elements of each array's own type.
 * M may be 0; N and K must be positive. workspace: at least qn_matmul_workspace_size()
 * bytes for omp_get_max_threads() threads. y must not overlap x or w. */
qn_status qn_matmul(float *QN_RESTRICT y, const void *x, int xdtype, const void *w, int wdtype,
                    int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldw, int64_t ldy,
                    void *workspace, int64_t ws_bytes);

#ifdef __cplusplus
}
#endif
#endif
