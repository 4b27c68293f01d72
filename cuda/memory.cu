/* memory.cu — the caching device allocator, copies and streams of quanta._cuda.
 *
 * cudaMalloc and cudaFree synchronize the device and cost tens of microseconds, so freed
 * blocks go to per-device free lists keyed by size class (512-byte granules up to 1 MiB,
 * then four classes per power of two: at most 25% slack) and are handed out again. A block
 * freed on stream A and reused on stream B is safe because the free records an event on A
 * and the reuse makes B wait on it (on the device; the host never blocks). The state lives
 * behind one mutex and is never destroyed (blocks freed during interpreter shutdown must
 * still find it); qn_cuda_empty_cache() returns cached blocks to CUDA, at exit among others.
 */
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.cuh"
#include "qn_cuda.h"

namespace {

struct Block {
    void *ptr;
    int64_t size;       /* size class in bytes */
    cudaEvent_t ready;  /* recorded on the last stream that used the block, or NULL */
};

struct DeviceCache {
    std::unordered_map<int64_t, std::vector<Block>> free_lists; /* size class -> blocks */
    int64_t cached = 0;
};

struct Allocator {
    std::mutex mu;
    std::unordered_map<int, DeviceCache> devices;
    std::unordered_map<void *, Block> live;
    int64_t live_bytes = 0, cached_bytes = 0;
};

Allocator &allocator() {
    static Allocator *a = new Allocator; /* intentionally never destroyed: see the file header */
    return *a;
}

int64_t size_class(int64_t n) {
    const int64_t granule = 512, fine_limit = 1 << 20;
    if (n <= fine_limit) return n <= 0 ? granule : (n + granule - 1) / granule * granule;
    int64_t p = fine_limit;
    while (p * 2 < n) p *= 2; /* p < n <= 2p */
    int64_t step = p / 4;
    return (n + step - 1) / step * step;
}

/* Switches the calling thread to device dev and back. */
struct DeviceGuard {
    int prev = -1;
    cudaError_t err;
    explicit DeviceGuard(int dev) {
        err = cudaGetDevice(&prev);
        if (err == cudaSuccess && prev != dev) err = cudaSetDevice(dev);
    }
    ~DeviceGuard() {
        if (prev >= 0) (void)cudaSetDevice(prev);
    }
};

/* cudaFree of every cached block of one device; the caller holds the mutex. */
void drop_cached(Allocator &a, int dev, DeviceCache &dc) {
    DeviceGuard g(dev);
    for (auto &kv : dc.free_lists) {
        for (Block &b : kv.second) {
            if (b.ready) (void)cudaEventDestroy(b.ready);
            (void)cudaFree(b.ptr);
            a.cached_bytes -= b.size;
            dc.cached -= b.size;
        }
        kv.second.clear();
    }
    (void)cudaGetLastError();
}

}  // namespace

extern "C" qn_status qn_cuda_alloc(int dev, int64_t nbytes, void *stream, void **ptr) {
    *ptr = NULL;
    if (nbytes < 0) return qn_set_error(QN_EINVAL, "cuda alloc: negative size %lld", (long long)nbytes);
    int64_t size = size_class(nbytes);
    Allocator &a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    DeviceGuard g(dev);
    if (g.err != cudaSuccess) return qn_cuda_status(g.err, "cudaSetDevice");
    DeviceCache &dc = a.devices[dev];
    auto it = dc.free_lists.find(size);
    if (it != dc.free_lists.end() && !it->second.empty()) {
        Block b = it->second.back();
        it->second.pop_back();
        dc.cached -= size;
        a.cached_bytes -= size;
        if (b.ready) {
            cudaError_t e = cudaStreamWaitEvent((cudaStream_t)stream, b.ready, 0);
            if (e != cudaSuccess) {
                it->second.push_back(b);
                dc.cached += size;
                a.cached_bytes += size;
                return qn_cuda_status(e, "cudaStreamWaitEvent (reusing a cached block)");
            }
        }
        a.live[b.ptr] = b;
        a.live_bytes += size;
        *ptr = b.ptr;
        return QN_OK;
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, (size_t)size);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        drop_cached(a, dev, dc);
        e = cudaMalloc(&p, (size_t)size);
    }
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (e == cudaErrorMemoryAllocation) {
            size_t free_b = 0, total_b = 0;
            (void)cudaMemGetInfo(&free_b, &total_b);
            (void)cudaGetLastError();
            return qn_set_error(QN_ENOMEM,
                                "cuda alloc: out of memory on device %d allocating %lld bytes "
                                "(%lld bytes free of %lld; quanta holds %lld live)",
                                dev, (long long)size, (long long)free_b, (long long)total_b,
                                (long long)a.live_bytes);
        }
        return qn_cuda_status(e, "cudaMalloc");
    }
    Block b = {p, size, NULL};
    a.live[p] = b;
    a.live_bytes += size;
    *ptr = p;
    return QN_OK;
}

