/* py_arrays.c — device memory, copies, streams, DLPack capsules and the quantized and float
 * matmuls of quanta._cuda, for python/quanta/cuda.py (which builds quanta.cuda.Array on top).
 *
 * Pointers and stream handles cross this boundary as Python ints; the Python layer owns the
 * bookkeeping (shapes, dtypes, which object keeps memory alive) and checks arguments first,
 * and this file re-checks what a wrong value would turn into a bad access. Every CUDA call
 * runs with the GIL released; a failure raises (RuntimeError for CUDA errors, MemoryError for
 * an exhausted device, ValueError for bad arguments).
 *
 * DLPack: the structs below are DLPack 1.x's ABI (DLTensor, DLManagedTensor for the legacy
 * "dltensor" capsule, DLManagedTensorVersioned for "dltensor_versioned").
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdlib.h>
#include <string.h>

#include "py_arrays.h"
#include "qn_cuda.h"

/* ---- helpers ---- */

static int arg_i64(PyObject *o, const char *op, const char *name, int64_t *v) {
    *v = 0;
    long long x = PyLong_AsLongLong(o);
    if (x == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: %s must be an int, got %s", op, name, Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    *v = (int64_t)x;
    return 0;
}

static int arg_int(PyObject *o, const char *op, const char *name, int *v) {
    int64_t x;
    *v = 0;
    if (arg_i64(o, op, name, &x) < 0) return -1;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %s = %lld is out of range", op, name, (long long)x);
        return -1;
    }
    *v = (int)x;
    return 0;
}

/* A pointer or stream handle: a non-negative int (None is 0). */
static int arg_ptr(PyObject *o, const char *op, const char *name, void **p) {
    *p = NULL;
    if (o == Py_None) {
        *p = NULL;
        return 0;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyLong_Check(o) ? PyExc_ValueError : PyExc_TypeError,
                     "%s: %s must be a non-negative int address, got %R", op, name, o);
        return -1;
    }
    *p = (void *)(uintptr_t)x;
    return 0;
}

static int check_nargs(const char *op, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments, got %zd", op, want, nargs);
        return -1;
    }
    return 0;
}

/* ---- Buffer: one block of the caching allocator ---- */

typedef struct {
    PyObject_HEAD
    void *ptr;
    int64_t nbytes;
    int device;
    unsigned long long stream; /* the last stream that used the block; updated by the owner */
} BufferObject;

