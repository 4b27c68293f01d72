/* common.cuh — CUDA error handling shared by every .cu file of quanta._cuda.
 *
 * A failed runtime call or kernel launch becomes QN_ECUDA with a thread-local message that
 * names the call (or kernel) and carries cudaGetErrorString's text and the error's name;
 * the binding raises it as RuntimeError. Never exit or abort: after a kernel fault the CUDA
 * context is unusable and every later call reports it, which is the caller's to handle.
 * Build with -DQN_CUDA_DEBUG_SYNC to synchronize after each launch (finds the faulting kernel).
 * Also the one cached device query the kernel launchers use to pick a path (qn_cuda_device_arch).
 */
#ifndef QN_CUDA_COMMON_CUH
#define QN_CUDA_COMMON_CUH

#include <stdio.h>

#include <cuda_runtime.h>

#include "qn_common.h"

#define QN_STR_(...) #__VA_ARGS__
#define QN_STR(...) QN_STR_(__VA_ARGS__)

/* Virtual architectures this translation unit carries code for: "800,860,890,900". */
#ifdef __CUDA_ARCH_LIST__
#define QN_CUDA_ARCH_LIST QN_STR(__CUDA_ARCH_LIST__)
#else
#define QN_CUDA_ARCH_LIST "unknown"
#endif

/* QN_ECUDA with "<what>: <text> (<name>)"; a missing kernel image also says how to rebuild. */
static inline qn_status qn_cuda_status(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return QN_OK;
    if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorUnsupportedPtxVersion)
        return qn_set_error(QN_ECUDA,
                            "%s: %s (%s); quanta._cuda carries code for compute archs %s only: "
                            "rebuild it with QUANTA_CUDA_ARCHS naming this GPU's architecture",
                            what, cudaGetErrorString(e), cudaGetErrorName(e), QN_CUDA_ARCH_LIST);
    return qn_set_error(QN_ECUDA, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/* Return from the enclosing qn_status function when a runtime call fails. */
#define QN_CUDA_CHECK(call)                                                  \
    do {                                                                     \
        cudaError_t qn_e_ = (call);                                          \
        if (qn_e_ != cudaSuccess) return qn_cuda_status(qn_e_, #call);       \
    } while (0)

/* Same, for functions with one cleanup path: set `st` and jump to `label`. */
#define QN_CUDA_CHECK_GOTO(st, call, label)                                  \
    do {                                                                     \
        cudaError_t qn_e_ = (call);                                          \
        if (qn_e_ != cudaSuccess) {                                          \
            (st) = qn_cuda_status(qn_e_, #call);                             \
            goto label;                                                      \
        }                                                                    \
    } while (0)

/* After `kernel<<<...>>>`: a bad launch configuration or a missing kernel image shows up in
 * cudaGetLastError (which also clears it). Faults inside the kernel are asynchronous and
 * surface at the next synchronizing call, unless QN_CUDA_DEBUG_SYNC is defined. */
static inline qn_status qn_cuda_launch_status(const char *kernel, cudaStream_t stream) {
    char what[160];
    cudaError_t e = cudaGetLastError();
#ifdef QN_CUDA_DEBUG_SYNC
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
#else
    (void)stream;
#endif
    if (e == cudaSuccess) return QN_OK;
    snprintf(what, sizeof what, "launch of %s", kernel);
    return qn_cuda_status(e, what);
}

#define QN_CUDA_LAUNCH_CHECK(kernel, stream)                                 \
    do {                                                                     \
        qn_status qn_st_ = qn_cuda_launch_status(#kernel, (stream));         \
        if (qn_st_ != QN_OK) return qn_st_;                                  \
    } while (0)

#define QN_CUDA_LAUNCH_CHECK_GOTO(st, kernel, stream, label)                 \
    do {                                                                     \
        (st) = qn_cuda_launch_status(#kernel, (stream));                     \
        if ((st) != QN_OK) goto label;                                       \
    } while (0)

/* Compute capability (10 * major + minor) into *cc and multiprocessor count into *sm_count
 * (either may be NULL) of device dev, asked once per device and cached (thread-safe). QN_EINVAL
 * names `op` when dev is negative or not below 64. */
qn_status qn_cuda_device_arch(const char *op, int dev, int *cc, int *sm_count);

#endif /* QN_CUDA_COMMON_CUH */
