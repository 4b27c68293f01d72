/* args.c — array validation, status -> exception, threads and workspace for the binding. */
#include "args.h"

#include <stdlib.h>


const char *qn_dtype_name(int dt) {
    switch (dt) {
    case QN_DT_F32: return "float32";
    case QN_DT_F16: return "float16";
    case QN_DT_BF16: return "bfloat16";
    case QN_DT_U8: return "uint8";
    case QN_DT_I8: return "int8";
    case QN_DT_I32: return "int32";
    case QN_DT_U16: return "uint16";
    case QN_DT_U64: return "uint64";
    case QN_DT_F64: return "float64";
    case QN_DT_I64: return "int64";
    default: return "?";
    }
}

static int dtype_matches(PyArray_Descr *d, int dt) {
    int t = d->type_num;
    switch (dt) {
    case QN_DT_F32: return t == NPY_FLOAT32;
    case QN_DT_F16: return t == NPY_FLOAT16;
    case QN_DT_BF16: /* ml_dtypes.bfloat16 is a user-defined 2-byte type */
        if (t >= NPY_USERDEF && PyDataType_ELSIZE(d) == 2 && d->typeobj) {
            const char *nm = d->typeobj->tp_name, *dot = strrchr(nm, '.');
            return strcmp(dot ? dot + 1 : nm, "bfloat16") == 0;
        }
        return 0;
    case QN_DT_U8: return t == NPY_UINT8;
    case QN_DT_I8: return t == NPY_INT8;
    case QN_DT_I32: return t == NPY_INT32;
    case QN_DT_U16: return t == NPY_UINT16;
    case QN_DT_U64: return t == NPY_UINT64;
    case QN_DT_F64: return t == NPY_FLOAT64;
    case QN_DT_I64: return t == NPY_INT64;
    default: return 0;
    }
}

static void shape_str(char *buf, size_t n, PyArrayObject *a) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, n - used, "(");
    for (int i = 0; i < PyArray_NDIM(a) && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)PyArray_DIM(a, i));
    if (used < n) snprintf(buf + used, n - used, PyArray_NDIM(a) == 1 ? ",)" : ")");
}

PyArrayObject *qn_check_array(PyObject *obj, const qn_arrspec *s) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy array, got %s", s->op, s->name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    char shp[128];
    shape_str(shp, sizeof shp, a);
    if (!dtype_matches(PyArray_DESCR(a), s->dtype)) {
        PyObject *dn = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s: %s must be %s, got %s with shape %s", s->op, s->name,
                     qn_dtype_name(s->dtype), dn ? PyUnicode_AsUTF8(dn) : "?", shp);
        Py_XDECREF(dn);
        return NULL;
    }
    if (s->ndim >= 0 && PyArray_NDIM(a) != s->ndim) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have %d dimensions, got shape %s", s->op, s->name, s->ndim, shp);
        return NULL;
    }
    for (int i = 0; s->ndim >= 0 && i < s->ndim && i < 4; i++) {
        if (s->shape[i] >= 0 && PyArray_DIM(a, i) != s->shape[i]) {
            char want[128];
            size_t u = (size_t)snprintf(want, sizeof want, "(");
            for (int j = 0; j < s->ndim; j++) {
                if (s->shape[j] >= 0) u += (size_t)snprintf(want + u, sizeof want - u, j ? ", %lld" : "%lld", (long long)s->shape[j]);
                else u += (size_t)snprintf(want + u, sizeof want - u, j ? ", *" : "*");
            }
            snprintf(want + u, sizeof want - u, s->ndim == 1 ? ",)" : ")");
            PyErr_Format(PyExc_ValueError, "%s: %s must have shape %s, got %s", s->op, s->name, want, shp);
            return NULL;
        }
    }
    int isz = (int)PyArray_ITEMSIZE(a);
    if (s->contiguous && PyArray_SIZE(a) > 0 && !PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be C-contiguous", s->op, s->name);
        return NULL;
    }
    if (s->rows_contiguous && PyArray_NDIM(a) >= 1 && PyArray_SIZE(a) > 0) {
        int nd = PyArray_NDIM(a);
        if (PyArray_DIM(a, nd - 1) > 1 && PyArray_STRIDE(a, nd - 1) != isz) {
            PyErr_Format(PyExc_ValueError, "%s: %s must have contiguous rows (last stride %d), got stride %lld",
                         s->op, s->name, isz, (long long)PyArray_STRIDE(a, nd - 1));
            return NULL;
        }
        for (int i = 0; i < nd - 1; i++) {
            if (PyArray_STRIDE(a, i) < 0 || PyArray_STRIDE(a, i) % isz) {
                PyErr_Format(PyExc_ValueError, "%s: %s has an unsupported stride %lld on axis %d", s->op, s->name,
                             (long long)PyArray_STRIDE(a, i), i);
                return NULL;
            }
        }
    }
    if (((uintptr_t)PyArray_DATA(a)) % (uintptr_t)isz) {
        PyErr_Format(PyExc_ValueError, "%s: %s is not aligned to its %d-byte items", s->op, s->name, isz);
        return NULL;
    }
    if (s->writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be writeable", s->op, s->name);
        return NULL;
    }
    return a;
}

