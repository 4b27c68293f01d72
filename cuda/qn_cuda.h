/* qn_cuda.h — the extern "C" API of quanta's CUDA code (built into quanta._cuda by nvcc).
 *
 * Plain C: no CUDA header is needed to include it, so the binding (cuda/py/module.c) compiles
 * with gcc alone. Every entry returns a qn_status; on failure the thread-local message
 * (qn_last_error) names the CUDA call and cudaGetErrorString's text. Nothing here exits,
 * aborts or prints. Queries allocate nothing on a device and launch nothing; the self-test does.
 */
#ifndef QN_CUDA_H
#define QN_CUDA_H

#include <stdint.h>

#include "qn_common.h"
#include "qn_formats.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What one device reports. Fields a driver does not report are 0. */
struct qn_cuda_device {
    char name[256];
    char pci_bus_id[32];           /* "0000:65:00.0" */
    int index;                     /* runtime ordinal (after CUDA_VISIBLE_DEVICES) */
    int major, minor;              /* compute capability */
    int64_t total_mem;             /* bytes of global memory */
    int sm_count;                  /* streaming multiprocessors */
    int max_threads_per_block;
    int max_threads_per_sm;
    int warp_size;
    int64_t smem_per_block;        /* bytes, without opt-in */
    int64_t smem_per_block_optin;  /* bytes, with cudaFuncAttributeMaxDynamicSharedMemorySize */
    int64_t smem_per_sm;           /* bytes */
    int64_t l2_bytes;
    int clock_khz;                 /* peak SM clock */
    int mem_clock_khz;             /* peak memory clock */
    int mem_bus_bits;              /* global memory bus width */
    double mem_bandwidth_gbs;      /* peak: 2 * mem clock * bus width / 8, in GB/s (1e9 B/s) */
    int integrated;                /* shares memory with the host */
};

/* Usable devices into *n (always written). A machine without a driver, with a driver older
 * than the runtime, or with no visible device has *n = 0: the call then returns QN_ECUDA
 * and the message says which, for the caller to show; QN_OK means *n >= 1. */
qn_status qn_cuda_device_count(int *n);

/* Properties of device `dev` (0 <= dev < count): QN_EINVAL when out of range. */
qn_status qn_cuda_device_info(int dev, struct qn_cuda_device *out);

/* Versions as 1000 * major + 10 * minor (13000 for 13.0). The runtime version is the one
 * linked in (static cudart); the driver version is 0 when no driver is installed. */
qn_status qn_cuda_runtime_version(int *v);
qn_status qn_cuda_driver_version(int *v);

/* Virtual architectures the module carries code for, e.g. "800,860,890,900" (from nvcc). */
const char *qn_cuda_built_archs(void);

/* Toolchain check on device `dev`: a tiny kernel writes a known pattern into a device
 * buffer, which is copied back and compared. *arch gets the __CUDA_ARCH__ of the code that
 * ran (900 on an H100 with sm_90 code). Allocates and frees its own 4 KiB buffer; the
 * calling thread's current device is restored afterwards. */
qn_status qn_cuda_selftest(int dev, int *arch);

/* ---- memory: a caching allocator ----
 * Device memory comes from per-device free lists keyed by size class (512 B granules up to
 * 1 MiB, then four classes per power of two); a freed block keeps an event recorded on the
 * stream that last used it, and a later allocation on another stream waits on that event, so
 * reuse never races with kernels still reading the block. cudaMalloc failing empties the
 * device's cache and retries once (then QN_ENOMEM). Thread-safe. Pointers are 256-byte aligned. */
qn_status qn_cuda_alloc(int dev, int64_t nbytes, void *stream, void **ptr);
/* Returns a block from qn_cuda_alloc to the cache; `stream` is the last stream that used it. */
qn_status qn_cuda_release(int dev, void *ptr, void *stream);
/* cudaFree every cached (unused) block of every device; live blocks stay. */
qn_status qn_cuda_empty_cache(void);
/* Bytes held by live blocks and by cached free blocks, over all devices. */
void qn_cuda_memory_stats(int64_t *live, int64_t *cached);

enum qn_copy_kind { QN_COPY_H2D = 0, QN_COPY_D2H = 1, QN_COPY_D2D = 2 };
/* Copies nbytes on `stream` of device dev; host-side copies wait until the stream reaches the
 * copy (host memory may be pageable and freed right after), device-to-device ones do not. */
qn_status qn_cuda_copy(void *dst, const void *src, int64_t nbytes, int kind, int dev, void *stream);
/* Strided device-to-device copy of a 2-D [rows, cols_bytes] region (pitches in bytes). */
qn_status qn_cuda_copy_2d(void *dst, int64_t dpitch, const void *src, int64_t spitch, int64_t cols_bytes,
                          int64_t rows, int dev, void *stream);