static void buffer_dealloc(BufferObject *self) {
    if (self->ptr) {
        void *ptr = self->ptr;
        self->ptr = NULL;
        /* A failure here cannot be raised (we are in a destructor): the block is then leaked
         * to CUDA, which frees it with the context. */
        Py_BEGIN_ALLOW_THREADS
        (void)qn_cuda_release(self->device, ptr, (void *)(uintptr_t)self->stream);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *buffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int dev;
    long long nbytes;
    unsigned long long stream = 0;
    static char *kwlist[] = {"device", "nbytes", "stream", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iL|K:Buffer", kwlist, &dev, &nbytes, &stream)) return NULL;
    if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "Buffer: nbytes must be >= 0, got %lld", nbytes);
    BufferObject *self = (BufferObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    void *ptr = NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_alloc(dev, (int64_t)nbytes, (void *)(uintptr_t)stream, &ptr);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) {
        Py_DECREF(self);
        return qn_cuda_raise(st);
    }
    self->ptr = ptr;
    self->nbytes = nbytes;
    self->device = dev;
    self->stream = stream;
    return (PyObject *)self;
}

static PyObject *buffer_get_ptr(BufferObject *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(self->ptr);
}

static PyGetSetDef buffer_getset[] = {
    {"ptr", (getter)buffer_get_ptr, NULL, "device address", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef buffer_members[] = {
    {"nbytes", T_LONGLONG, offsetof(BufferObject, nbytes), READONLY, "bytes requested"},
    {"device", T_INT, offsetof(BufferObject, device), READONLY, "device ordinal"},
    {"stream", T_ULONGLONG, offsetof(BufferObject, stream), 0,
     "stream handle the block is released on (the last one that used it)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "quanta._cuda.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Buffer(device, nbytes, stream=0): device memory from quanta's caching allocator, "
              "returned to the cache when the object dies.",
    .tp_getset = buffer_getset,
    .tp_members = buffer_members,
    .tp_new = buffer_new,
};

/* ---- DLPack ABI ---- */

typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* elements; NULL = C-contiguous */
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
typedef struct { uint32_t major, minor; } DLPackVersion;
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;
#define QN_DLPACK_READ_ONLY 1ull

/* What we export: the managed struct (either kind), then shape and strides, in one malloc;
 * manager_ctx holds a reference to the Python object that keeps the memory alive. */
typedef struct {
    union {
        DLManagedTensor legacy;
        DLManagedTensorVersioned versioned;
    } m;
    int64_t dims[]; /* shape[ndim], then strides[ndim] */
} Export;

static void export_release(void *ctx) {
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF((PyObject *)ctx);
    PyGILState_Release(g);
}
static void deleter_legacy(DLManagedTensor *self) {
    export_release(self->manager_ctx);
    free(self);
}
static void deleter_versioned(DLManagedTensorVersioned *self) {
    export_release(self->manager_ctx);
    free(self);
}

/* A capsule nobody consumed still owns the tensor. */
static void capsule_destructor_legacy(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *t = PyCapsule_GetPointer(cap, "dltensor");
        if (t && t->deleter) t->deleter(t);
    }
    PyErr_Clear();
}
static void capsule_destructor_versioned(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *t = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (t && t->deleter) t->deleter(t);
    }
    PyErr_Clear();
}

/* dlpack_export(owner, ptr, shape, strides, type_code, bits, device_type, device_id, versioned,
 * readonly) -> capsule. strides in elements. */
static PyObject *py_dlpack_export(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "dlpack_export";
    if (check_nargs(op, nargs, 10) < 0) return NULL;
    void *ptr;
    int code, bits, dtype, did, versioned, readonly;
    if (arg_ptr(args[1], op, "ptr", &ptr) < 0 || arg_int(args[4], op, "type_code", &code) < 0 ||
        arg_int(args[5], op, "bits", &bits) < 0 || arg_int(args[6], op, "device_type", &dtype) < 0 ||
        arg_int(args[7], op, "device_id", &did) < 0 || arg_int(args[8], op, "versioned", &versioned) < 0 ||
        arg_int(args[9], op, "readonly", &readonly) < 0)
        return NULL;
    if (!PyTuple_Check(args[2]) || !PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[2]) != PyTuple_GET_SIZE(args[3]))
        return PyErr_Format(PyExc_TypeError, "%s: shape and strides must be tuples of one length", op);
    Py_ssize_t ndim = PyTuple_GET_SIZE(args[2]);
    Export *e = malloc(sizeof(Export) + 2 * (size_t)(ndim > 0 ? ndim : 1) * sizeof(int64_t));
    if (!e) return PyErr_NoMemory();
    memset(e, 0, sizeof(Export));
    int64_t *shape = e->dims, *strides = e->dims + ndim;
    for (Py_ssize_t i = 0; i < ndim; i++) {
        if (arg_i64(PyTuple_GET_ITEM(args[2], i), op, "shape", &shape[i]) < 0 ||
            arg_i64(PyTuple_GET_ITEM(args[3], i), op, "strides", &strides[i]) < 0) {
            free(e);
            return NULL;
        }
    }
    DLTensor *t = versioned ? &e->m.versioned.dl_tensor : &e->m.legacy.dl_tensor;
    t->data = ptr;
    t->device.device_type = dtype;
    t->device.device_id = did;
    t->ndim = (int32_t)ndim;
    t->dtype.code = (uint8_t)code;
    t->dtype.bits = (uint8_t)bits;
    t->dtype.lanes = 1;
    t->shape = shape;
    t->strides = strides;
    t->byte_offset = 0;
    Py_INCREF(args[0]);
    PyObject *cap;
    if (versioned) {
        e->m.versioned.version.major = 1;
        e->m.versioned.version.minor = 1;
        e->m.versioned.manager_ctx = args[0];
        e->m.versioned.deleter = deleter_versioned;
        e->m.versioned.flags = readonly ? QN_DLPACK_READ_ONLY : 0;
        cap = PyCapsule_New(&e->m.versioned, "dltensor_versioned", capsule_destructor_versioned);
    } else {
        e->m.legacy.manager_ctx = args[0];
        e->m.legacy.deleter = deleter_legacy;
        cap = PyCapsule_New(&e->m.legacy, "dltensor", capsule_destructor_legacy);
    }
    if (!cap) {
        Py_DECREF(args[0]);
        free(e);
    }
    return cap;
}

/* Keeps an imported tensor alive; calls its producer's deleter when it dies. */
typedef struct {
    PyObject_HEAD
    void *managed;
    int versioned;
} DLOwnerObject;

static void dlowner_dealloc(DLOwnerObject *self) {
    if (self->managed) {
        if (self->versioned) {
            DLManagedTensorVersioned *t = self->managed;
            if (t->deleter) t->deleter(t);
        } else {
            DLManagedTensor *t = self->managed;
            if (t->deleter) t->deleter(t);
        }
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject DLOwnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "quanta._cuda.DLPackOwner",
    .tp_basicsize = sizeof(DLOwnerObject),
    .tp_dealloc = (destructor)dlowner_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Owns a consumed DLPack tensor; its producer's deleter runs when this object dies.",
};

/* dlpack_import(capsule) -> (owner, ptr, shape, strides | None, (code, bits, lanes),
 * (device_type, device_id), readonly). The capsule is marked used; `owner` must outlive every
 * use of ptr. */
static PyObject *py_dlpack_import(PyObject *self, PyObject *cap) {
    (void)self;
    int versioned;
    void *managed;
    DLTensor *t;
    uint64_t flags = 0;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m->version.major != 1)
            return PyErr_Format(PyExc_BufferError, "asarray: DLPack major version %u is not supported (need 1)",
                                m->version.major);
        versioned = 1;
        managed = m;
        t = &m->dl_tensor;
        flags = m->flags;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        versioned = 0;
        managed = m;
        t = &m->dl_tensor;
    } else {
        return PyErr_Format(PyExc_TypeError, "asarray: expected an unconsumed DLPack capsule, got %R", cap);
    }
    if (t->ndim < 0 || t->ndim > 64) return PyErr_Format(PyExc_ValueError, "asarray: DLPack ndim %d", t->ndim);
    DLOwnerObject *owner = PyObject_New(DLOwnerObject, &DLOwnerType);
    if (!owner) return NULL;
    owner->managed = NULL;
    owner->versioned = versioned;
    PyObject *shape = PyTuple_New(t->ndim), *strides = NULL, *res = NULL;
    if (!shape) goto fail;
    for (int i = 0; i < t->ndim; i++) {
        PyObject *v = PyLong_FromLongLong(t->shape[i]);
        if (!v) goto fail;
        PyTuple_SET_ITEM(shape, i, v);
    }
    if (t->strides) {
        strides = PyTuple_New(t->ndim);
        if (!strides) goto fail;
        for (int i = 0; i < t->ndim; i++) {
            PyObject *v = PyLong_FromLongLong(t->strides[i]);
            if (!v) goto fail;
            PyTuple_SET_ITEM(strides, i, v);
        }
    } else {
        strides = Py_NewRef(Py_None);
    }
    res = Py_BuildValue("(ONOO(iii)(ii)O)", owner, PyLong_FromVoidPtr((char *)t->data + t->byte_offset), shape,
                        strides, t->dtype.code, t->dtype.bits, t->dtype.lanes, t->device.device_type,
                        t->device.device_id, (flags & QN_DLPACK_READ_ONLY) ? Py_True : Py_False);
    if (!res) goto fail;
    if (PyCapsule_SetName(cap, versioned ? "used_dltensor_versioned" : "used_dltensor") < 0) {
        Py_CLEAR(res);
        goto fail;
    }
    owner->managed = managed; /* from now on the owner calls the deleter */
    Py_DECREF(shape);
    Py_DECREF(strides);
    Py_DECREF(owner);
    return res;
fail:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    Py_DECREF(owner);
    return NULL;
}

