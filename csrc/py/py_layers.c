/* py_layers.c — binding for the elementwise layer kernels: rmsnorm (with the fused residual
 * add), add, silu_mul, gelu_mul and rope. Positional arguments (METH_FASTCALL); quanta.ops flattens
 * shapes and supplies defaults; every array is validated here and the GIL is released
 * around each kernel. */
#include "args.h"

#include "../kernels/act.h"
#include "../kernels/norm.h"
#include "../kernels/rope.h"

static const int float_dt[3] = {QN_DT_F32, QN_DT_F16, QN_DT_BF16};


static int get_code(PyObject *o, const char *op, const char *name, int *out) {
    long v = PyLong_AsLong(o);
    if ((v == -1 && PyErr_Occurred()) || v < 0 || v > 2) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: bad dtype code for %s", op, name);
        return -1;
    }
    *out = (int)v;
    return 0;
}


/* out validated as writeable float32 C-contiguous of x's shape, or a new array (new ref) */
static PyArrayObject *get_out(const char *op, PyObject *obj, PyArrayObject *like) {
    if (obj == Py_None)
        return (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(like), PyArray_DIMS(like), NPY_FLOAT32);
    qn_arrspec so = {op, "out", QN_DT_F32, PyArray_NDIM(like), {-1, -1, -1, -1}, 1, 0, 1};
    for (int i = 0; i < PyArray_NDIM(like) && i < 4; i++) so.shape[i] = PyArray_DIM(like, i);
    PyArrayObject *o = qn_check_array(obj, &so);
    if (o) Py_INCREF(o);
    return o;
}

/* rmsnorm(x[M, N], xdtype, w[N], eps, residual[M, N] or None, out) -> out */
PyObject *qn_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "rmsnorm";
    if (qn_py_check_nargs(op, nargs, 6)) return NULL;
    int dt;
    if (get_code(args[1], op, "x", &dt)) return NULL;
    double eps = PyFloat_AsDouble(args[3]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    qn_arrspec sx = {op, "x", float_dt[dt], 2, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *x = qn_check_array(args[0], &sx);
    if (!x) return NULL;
    int64_t M = PyArray_DIM(x, 0), N = PyArray_DIM(x, 1);
    qn_arrspec sw = {op, "weight", QN_DT_F32, 1, {N, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *w = qn_check_array(args[2], &sw);
    if (!w) return NULL;
    PyArrayObject *res = NULL;
    if (args[4] != Py_None) {
        qn_arrspec sr = {op, "residual", QN_DT_F32, 2, {M, N, -1, -1}, 1, 0, 1};
        if (!(res = qn_check_array(args[4], &sr))) return NULL;
        if (qn_py_overlaps(res, x)) return PyErr_Format(PyExc_ValueError, "%s: residual must not overlap x", op);
    }
    PyArrayObject *out = get_out(op, args[5], x);
    if (!out) return NULL;
    if (args[5] != Py_None && (qn_py_overlaps(out, x) || qn_py_overlaps(out, w) || (res && qn_py_overlaps(out, res)))) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "%s: out must not overlap x, weight or residual", op);
    }
    if (N == 0) return (PyObject *)out;
    qn_py_apply_threads();
    qn_status st;
    float *y = PyArray_DATA(out), *r = res ? PyArray_DATA(res) : NULL;
    const void *xp = PyArray_DATA(x);
    const float *wp = PyArray_DATA(w);
    Py_BEGIN_ALLOW_THREADS
    st = qn_rmsnorm(y, r, xp, dt, wp, M, N, (float)eps);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

/* add(a[n], adtype, b[n], bdtype, out) -> out; out may be a or b itself (in place) */
PyObject *qn_py_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "add";
    if (qn_py_check_nargs(op, nargs, 5)) return NULL;
    int adt, bdt;
    if (get_code(args[1], op, "a", &adt) || get_code(args[3], op, "b", &bdt)) return NULL;
    qn_arrspec sa = {op, "a", float_dt[adt], 1, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *a = qn_check_array(args[0], &sa);
    if (!a) return NULL;
    qn_arrspec sb = {op, "b", float_dt[bdt], 1, {PyArray_DIM(a, 0), -1, -1, -1}, 0, 0, 1};
    PyArrayObject *b = qn_check_array(args[2], &sb);
    if (!b) return NULL;
    PyArrayObject *out = get_out(op, args[4], a);
    if (!out) return NULL;
    for (int i = 0; i < 2 && args[4] != Py_None; i++) {
        PyArrayObject *in = i ? b : a;
        int same = PyArray_DATA(in) == PyArray_DATA(out) && PyArray_ITEMSIZE(in) == 4;
        if (qn_py_overlaps(out, in) && !same) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_ValueError, "%s: out must be a float32 input itself or not overlap it", op);
        }
    }
    qn_py_apply_threads();
    qn_status st;
    float *y = PyArray_DATA(out);
    const void *ap = PyArray_DATA(a), *bp = PyArray_DATA(b);
    int64_t n = PyArray_DIM(a, 0);
    Py_BEGIN_ALLOW_THREADS
    st = qn_add(y, ap, adt, bp, bdt, n);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

typedef qn_status (*act_mul_fn)(float *, const void *, const void *, int, int64_t);

/* act(gate[n], up[n], dtype, out) -> out for the gated activations (silu_mul, gelu_mul) */
static PyObject *act_mul(const char *op, act_mul_fn fn, PyObject *const *args, Py_ssize_t nargs) {
    if (qn_py_check_nargs(op, nargs, 4)) return NULL;
    int dt;
    if (get_code(args[2], op, "gate", &dt)) return NULL;
    qn_arrspec sg = {op, "gate", float_dt[dt], 1, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *g = qn_check_array(args[0], &sg);
    if (!g) return NULL;
    qn_arrspec su = {op, "up", float_dt[dt], 1, {PyArray_DIM(g, 0), -1, -1, -1}, 0, 0, 1};
    PyArrayObject *u = qn_check_array(args[1], &su);
    if (!u) return NULL;
    PyArrayObject *out = get_out(op, args[3], g);
    if (!out) return NULL;
    /* elementwise: out may be gate or up itself, but not a shifted overlap of them */
    if (args[3] != Py_None && ((qn_py_overlaps(out, g) && PyArray_DATA(out) != PyArray_DATA(g)) ||
                               (qn_py_overlaps(out, u) && PyArray_DATA(out) != PyArray_DATA(u)))) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "%s: out must be gate, up, or not overlap them", op);
    }
    qn_py_apply_threads();
    qn_status st;
    float *y = PyArray_DATA(out);
    const void *gp = PyArray_DATA(g), *up = PyArray_DATA(u);
    int64_t n = PyArray_DIM(g, 0);
    Py_BEGIN_ALLOW_THREADS
    st = fn(y, gp, up, dt, n);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

/* silu_mul(gate[n], up[n], dtype, out) -> out */
PyObject *qn_py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return act_mul("silu_mul", qn_silu_mul_any, args, nargs);
}