/* ---- streams ----
 * A stream handle is a cudaStream_t as an integer: 0 is the legacy default stream of the
 * current device, 1 and 2 are CUDA's cudaStreamLegacy and cudaStreamPerThread. */
qn_status qn_cuda_stream_create(int dev, void **stream);  /* non-blocking, default priority */
qn_status qn_cuda_stream_destroy(int dev, void *stream);
qn_status qn_cuda_stream_synchronize(int dev, void *stream);
/* Makes `waiter` wait (on the device, not the host) for the work queued so far on `on`. */
qn_status qn_cuda_stream_wait(int dev, void *waiter, void *on);
/* The device a pointer lives on; *dev = -1 for host memory CUDA does not know. */
qn_status qn_cuda_pointer_device(const void *ptr, int *dev);

/* ---- quantized matmul ----
 * y[M, N] = x[M, K] @ W[N, K]^T with W in the panel layout of qn_formats.h; w->codes,
 * scales, offsets, supers and super_mins are device pointers (w->fmt a host pointer).
 * x: float32 / float16 / bfloat16 (xdt 0 / 1 / 2), row stride ldx elements; y: same codes
 * (ydt), row stride ldy. Every format of the layout runs. Paths:
 *   GEMV (auto for M <= QN_CUDA_GEMV_AUTO_M, or any M on GPUs below sm_80; forced, M runs
 *     in slices of QN_CUDA_GEMV_MAX_M rows): dequantize in registers, fp32 math, fp32 x;
 *   GEMM (sm_80+): mma.sync m16n8k16 on f16 (x float16) or bf16 (x bfloat16 / float32)
 *     tiles, weights dequantized to that type in shared memory, fp32 accumulation; K split
 *     across blocks (partials in the workspace, summed in order) when M is small;
 *   FP8 (sm_89+, fp8_e4m3 table with one scale per row; only when asked for): x cast to e4m3
 *     with a per-row scale absmax / 448, mma.sync m16n8k32 e4m3, fp32 accumulation.
 * `path` forces one (QN_CUDA_PATH_*; a forced path the GPU cannot run is QN_EUNSUPPORTED).
 * `workspace`: device memory of the bytes qn_cuda_qmatmul_plan gives (may be NULL when 0). */
enum { QN_CUDA_PATH_AUTO = 0, QN_CUDA_PATH_GEMV = 1, QN_CUDA_PATH_GEMM = 2, QN_CUDA_PATH_FP8 = 3,
       QN_CUDA_PATH_FMA = 4 /* float matmul only */ };
#define QN_CUDA_GEMV_MAX_M 16
#define QN_CUDA_GEMV_AUTO_M 4
qn_status qn_cuda_qmatmul(void *y, int ydt, int64_t ldy, const qn_qweight *w, const void *x, int xdt,
                          int64_t ldx, int64_t M, void *workspace, int path, int dev, void *stream);
/* *path: the path asked for (QN_CUDA_PATH_AUTO too) on entry, the one that runs on return;
 * *workspace: the bytes of device memory qn_cuda_qmatmul needs for it (0: none). */
qn_status qn_cuda_qmatmul_plan(const qn_qweight *w, int64_t M, int dev, int *path, int64_t *workspace);

/* ---- float matmul ----
 * y[M, N] = x[M, K] @ w[N, K]^T with fp32 accumulation. x, w: float32 / float16 / bfloat16
 * (codes 0 / 1 / 2 in xdt, wdt; they may differ), row strides ldx, ldw elements; y: the same
 * codes (ydt), row stride ldy. All are device pointers; M >= 0, N >= 1, K >= 1. Paths:
 *   GEMV (M <= QN_CUDA_GEMV_MAX_M; larger M forced runs in slices of that many rows): a warp
 *     per two weight rows streams them with 16-byte loads, x staged in shared memory as fp32,
 *     fp32 FMA;
 *   GEMM (sm_80+, x and w both float16 or both bfloat16): mma.sync m16n8k16 on shared-memory
 *     tiles filled by cp.async, fp32 accumulation; products are exact, sums are the tensor
 *     cores' (see tests/tolerances.py);
 *   FMA (anything else with M > QN_CUDA_GEMV_MAX_M): 64 x 64 shared-memory tiles, fp32 FMA.
 * `path` forces one of QN_CUDA_PATH_GEMV / GEMM / FMA (GEMM where it cannot run: QN_EUNSUPPORTED).
 * No atomics: results are deterministic. */
qn_status qn_cuda_matmul(void *y, int ydt, int64_t ldy, const void *x, int xdt, int64_t ldx, const void *w, int wdt,
                         int64_t ldw, int64_t M, int64_t N, int64_t K, int path, int dev, void *stream);
/* The path QN_CUDA_PATH_AUTO takes for these dtypes and M on device dev. */
qn_status qn_cuda_matmul_path(int xdt, int wdt, int64_t M, int dev, int *path);

#ifdef __cplusplus
}
#endif
#endif /* QN_CUDA_H */
