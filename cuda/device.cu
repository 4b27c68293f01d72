/* device.cu — device discovery, versions, the cached compute capability and SM count the
 * kernel launchers pick paths by, and a toolchain self-test for quanta._cuda.
 *
 * Discovery goes through the statically linked runtime (cudart), which loads the driver
 * (libcuda.so.1) on first use: without a driver or device every entry returns a status and
 * a message saying which, never a crash. The self-test launches one `static __global__`
 * kernel that writes i * 7 + seed into out[i] for i < n (n not a multiple of the block) and
 * __CUDA_ARCH__ into out[n], then copies it back and compares.
 */
#include <string.h>

#include <atomic>

#include "common.cuh"
#include "qn_cuda.h"

/* ---- discovery ---- */

extern "C" qn_status qn_cuda_runtime_version(int *v) {
    *v = 0;
    QN_CUDA_CHECK(cudaRuntimeGetVersion(v));
    return QN_OK;
}

extern "C" qn_status qn_cuda_driver_version(int *v) {
    *v = 0;
    QN_CUDA_CHECK(cudaDriverGetVersion(v));
    return QN_OK;
}

extern "C" const char *qn_cuda_built_archs(void) { return QN_CUDA_ARCH_LIST; }

extern "C" qn_status qn_cuda_device_count(int *n) {
    int count = 0;
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaSuccess && count > 0) {
        *n = count;
        return QN_OK;
    }
    (void)cudaGetLastError(); /* do not leave the failure for the next launch check */
    if (e == cudaSuccess || e == cudaErrorNoDevice)
        return qn_set_error(QN_ECUDA, "no CUDA device is visible (cudaGetDeviceCount: %s)",
                            e == cudaSuccess ? "0 devices" : cudaGetErrorName(e));
    if (e == cudaErrorInsufficientDriver) {
        /* The same error means "no driver at all" and "a driver too old for this runtime". */
        int drv = 0, rt = 0;
        (void)cudaDriverGetVersion(&drv);
        (void)cudaRuntimeGetVersion(&rt);
        if (drv == 0)
            return qn_set_error(QN_ECUDA, "no NVIDIA driver was found: libcuda.so.1 could not be "
                                          "loaded (cudaGetDeviceCount: cudaErrorInsufficientDriver)");
        return qn_set_error(QN_ECUDA,
                            "the NVIDIA driver supports CUDA %d.%d but quanta._cuda was built with CUDA "
                            "%d.%d: update the driver, or rebuild quanta with an older CUDA toolkit "
                            "(cudaGetDeviceCount: cudaErrorInsufficientDriver)",
                            drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
    }
    return qn_set_error(QN_ECUDA, "CUDA cannot be initialized: cudaGetDeviceCount: %s (%s)",
                        cudaGetErrorString(e), cudaGetErrorName(e));
}

/* An attribute the driver may not report (memory clock on some boards): 0 when it does not. */
static int qn_cuda_attr(cudaDeviceAttr attr, int dev) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        v = 0;
    }
    return v;
}

static qn_status qn_cuda_check_device(const char *op, int dev) {
    int n;
    qn_status st = qn_cuda_device_count(&n);
    if (st != QN_OK) return st;
    if (dev < 0 || dev >= n)
        return qn_set_error(QN_EINVAL, "%s: device %d is out of range: %d device%s visible", op, dev,
                            n, n == 1 ? " is" : "s are");
    return QN_OK;
}