/* gelu_mul(gate[n], up[n], dtype, out) -> out: gelu_tanh(gate) * up */
PyObject *qn_py_gelu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return act_mul("gelu_mul", qn_gelu_tanh_mul_any, args, nargs);
}

/* rope(x[T, nh, D] float32, positions[T] int32, inv_freq[rot / 2] float64, mscale, neox): in place */
PyObject *qn_py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "rope";
    if (qn_py_check_nargs(op, nargs, 5)) return NULL;
    qn_arrspec sx = {op, "x", QN_DT_F32, 3, {-1, -1, -1, -1}, 1, 0, 1};
    PyArrayObject *x = qn_check_array(args[0], &sx);
    if (!x) return NULL;
    int64_t T = PyArray_DIM(x, 0), nh = PyArray_DIM(x, 1), D = PyArray_DIM(x, 2);
    qn_arrspec sp = {op, "positions", QN_DT_I32, 1, {T, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *pos = qn_check_array(args[1], &sp);
    if (!pos) return NULL;
    qn_arrspec sf = {op, "inv_freq", QN_DT_F64, 1, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *fr = qn_check_array(args[2], &sf);
    if (!fr) return NULL;
    double mscale = PyFloat_AsDouble(args[3]);
    if (mscale == -1.0 && PyErr_Occurred()) return NULL;
    int neox = PyObject_IsTrue(args[4]);
    if (neox < 0) return NULL;
    if (T == 0 || nh == 0) Py_RETURN_NONE;
    qn_py_apply_threads();
    qn_status st;
    float *xp = PyArray_DATA(x);
    const int32_t *pp = PyArray_DATA(pos);
    const double *fp = PyArray_DATA(fr);
    int64_t rot = 2 * PyArray_DIM(fr, 0);
    Py_BEGIN_ALLOW_THREADS
    st = qn_rope(xp, pp, fp, T, nh, D, rot, (float)mscale, neox);
    Py_END_ALLOW_THREADS
    if (st) return qn_raise_status(st);
    Py_RETURN_NONE;
}