extern "C" qn_status qn_cuda_release(int dev, void *ptr, void *stream) {
    if (!ptr) return QN_OK;
    Allocator &a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    auto it = a.live.find(ptr);
    if (it == a.live.end())
        return qn_set_error(QN_EINVAL, "cuda release: %p was not allocated by quanta", ptr);
    Block b = it->second;
    a.live.erase(it);
    a.live_bytes -= b.size;
    DeviceGuard g(dev);
    cudaError_t e = g.err;
    if (e == cudaSuccess && !b.ready) e = cudaEventCreateWithFlags(&b.ready, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(b.ready, (cudaStream_t)stream);
    if (e != cudaSuccess) {
        /* The context is gone (a fault, or process teardown): give the block back to CUDA. */
        (void)cudaGetLastError();
        if (b.ready) (void)cudaEventDestroy(b.ready);
        (void)cudaFree(b.ptr);
        (void)cudaGetLastError();
        return QN_OK;
    }
    DeviceCache &dc = a.devices[dev];
    dc.free_lists[b.size].push_back(b);
    dc.cached += b.size;
    a.cached_bytes += b.size;
    return QN_OK;
}

extern "C" qn_status qn_cuda_empty_cache(void) {
    Allocator &a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    for (auto &kv : a.devices) drop_cached(a, kv.first, kv.second);
    return QN_OK;
}

extern "C" void qn_cuda_memory_stats(int64_t *live, int64_t *cached) {
    Allocator &a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    *live = a.live_bytes;
    *cached = a.cached_bytes;
}

/* ---- copies ---- */

extern "C" qn_status qn_cuda_copy(void *dst, const void *src, int64_t nbytes, int kind, int dev, void *stream) {
    if (nbytes <= 0) return QN_OK;
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                           cudaMemcpyDeviceToDevice};
    if (kind < 0 || kind > 2) return qn_set_error(QN_EINVAL, "cuda copy: bad kind %d", kind);
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    cudaStream_t s = (cudaStream_t)stream;
    QN_CUDA_CHECK(cudaMemcpyAsync(dst, src, (size_t)nbytes, kinds[kind], s));
    if (kind != QN_COPY_D2D) QN_CUDA_CHECK(cudaStreamSynchronize(s));
    return QN_OK;
}

extern "C" qn_status qn_cuda_copy_2d(void *dst, int64_t dpitch, const void *src, int64_t spitch,
                                     int64_t cols_bytes, int64_t rows, int dev, void *stream) {
    if (rows <= 0 || cols_bytes <= 0) return QN_OK;
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    QN_CUDA_CHECK(cudaMemcpy2DAsync(dst, (size_t)dpitch, src, (size_t)spitch, (size_t)cols_bytes, (size_t)rows,
                                    cudaMemcpyDeviceToDevice, (cudaStream_t)stream));
    return QN_OK;
}

/* ---- streams ---- */

extern "C" qn_status qn_cuda_stream_create(int dev, void **stream) {
    cudaStream_t s = NULL;
    *stream = NULL;
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    QN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *stream = (void *)s;
    return QN_OK;
}

extern "C" qn_status qn_cuda_stream_destroy(int dev, void *stream) {
    if ((uintptr_t)stream <= 2) return QN_OK; /* default streams are not ours to destroy */
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    QN_CUDA_CHECK(cudaStreamDestroy((cudaStream_t)stream));
    return QN_OK;
}

extern "C" qn_status qn_cuda_stream_synchronize(int dev, void *stream) {
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    QN_CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)stream));
    return QN_OK;
}

extern "C" qn_status qn_cuda_stream_wait(int dev, void *waiter, void *on) {
    if (waiter == on) return QN_OK;
    qn_status st = QN_OK;
    cudaEvent_t ev = NULL;
    DeviceGuard g(dev);
    QN_CUDA_CHECK(g.err);
    QN_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    QN_CUDA_CHECK_GOTO(st, cudaEventRecord(ev, (cudaStream_t)on), done);
    QN_CUDA_CHECK_GOTO(st, cudaStreamWaitEvent((cudaStream_t)waiter, ev, 0), done);
done:
    (void)cudaEventDestroy(ev); /* released once the wait has been satisfied */
    return st;
}

extern "C" qn_status qn_cuda_pointer_device(const void *ptr, int *dev) {
    cudaPointerAttributes attr;
    *dev = -1;
    QN_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) *dev = attr.device;
    return QN_OK;
}