/* ---- copies ---- */

/* h2d(dst_ptr, src (buffer, C-contiguous), device, stream) */
static PyObject *py_h2d(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "to_device";
    void *dst = NULL, *stream = NULL;
    int dev;
    if (check_nargs(op, nargs, 4) < 0 || arg_ptr(args[0], op, "dst", &dst) < 0 || arg_int(args[2], op, "device", &dev) < 0 ||
        arg_ptr(args[3], op, "stream", &stream) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_copy(dst, view.buf, (int64_t)view.len, QN_COPY_H2D, dev, stream);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

/* d2h(dst (writable buffer, C-contiguous), src_ptr, device, stream) */
static PyObject *py_d2h(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "numpy";
    void *src = NULL, *stream = NULL;
    int dev;
    if (check_nargs(op, nargs, 4) < 0 || arg_ptr(args[1], op, "src", &src) < 0 || arg_int(args[2], op, "device", &dev) < 0 ||
        arg_ptr(args[3], op, "stream", &stream) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_copy(view.buf, src, (int64_t)view.len, QN_COPY_D2H, dev, stream);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

/* copy_2d(dst, dpitch, src, spitch, width_bytes, rows, device, stream): device to device */
static PyObject *py_copy_2d(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "copy";
    void *dst = NULL, *src = NULL, *stream = NULL;
    int64_t dp = 0, sp = 0, wb = 0, rows = 0;
    int dev;
    if (check_nargs(op, nargs, 8) < 0 || arg_ptr(args[0], op, "dst", &dst) < 0 || arg_i64(args[1], op, "dpitch", &dp) < 0 ||
        arg_ptr(args[2], op, "src", &src) < 0 || arg_i64(args[3], op, "spitch", &sp) < 0 ||
        arg_i64(args[4], op, "width", &wb) < 0 || arg_i64(args[5], op, "rows", &rows) < 0 ||
        arg_int(args[6], op, "device", &dev) < 0 || arg_ptr(args[7], op, "stream", &stream) < 0)
        return NULL;
    if (wb < 0 || rows < 0 || dp < wb || sp < wb)
        return PyErr_Format(PyExc_ValueError, "%s: bad 2-D copy (pitches %lld, %lld, width %lld, rows %lld)", op,
                            (long long)dp, (long long)sp, (long long)wb, (long long)rows);
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rows == 1 || (dp == wb && sp == wb) ? qn_cuda_copy(dst, src, wb * rows, QN_COPY_D2D, dev, stream)
                                             : qn_cuda_copy_2d(dst, dp, src, sp, wb, rows, dev, stream);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

/* ---- streams and memory ---- */

static PyObject *py_stream_create(PyObject *self, PyObject *arg) {
    (void)self;
    int dev;
    void *s;
    qn_status st;
    if (arg_int(arg, "Stream", "device", &dev) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_stream_create(dev, &s);
    Py_END_ALLOW_THREADS
    return st == QN_OK ? PyLong_FromVoidPtr(s) : qn_cuda_raise(st);
}

typedef qn_status (*stream_fn)(int, void *);

static PyObject *stream_call(PyObject *const *args, Py_ssize_t nargs, const char *op, stream_fn fn) {
    int dev;
    void *s = NULL;
    qn_status st;
    if (check_nargs(op, nargs, 2) < 0 || arg_int(args[0], op, "device", &dev) < 0 ||
        arg_ptr(args[1], op, "stream", &s) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = fn(dev, s);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_stream_destroy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return stream_call(args, nargs, "stream_destroy", qn_cuda_stream_destroy);
}

static PyObject *py_stream_synchronize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return stream_call(args, nargs, "synchronize", qn_cuda_stream_synchronize);
}

static PyObject *py_stream_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "stream_wait";
    int dev;
    void *waiter = NULL, *on = NULL;
    qn_status st;
    if (check_nargs(op, nargs, 3) < 0 || arg_int(args[0], op, "device", &dev) < 0 ||
        arg_ptr(args[1], op, "waiter", &waiter) < 0 || arg_ptr(args[2], op, "on", &on) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_stream_wait(dev, waiter, on);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_pointer_device(PyObject *self, PyObject *arg) {
    (void)self;
    void *p;
    int dev;
    qn_status st;
    if (arg_ptr(arg, "asarray", "ptr", &p) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_pointer_device(p, &dev);
    Py_END_ALLOW_THREADS
    return st == QN_OK ? PyLong_FromLong(dev) : qn_cuda_raise(st);
}

static PyObject *py_empty_cache(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_empty_cache();
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_memory_stats(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int64_t live, cached;
    qn_cuda_memory_stats(&live, &cached);
    return Py_BuildValue("(LL)", (long long)live, (long long)cached);
}

/* ---- quantized matmul ---- */

/* A qn_format from the bytes of quanta.formats.Format._c. */
static int arg_format(PyObject *o, const char *op, qn_format *f) {
    char *buf;
    Py_ssize_t len;
    if (!PyBytes_Check(o) || PyBytes_AsStringAndSize(o, &buf, &len) < 0 || len != (Py_ssize_t)sizeof(qn_format)) {
        PyErr_Format(PyExc_TypeError, "%s: fmt must be the %zu bytes of a quanta format", op, sizeof(qn_format));
        return -1;
    }
    memcpy(f, buf, sizeof *f);
    return 0;
}

/* Weight arguments at args[0..6]: fmt, N, K, codes, scales, offsets, supers, super_mins. */
static int arg_weight(PyObject *const *args, const char *op, qn_format *f, qn_qweight *w) {
    void *p[5];
    static const char *names[] = {"codes", "scales", "offsets", "supers", "super_mins"};
    if (arg_format(args[0], op, f) < 0 || arg_i64(args[1], op, "N", &w->N) < 0 || arg_i64(args[2], op, "K", &w->K) < 0)
        return -1;
    for (int i = 0; i < 5; i++)
        if (arg_ptr(args[3 + i], op, names[i], &p[i]) < 0) return -1;
    w->fmt = f;
    w->codes = p[0];
    w->scales = p[1];
    w->offsets = p[2];
    w->supers = p[3];
    w->super_mins = p[4];
    return 0;
}

/* qmatmul(fmt, N, K, codes, scales, offsets, supers, super_mins, y, ydt, ldy, x, xdt, ldx, M,
 *         workspace, path, device, stream) */
static PyObject *py_qmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "qmatmul";
    qn_format f;
    qn_qweight w;
    void *y = NULL, *x = NULL, *ws = NULL, *stream = NULL;
    int ydt, xdt, path, dev;
    int64_t ldy = 0, ldx = 0, M = 0;
    if (check_nargs(op, nargs, 19) < 0 || arg_weight(args, op, &f, &w) < 0 || arg_ptr(args[8], op, "y", &y) < 0 ||
        arg_int(args[9], op, "ydt", &ydt) < 0 || arg_i64(args[10], op, "ldy", &ldy) < 0 ||
        arg_ptr(args[11], op, "x", &x) < 0 || arg_int(args[12], op, "xdt", &xdt) < 0 ||
        arg_i64(args[13], op, "ldx", &ldx) < 0 || arg_i64(args[14], op, "M", &M) < 0 ||
        arg_ptr(args[15], op, "workspace", &ws) < 0 || arg_int(args[16], op, "path", &path) < 0 ||
        arg_int(args[17], op, "device", &dev) < 0 || arg_ptr(args[18], op, "stream", &stream) < 0)
        return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_qmatmul(y, ydt, ldy, &w, x, xdt, ldx, M, ws, path, dev, stream);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

/* qmatmul_plan(fmt, N, K, M, device, path) -> (path that runs, workspace bytes) */
static PyObject *py_qmatmul_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "qmatmul_plan";
    qn_format f;
    qn_qweight w;
    int64_t M;
    int dev, path;
    int64_t ws = 0;
    memset(&w, 0, sizeof w);
    if (check_nargs(op, nargs, 6) < 0 || arg_format(args[0], op, &f) < 0 || arg_i64(args[1], op, "N", &w.N) < 0 ||
        arg_i64(args[2], op, "K", &w.K) < 0 || arg_i64(args[3], op, "M", &M) < 0 ||
        arg_int(args[4], op, "device", &dev) < 0 || arg_int(args[5], op, "path", &path) < 0)
        return NULL;
    w.fmt = &f;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_qmatmul_plan(&w, M, dev, &path, &ws);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    return Py_BuildValue("(iL)", path, (long long)ws);
}

/* ---- float matmul ---- */

/* matmul(y, ydt, ldy, x, xdt, ldx, w, wdt, ldw, M, N, K, path, device, stream) */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "matmul";
    void *y = NULL, *x = NULL, *w = NULL, *stream = NULL;
    int ydt, xdt, wdt, path, dev;
    int64_t ldy = 0, ldx = 0, ldw = 0, M = 0, N = 0, K = 0;
    if (check_nargs(op, nargs, 15) < 0 || arg_ptr(args[0], op, "y", &y) < 0 || arg_int(args[1], op, "ydt", &ydt) < 0 ||
        arg_i64(args[2], op, "ldy", &ldy) < 0 || arg_ptr(args[3], op, "x", &x) < 0 ||
        arg_int(args[4], op, "xdt", &xdt) < 0 || arg_i64(args[5], op, "ldx", &ldx) < 0 ||
        arg_ptr(args[6], op, "w", &w) < 0 || arg_int(args[7], op, "wdt", &wdt) < 0 ||
        arg_i64(args[8], op, "ldw", &ldw) < 0 || arg_i64(args[9], op, "M", &M) < 0 || arg_i64(args[10], op, "N", &N) < 0 ||
        arg_i64(args[11], op, "K", &K) < 0 || arg_int(args[12], op, "path", &path) < 0 ||
        arg_int(args[13], op, "device", &dev) < 0 || arg_ptr(args[14], op, "stream", &stream) < 0)
        return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_matmul(y, ydt, ldy, x, xdt, ldx, w, wdt, ldw, M, N, K, path, dev, stream);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    Py_RETURN_NONE;
}

/* matmul_path(xdt, wdt, M, device) -> path */
static PyObject *py_matmul_path(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "matmul_path";
    int xdt, wdt, dev, path;
    int64_t M;
    if (check_nargs(op, nargs, 4) < 0 || arg_int(args[0], op, "xdt", &xdt) < 0 || arg_int(args[1], op, "wdt", &wdt) < 0 ||
        arg_i64(args[2], op, "M", &M) < 0 || arg_int(args[3], op, "device", &dev) < 0)
        return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_cuda_matmul_path(xdt, wdt, M, dev, &path);
    Py_END_ALLOW_THREADS
    if (st != QN_OK) return qn_cuda_raise(st);
    return PyLong_FromLong(path);
}

PyMethodDef qn_py_array_methods[] = {
    {"dlpack_export", (PyCFunction)(void (*)(void))py_dlpack_export, METH_FASTCALL,
     "dlpack_export(owner, ptr, shape, strides, type_code, bits, device_type, device_id, versioned, readonly)"},
    {"dlpack_import", py_dlpack_import, METH_O, "dlpack_import(capsule) -> (owner, ptr, shape, strides, dtype, device, readonly)"},
    {"h2d", (PyCFunction)(void (*)(void))py_h2d, METH_FASTCALL, "h2d(dst_ptr, src_buffer, device, stream)"},
    {"d2h", (PyCFunction)(void (*)(void))py_d2h, METH_FASTCALL, "d2h(dst_buffer, src_ptr, device, stream)"},
    {"copy_2d", (PyCFunction)(void (*)(void))py_copy_2d, METH_FASTCALL,
     "copy_2d(dst, dpitch, src, spitch, width_bytes, rows, device, stream)"},
    {"stream_create", py_stream_create, METH_O, "stream_create(device) -> handle (non-blocking stream)"},
    {"stream_destroy", (PyCFunction)(void (*)(void))py_stream_destroy, METH_FASTCALL, "stream_destroy(device, handle)"},
    {"stream_synchronize", (PyCFunction)(void (*)(void))py_stream_synchronize, METH_FASTCALL,
     "stream_synchronize(device, handle)"},
    {"stream_wait", (PyCFunction)(void (*)(void))py_stream_wait, METH_FASTCALL, "stream_wait(device, waiter, on)"},
    {"pointer_device", py_pointer_device, METH_O, "pointer_device(ptr) -> device ordinal, -1 for host memory"},
    {"empty_cache", py_empty_cache, METH_NOARGS, "empty_cache(): free every cached (unused) block"},
    {"memory_stats", py_memory_stats, METH_NOARGS, "memory_stats() -> (live bytes, cached bytes)"},
    {"qmatmul", (PyCFunction)(void (*)(void))py_qmatmul, METH_FASTCALL,
     "qmatmul(fmt, N, K, codes, scales, offsets, supers, super_mins, y, ydt, ldy, x, xdt, ldx, M, workspace, "
     "path, device, stream)"},
    {"qmatmul_plan", (PyCFunction)(void (*)(void))py_qmatmul_plan, METH_FASTCALL,
     "qmatmul_plan(fmt, N, K, M, device, path) -> (path that runs, workspace bytes)"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL,
     "matmul(y, ydt, ldy, x, xdt, ldx, w, wdt, ldw, M, N, K, path, device, stream)"},
    {"matmul_path", (PyCFunction)(void (*)(void))py_matmul_path, METH_FASTCALL,
     "matmul_path(xdt, wdt, M, device) -> path"},
    {NULL, NULL, 0, NULL},
};

int qn_py_arrays_init(PyObject *m) {
    if (PyType_Ready(&BufferType) < 0 || PyType_Ready(&DLOwnerType) < 0) return -1;
    if (PyModule_AddObjectRef(m, "Buffer", (PyObject *)&BufferType) < 0) return -1;
    if (PyModule_AddObjectRef(m, "DLPackOwner", (PyObject *)&DLOwnerType) < 0) return -1;
    if (PyModule_AddIntConstant(m, "PATH_AUTO", QN_CUDA_PATH_AUTO) < 0 ||
        PyModule_AddIntConstant(m, "PATH_GEMV", QN_CUDA_PATH_GEMV) < 0 ||
        PyModule_AddIntConstant(m, "PATH_GEMM", QN_CUDA_PATH_GEMM) < 0 ||
        PyModule_AddIntConstant(m, "PATH_FP8", QN_CUDA_PATH_FP8) < 0 ||
        PyModule_AddIntConstant(m, "PATH_FMA", QN_CUDA_PATH_FMA) < 0 ||
        PyModule_AddIntConstant(m, "GEMV_MAX_M", QN_CUDA_GEMV_MAX_M) < 0)
        return -1;
    return 0;
}
