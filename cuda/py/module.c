/* module.c — the quanta._cuda extension module: devices, versions, a toolchain self-test.
 *
 * With py_arrays.c, the only C under cuda/ that touches CPython; it calls the extern "C" API of qn_cuda.h
 * with the GIL released and turns a status into an exception (QN_EINVAL -> ValueError,
 * QN_ECUDA -> RuntimeError). Without a driver or device, device_count() is 0, devices() is
 * [] and unavailable_reason() says why; only calls that need a device raise.
 * python/quanta/cuda.py is the public face; nothing else should import this module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "py_arrays.h"
#include "qn_cuda.h"

PyObject *qn_cuda_raise(qn_status st) {
    PyObject *type = st == QN_EINVAL ? PyExc_ValueError
                     : st == QN_ENOMEM ? PyExc_MemoryError
                     : st == QN_EUNSUPPORTED ? PyExc_NotImplementedError
                     : PyExc_RuntimeError;
    PyErr_SetString(type, qn_last_error());
    return NULL;
}

/* A device index from a Python int; -1 with an exception set when it is not an int. */
static int device_arg(PyObject *arg, const char *op, int *dev) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: dev must be an int, got %s", op, Py_TYPE(arg)->tp_name);
        }
        return -1;
    }
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: device %ld is out of range", op, v);
        return -1;
    }
    *dev = (int)v;
    return 0;
}

static PyObject *py_device_count(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int n;
    Py_BEGIN_ALLOW_THREADS
    (void)qn_cuda_device_count(&n); /* 0 devices is an answer, not an error */
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_unavailable_reason(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int n;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_device_count(&n);
    Py_END_ALLOW_THREADS
    if (st == QN_OK) Py_RETURN_NONE;
    return PyUnicode_FromString(qn_last_error());
}

static PyObject *device_dict(const struct qn_cuda_device *d) {
    return Py_BuildValue(
        "{s:i,s:s,s:s,s:(ii),s:L,s:i,s:i,s:i,s:i,s:L,s:L,s:L,s:L,s:i,s:i,s:i,s:d,s:O}",
        "index", d->index, "name", d->name, "pci_bus_id", d->pci_bus_id,
        "compute_capability", d->major, d->minor, "total_memory", (long long)d->total_mem,
        "sm_count", d->sm_count, "max_threads_per_block", d->max_threads_per_block,
        "max_threads_per_sm", d->max_threads_per_sm, "warp_size", d->warp_size,
        "shared_memory_per_block", (long long)d->smem_per_block,
        "shared_memory_per_block_optin", (long long)d->smem_per_block_optin,
        "shared_memory_per_sm", (long long)d->smem_per_sm, "l2_cache", (long long)d->l2_bytes,
        "clock_khz", d->clock_khz, "memory_clock_khz", d->mem_clock_khz,
        "memory_bus_bits", d->mem_bus_bits, "memory_bandwidth_gbs", d->mem_bandwidth_gbs,
        "integrated", d->integrated ? Py_True : Py_False);
}

static PyObject *py_devices(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int n;
    Py_BEGIN_ALLOW_THREADS
    (void)qn_cuda_device_count(&n);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        struct qn_cuda_device d;
        qn_status st;
        Py_BEGIN_ALLOW_THREADS
        st = qn_cuda_device_info(i, &d);
        Py_END_ALLOW_THREADS
        if (st != QN_OK) {
            qn_cuda_raise(st);
            goto fail;
        }
        PyObject *item = device_dict(&d);
        if (!item) goto fail;
        int rc = PyList_Append(list, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *py_runtime_version(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int v;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_runtime_version(&v);
    Py_END_ALLOW_THREADS
    return st == QN_OK ? PyLong_FromLong(v) : qn_cuda_raise(st);
}

static PyObject *py_driver_version(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int v;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_driver_version(&v);
    Py_END_ALLOW_THREADS
    return st == QN_OK ? PyLong_FromLong(v) : qn_cuda_raise(st);
}

static PyObject *py_selftest(PyObject *self, PyObject *arg) {
    (void)self;
    int dev, arch;
    qn_status st;
    if (device_arg(arg, "selftest", &dev) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_selftest(dev, &arch);
    Py_END_ALLOW_THREADS
    return st == QN_OK ? PyLong_FromLong(arch) : qn_cuda_raise(st);
}

static PyMethodDef methods[] = {
    {"device_count", py_device_count, METH_NOARGS,
     "device_count() -> int: usable CUDA devices; 0 without a driver or device."},
    {"unavailable_reason", py_unavailable_reason, METH_NOARGS,
     "unavailable_reason() -> str | None: why no device can be used, None when one can."},
    {"devices", py_devices, METH_NOARGS, "devices() -> list[dict]: properties of every usable device."},
    {"runtime_version", py_runtime_version, METH_NOARGS,
     "runtime_version() -> int: CUDA runtime linked in, 1000 * major + 10 * minor."},
    {"driver_version", py_driver_version, METH_NOARGS,
     "driver_version() -> int: CUDA version the driver supports, 0 without a driver."},
    {"selftest", py_selftest, METH_O,
     "selftest(dev) -> int: run a tiny kernel on device dev and check its output; returns the "
     "__CUDA_ARCH__ of the code that ran. RuntimeError when it cannot run."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_cuda", "quanta's CUDA kernels.", -1,
                                       methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cuda(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "ARCH_LIST", qn_cuda_built_archs()) < 0 ||
        PyModule_AddFunctions(m, qn_py_array_methods) < 0 || qn_py_arrays_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
