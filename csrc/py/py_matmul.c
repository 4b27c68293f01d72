/* py_matmul.c — binding for the float-weight matmul y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * matmul(x, xdtype, w, wdtype, out) -> out, positional (METH_FASTCALL). x and w are 2-D
 * arrays with contiguous rows (x's rows may be strided) in the dtype their code names
 * (0 float32, 1 float16, 2 bfloat16); out is None or a writeable float32 [M, N] array with
 * contiguous rows that overlaps neither input. The kernel runs without the GIL.
 */
#include "args.h"

#include "../kernels/matmul.h"



static void shape_of(char *buf, size_t n, PyArrayObject *a) {
    size_t u = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < PyArray_NDIM(a) && u < n; i++)
        u += (size_t)snprintf(buf + u, n - u, i ? ", %lld" : "%lld", (long long)PyArray_DIM(a, i));
    if (u < n) snprintf(buf + u, n - u, PyArray_NDIM(a) == 1 ? ",)" : ")");
}

/* A 2-D operand of dtype dt and shape (d0, d1); a negative size is any and prints as its
 * letter. Dtype and shape errors name both: "matmul: x must be float32 with shape (M, 4096),
 * got float64 with shape (3, 4096)"; then qn_check_array checks strides, alignment, writeability. */
static PyArrayObject *operand(PyObject *obj, const char *name, int dt, int64_t d0, const char *l0, int64_t d1,
                              const char *l1, int writeable) {
    char want[96], got[96];
    char s0[24], s1[24];
    if (d0 >= 0) snprintf(s0, sizeof s0, "%lld", (long long)d0); else snprintf(s0, sizeof s0, "%s", l0);
    if (d1 >= 0) snprintf(s1, sizeof s1, "%lld", (long long)d1); else snprintf(s1, sizeof s1, "%s", l1);
    snprintf(want, sizeof want, "%s with shape (%s, %s)", qn_dtype_name(dt), s0, s1);
    if (!PyArray_Check(obj))
        return (PyArrayObject *)PyErr_Format(PyExc_TypeError, "matmul: %s must be a numpy array of %s, got %s", name,
                                             want, Py_TYPE(obj)->tp_name);
    PyArrayObject *a = (PyArrayObject *)obj;
    qn_arrspec dts = {"matmul", name, dt, -1, {-1, -1, -1, -1}, 0, 0, 0};
    int bad_dtype = 0;
    if (!qn_check_array(obj, &dts)) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) return NULL;
        PyErr_Clear();
        bad_dtype = 1;
    }
    int bad_shape = PyArray_NDIM(a) != 2 || (d0 >= 0 && PyArray_DIM(a, 0) != d0) || (d1 >= 0 && PyArray_DIM(a, 1) != d1);
    if (bad_dtype || bad_shape) {
        PyObject *dn = PyObject_Str((PyObject *)PyArray_DESCR(a));
        shape_of(got, sizeof got, a);
        PyErr_Format(bad_dtype ? PyExc_TypeError : PyExc_ValueError, "matmul: %s must be %s, got %s with shape %s", name,
                     want, dn ? PyUnicode_AsUTF8(dn) : "?", got);
        Py_XDECREF(dn);
        return NULL;
    }
    /* an empty array's strides are arbitrary and never used */
    qn_arrspec s = {"matmul", name, dt, 2, {d0, d1, -1, -1}, writeable, PyArray_SIZE(a) > 0, 0};
    return qn_check_array(obj, &s);
}

static int dtype_code(PyObject *o, const char *name, int *out) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "matmul: %s must be an int dtype code, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    if (v < QN_DT_F32 || v > QN_DT_BF16) {
        PyErr_Format(PyExc_ValueError, "matmul: %s must be 0 (float32), 1 (float16) or 2 (bfloat16), got %ld", name, v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Byte ranges [first, last) spanned by two 2-D arrays intersect. */

/* Row stride in elements; a single row has none, so it reads as the row length. */
static int64_t row_stride(PyArrayObject *a) {
    return PyArray_DIM(a, 0) > 1 ? PyArray_STRIDE(a, 0) / PyArray_ITEMSIZE(a) : PyArray_DIM(a, 1);
}

/* matmul(x, xdtype, w, wdtype, out) -> out: out[M, N] = x[M, K] @ w[N, K]^T in fp32 */
PyObject *qn_py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) return PyErr_Format(PyExc_TypeError, "matmul: expected 5 arguments, got %zd", nargs);
    int xdt, wdt;
    if (dtype_code(args[1], "xdtype", &xdt) || dtype_code(args[3], "wdtype", &wdt)) return NULL;
    PyArrayObject *w = operand(args[2], "w", wdt, -1, "N", -1, "K", 0);
    if (!w) return NULL;
    int64_t N = PyArray_DIM(w, 0), K = PyArray_DIM(w, 1);
    if (N == 0 || K == 0)
        return PyErr_Format(PyExc_ValueError, "matmul: w must have N > 0 and K > 0, got shape (%lld, %lld)",
                            (long long)N, (long long)K);
    PyArrayObject *x = operand(args[0], "x", xdt, -1, "M", K, "K", 0);
    if (!x) return NULL;
    int64_t M = PyArray_DIM(x, 0);
    PyArrayObject *out;
    if (args[4] == Py_None) {
        npy_intp dims[2] = {(npy_intp)M, (npy_intp)N};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!out) return NULL;
    } else {
        out = operand(args[4], "out", QN_DT_F32, M, "M", N, "N", 1);
        if (!out) return NULL;
        if (qn_py_overlaps(out, x)) return PyErr_Format(PyExc_ValueError, "matmul: out overlaps x");
        if (qn_py_overlaps(out, w)) return PyErr_Format(PyExc_ValueError, "matmul: out overlaps w");
        Py_INCREF(out);
    }
    if (M == 0) return (PyObject *)out;
    int64_t ldx = row_stride(x), ldw = row_stride(w), ldy = row_stride(out);
    if (ldx < K || ldw < K || ldy < N) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "matmul: rows of %s must not overlap (row stride %lld < %lld)",
                            ldx < K ? "x" : ldw < K ? "w" : "out", (long long)(ldx < K ? ldx : ldw < K ? ldw : ldy),
                            (long long)(ldx < K || ldw < K ? K : N));
    }
    qn_py_apply_threads();
    int64_t wsb = qn_matmul_workspace_size(M, N, K, xdt, wdt, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) {
        Py_DECREF(out);
        return NULL;
    }
    qn_status st;
    float *y = (float *)PyArray_DATA(out);
    const void *xp = PyArray_DATA(x), *wp = PyArray_DATA(w);
    Py_BEGIN_ALLOW_THREADS
    st = qn_matmul(y, xp, xdt, wp, wdt, M, N, K, ldx, ldw, ldy, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) {
        Py_DECREF(out);
        return qn_raise_status(st);
    }
    return (PyObject *)out;
}