PyObject *qn_raise_status(qn_status st) {
    PyObject *exc = PyExc_RuntimeError;
    switch (st) {
    case QN_EINVAL: exc = PyExc_ValueError; break;
    case QN_ENOMEM: exc = PyExc_MemoryError; break;
    case QN_EUNSUPPORTED: exc = PyExc_NotImplementedError; break;
    default: break;
    }
    PyErr_SetString(exc, qn_last_error());
    return NULL;
}

extern int qn_py_nthreads; /* module.c */

void qn_py_apply_threads(void) {
#ifdef _OPENMP
    if (omp_get_max_threads() != qn_py_nthreads) omp_set_num_threads(qn_py_nthreads);
#endif
}

#define QN_WS_KEEP_MAX ((int64_t)256 << 20)
static _Thread_local void *g_ws = NULL;
static _Thread_local int64_t g_ws_bytes = 0;

void *qn_py_workspace(int64_t bytes) {
    if (bytes < 64) bytes = 64;
    if (bytes > QN_WS_KEEP_MAX) {
        void *p = aligned_alloc(64, (size_t)qn_round_up(bytes, 64));
        if (!p) PyErr_Format(PyExc_MemoryError, "cannot allocate %lld bytes of workspace", (long long)bytes);
        return p;
    }
    if (bytes > g_ws_bytes) {
        free(g_ws);
        int64_t want = qn_round_up(bytes + bytes / 4, 4096);
        g_ws = aligned_alloc(64, (size_t)want);
        g_ws_bytes = g_ws ? want : 0;
        if (!g_ws) {
            PyErr_Format(PyExc_MemoryError, "cannot allocate %lld bytes of workspace", (long long)bytes);
            return NULL;
        }
    }
    return g_ws;
}

void qn_py_workspace_release(void *p) {
    if (p && p != g_ws) free(p);
}

const qn_format *qn_py_format(PyObject *obj, const char *op) {
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != (Py_ssize_t)sizeof(qn_format)) {
        PyErr_Format(PyExc_TypeError, "%s: format must be the bytes of quanta.formats.Format._c", op);
        return NULL;
    }
    return (const qn_format *)PyBytes_AS_STRING(obj);
}

int qn_py_check_nargs(const char *op, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected %zd arguments, got %zd", op, want, nargs);
    return -1;
}

int qn_py_get_i64(PyObject *o, const char *op, const char *name, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be an int", op, name);
        return -1;
    }
    *out = v;
    return 0;
}

int qn_py_get_f32(PyObject *o, const char *op, const char *name, float *out) {
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be a float", op, name);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int qn_py_nthreads_now(void) { return qn_omp_max_threads(); }

/* [lowest, highest) byte address an array touches, for any strides. */
static void byte_span(PyArrayObject *a, const char **lo, const char **hi) {
    const char *l = PyArray_BYTES(a), *h = PyArray_BYTES(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp ext = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (ext < 0) l += ext; else h += ext;
    }
    *lo = l;
    *hi = h + PyArray_ITEMSIZE(a);
}

int qn_py_overlaps(PyArrayObject *a, PyArrayObject *b) {
    if (PyArray_SIZE(a) == 0 || PyArray_SIZE(b) == 0) return 0;
    const char *a0, *a1, *b0, *b1;
    byte_span(a, &a0, &a1);
    byte_span(b, &b0, &b1);
    return a0 < b1 && b0 < a1;
}
