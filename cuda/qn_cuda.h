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

#ifdef __cplusplus
}
#endif
#endif /* QN_CUDA_H */