extern "C" qn_status qn_cuda_device_info(int dev, struct qn_cuda_device *out) {
    qn_status st = qn_cuda_check_device("device_info", dev);
    if (st != QN_OK) return st;
    cudaDeviceProp p;
    QN_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
    memset(out, 0, sizeof *out);
    memcpy(out->name, p.name, sizeof out->name - 1);
    QN_CUDA_CHECK(cudaDeviceGetPCIBusId(out->pci_bus_id, (int)sizeof out->pci_bus_id, dev));
    out->index = dev;
    out->major = p.major;
    out->minor = p.minor;
    out->total_mem = (int64_t)p.totalGlobalMem;
    out->sm_count = p.multiProcessorCount;
    out->max_threads_per_block = p.maxThreadsPerBlock;
    out->max_threads_per_sm = p.maxThreadsPerMultiProcessor;
    out->warp_size = p.warpSize;
    out->smem_per_block = (int64_t)p.sharedMemPerBlock;
    out->smem_per_block_optin = (int64_t)p.sharedMemPerBlockOptin;
    out->smem_per_sm = (int64_t)p.sharedMemPerMultiprocessor;
    out->l2_bytes = p.l2CacheSize;
    out->integrated = p.integrated;
    /* CUDA 13 removed clockRate and memoryClockRate from cudaDeviceProp; the attributes stay. */
    out->clock_khz = qn_cuda_attr(cudaDevAttrClockRate, dev);
    out->mem_clock_khz = qn_cuda_attr(cudaDevAttrMemoryClockRate, dev);
    out->mem_bus_bits = qn_cuda_attr(cudaDevAttrGlobalMemoryBusWidth, dev);
    /* double data rate: two transfers per memory clock */
    out->mem_bandwidth_gbs = 2.0 * out->mem_clock_khz * 1e3 * (out->mem_bus_bits / 8) / 1e9;
    return QN_OK;
}

/* (cc << 32 | sm_count) per device; 0 until first asked (a real device has neither 0). */
static std::atomic<int64_t> g_arch[64];

qn_status qn_cuda_device_arch(const char *op, int dev, int *cc, int *sm_count) {
    if (dev < 0 || dev >= 64) return qn_set_error(QN_EINVAL, "%s: device %d out of range", op, dev);
    int64_t v = g_arch[dev].load();
    if (v == 0) {
        int major = 0, minor = 0, sms = 0;
        QN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        QN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
        QN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        v = (int64_t)(10 * major + minor) << 32 | (uint32_t)sms;
        g_arch[dev].store(v);
    }
    if (cc) *cc = (int)(v >> 32);
    if (sm_count) *sm_count = (int)(v & 0xFFFFFFFF);
    return QN_OK;
}

/* ---- self-test ---- */

static __global__ void qn_selftest_kernel(int *out, /* [n + 1] */ int n, int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = i * 7 + seed;
#ifdef __CUDA_ARCH__
    if (i == 0) out[n] = __CUDA_ARCH__;
#endif
}

extern "C" qn_status qn_cuda_selftest(int dev, int *arch) {
    enum { N = 1000, THREADS = 256, SEED = 12345 };
    int host[N + 1];
    int *buf = NULL;
    int prev = -1;
    *arch = 0;
    qn_status st = qn_cuda_check_device("selftest", dev);
    if (st != QN_OK) return st;
    QN_CUDA_CHECK(cudaGetDevice(&prev));
    QN_CUDA_CHECK_GOTO(st, cudaSetDevice(dev), done);
    QN_CUDA_CHECK_GOTO(st, cudaMalloc((void **)&buf, sizeof host), done);
    QN_CUDA_CHECK_GOTO(st, cudaMemset(buf, 0xFF, sizeof host), done);
    qn_selftest_kernel<<<(N + THREADS - 1) / THREADS, THREADS>>>(buf, N, SEED);
    QN_CUDA_LAUNCH_CHECK_GOTO(st, qn_selftest_kernel, 0, done);
    QN_CUDA_CHECK_GOTO(st, cudaMemcpy(host, buf, sizeof host, cudaMemcpyDeviceToHost), done);
    for (int i = 0; i < N; i++) {
        if (host[i] != i * 7 + SEED) {
            st = qn_set_error(QN_ECUDA, "selftest: device %d wrote %d at index %d, expected %d", dev,
                              host[i], i, i * 7 + SEED);
            goto done;
        }
    }
    if (host[N] <= 0) {
        st = qn_set_error(QN_ECUDA, "selftest: device %d ran the kernel but reported no architecture", dev);
        goto done;
    }
    *arch = host[N];
done:
    if (buf) (void)cudaFree(buf);
    (void)cudaSetDevice(prev);
    return st;
}
