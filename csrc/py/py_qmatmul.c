/* py_qmatmul.c — binding for formats, quantize/dequantize, code packing and qmatmul.
 * Arguments are positional (METH_FASTCALL); keywords and defaults live in quanta.ops. */
#include "args.h"

#include "../kernels/qmatmul.h"
#include "../kernels/quantize.h"





PyObject *qn_py_make_format(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("make_format", nargs, 8)) return NULL;
    qn_format f;
    memset(&f, 0, sizeof f);
    int64_t v[7];
    static const char *names[7] = {"bits", "group", "kind", "offset", "scale", "rule", "lut_kind"};
    for (int i = 0; i < 7; i++)
        if (qn_py_get_i64(args[i], "make_format", names[i], &v[i])) return NULL;
    f.bits = (int32_t)v[0];
    f.group = (int32_t)v[1];
    f.kind = (int32_t)v[2];
    f.offset = (int32_t)v[3];
    f.scale = (int32_t)v[4];
    f.rule = (int32_t)v[5];
    f.lut_kind = (int32_t)v[6];
    if (f.kind == QN_LUT) {
        if (f.bits < 2 || f.bits > 8) return PyErr_Format(PyExc_ValueError, "make_format: bad bits %d", f.bits);
        qn_arrspec s = {"make_format", "lut", QN_DT_F32, 1, {1LL << f.bits, -1, -1, -1}, 0, 0, 1};
        PyArrayObject *lut = qn_check_array(args[7], &s);
        if (!lut) return NULL;
        memcpy(f.lut, PyArray_DATA(lut), sizeof(float) << f.bits);
    } else if (args[7] != Py_None) {
        return PyErr_Format(PyExc_ValueError, "make_format: only lut formats take a table");
    }
    qn_status st = qn_format_check(&f);
    if (st) return qn_raise_status(st);
    return PyBytes_FromStringAndSize((const char *)&f, sizeof f);
}

/* Validates the arrays of a quantized matrix against the layout of fmt, N, K. */
static int get_qweight(const char *op, const qn_format *f, int64_t N, int64_t K, PyObject *const *arr,
                       int writeable, qn_qweight *w) {
    qn_status st = qn_format_check_k(f, K);
    if (st) { qn_raise_status(st); return -1; }
    if (N <= 0) { PyErr_Format(PyExc_ValueError, "%s: N must be positive, got %lld", op, (long long)N); return -1; }
    int64_t np = qn_npanels(N), Kp = qn_fmt_kpad(f, K), ng = qn_fmt_ngroups(f, K);
    int64_t pbytes = (Kp / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    int nested = qn_fmt_nested(f);
    int sdt = f->scale == QN_SCALE_F32 ? QN_DT_F32 : f->scale == QN_SCALE_F16 ? QN_DT_F16
            : f->scale == QN_SCALE_BF16 ? QN_DT_U16 : f->scale == QN_SCALE_NESTED_I8 ? QN_DT_I8 : QN_DT_U8;
    qn_arrspec sc = {op, "codes", QN_DT_U8, 2, {np, pbytes, -1, -1}, writeable, 0, 1};
    PyArrayObject *codes = qn_check_array(arr[0], &sc);
    if (!codes) return -1;
    qn_arrspec ss = {op, "scales", sdt, 3, {np, ng, QN_PANEL, -1}, writeable, 0, 1};
    PyArrayObject *scales = qn_check_array(arr[1], &ss);
    if (!scales) return -1;
    memset(w, 0, sizeof *w);
    w->fmt = f;
    w->N = N;
    w->K = K;
    w->codes = PyArray_DATA(codes);
    w->scales = PyArray_DATA(scales);
    if (f->offset != QN_OFF_NONE) {
        int odt = (f->offset == QN_OFF_ZERO || nested) ? QN_DT_U8 : sdt;
        qn_arrspec so = {op, "offsets", odt, 3, {np, ng, QN_PANEL, -1}, writeable, 0, 1};
        PyArrayObject *o = qn_check_array(arr[2], &so);
        if (!o) return -1;
        w->offsets = PyArray_DATA(o);
    } else if (arr[2] != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: offsets must be None for this format", op);
        return -1;
    }
    if (nested) {
        qn_arrspec sp = {op, "supers", QN_DT_F16, 3, {np, Kp / QN_SUPER, QN_PANEL, -1}, writeable, 0, 1};
        PyArrayObject *s = qn_check_array(arr[3], &sp);
        if (!s) return -1;
        w->supers = PyArray_DATA(s);
        if (f->scale == QN_SCALE_NESTED_U6) {
            sp.name = "super_mins";
            PyArrayObject *m = qn_check_array(arr[4], &sp);
            if (!m) return -1;
            w->super_mins = PyArray_DATA(m);
        } else if (arr[4] != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: super_mins must be None for this format", op);
            return -1;
        }
    } else if (arr[3] != Py_None || arr[4] != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: supers and super_mins must be None for this format", op);
        return -1;
    }
    return 0;
}

int qn_py_get_qweight(const char *op, const qn_format *f, int64_t N, int64_t K, PyObject *const *arr, int writeable,
                      qn_qweight *w) {
    return get_qweight(op, f, N, K, arr, writeable, w);
}

/* quantize(w, fmt, codes, scales, offsets, supers, super_mins) */
PyObject *qn_py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("quantize", nargs, 7)) return NULL;
    const qn_format *f = qn_py_format(args[1], "quantize");
    if (!f) return NULL;
    qn_arrspec sw = {"quantize", "w", QN_DT_F32, 2, {-1, -1, -1, -1}, 0, 1, 0};
    PyArrayObject *w = qn_check_array(args[0], &sw);
    if (!w) return NULL;
    int64_t N = PyArray_DIM(w, 0), K = PyArray_DIM(w, 1);
    if (N == 0 || K == 0) return PyErr_Format(PyExc_ValueError, "quantize: w must not be empty, got shape (%lld, %lld)", (long long)N, (long long)K);
    qn_qweight qw;
    if (get_qweight("quantize", f, N, K, args + 2, 1, &qw)) return NULL;
    qn_qweight_out out = {(uint8_t *)qw.codes, (void *)qw.scales, (void *)qw.offsets, (uint16_t *)qw.supers,
                          (uint16_t *)qw.super_mins};
    qn_py_apply_threads();
    int64_t wsb = qn_quantize_workspace_size(f, K, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) return NULL;
    qn_status st;
    int64_t ldw = PyArray_DIM(w, 1) > 1 || N == 1 ? PyArray_STRIDE(w, 0) / 4 : K;
    Py_BEGIN_ALLOW_THREADS
    st = qn_quantize(f, (const float *)PyArray_DATA(w), N, K, ldw, &out, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) return qn_raise_status(st);
    Py_RETURN_NONE;
}

/* gptq(W[N, K] f32, fmt, U[K, K] f32, cols int64[K] or None, block, static_params,
 *      codes, scales, offsets, supers, super_mins) -> loss */
PyObject *qn_py_gptq(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("gptq", nargs, 11)) return NULL;
    qn_arrspec sw = {"gptq", "W", QN_DT_F32, 2, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *w = qn_check_array(args[0], &sw);
    if (!w) return NULL;
    const qn_format *f = qn_py_format(args[1], "gptq");
    if (!f) return NULL;
    int64_t N = PyArray_DIM(w, 0), K = PyArray_DIM(w, 1);
    if (N == 0 || K == 0) return PyErr_Format(PyExc_ValueError, "gptq: W must not be empty, got shape (%lld, %lld)", (long long)N, (long long)K);
    qn_arrspec su = {"gptq", "U", QN_DT_F32, 2, {K, K, -1, -1}, 0, 0, 1};
    PyArrayObject *u = qn_check_array(args[2], &su);
    if (!u) return NULL;
    const int64_t *cols = NULL;
    if (args[3] != Py_None) {
        qn_arrspec sc = {"gptq", "cols", QN_DT_I64, 1, {K, -1, -1, -1}, 0, 0, 1};
        PyArrayObject *c = qn_check_array(args[3], &sc);
        if (!c) return NULL;
        cols = (const int64_t *)PyArray_DATA(c);
    }
    int64_t block, stat;
    if (qn_py_get_i64(args[4], "gptq", "block", &block) || qn_py_get_i64(args[5], "gptq", "static_params", &stat))
        return NULL;
    qn_qweight qw;
    if (get_qweight("gptq", f, N, K, args + 6, 1, &qw)) return NULL;
    qn_qweight_out out = {(uint8_t *)qw.codes, (void *)qw.scales, (void *)qw.offsets, (uint16_t *)qw.supers,
                          (uint16_t *)qw.super_mins};
    qn_py_apply_threads();
    qn_status st;
    double loss = 0.0;
    const float *W = (const float *)PyArray_DATA(w), *U = (const float *)PyArray_DATA(u);
    Py_BEGIN_ALLOW_THREADS
    st = qn_gptq(f, W, N, K, U, cols, block, stat != 0, &out, &loss);
    Py_END_ALLOW_THREADS
    if (st) return qn_raise_status(st);
    return PyFloat_FromDouble(loss);
}

/* dequantize(fmt, N, K, codes, scales, offsets, supers, super_mins) -> float32[N, K] */
PyObject *qn_py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("dequantize", nargs, 8)) return NULL;
    const qn_format *f = qn_py_format(args[0], "dequantize");
    if (!f) return NULL;
    int64_t N, K;
    if (qn_py_get_i64(args[1], "dequantize", "N", &N) || qn_py_get_i64(args[2], "dequantize", "K", &K)) return NULL;
    qn_qweight qw;
    if (get_qweight("dequantize", f, N, K, args + 3, 0, &qw)) return NULL;
    npy_intp dims[2] = {(npy_intp)N, (npy_intp)K};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) return NULL;
    qn_py_apply_threads();
    qn_status st;
    float *o = (float *)PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS
    st = qn_dequantize(o, &qw, K);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

/* pack_codes(codes[N, K] uint8, bits) -> uint8[n_panels, panel_bytes] */
PyObject *qn_py_pack_codes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("pack_codes", nargs, 2)) return NULL;
    qn_arrspec s = {"pack_codes", "codes", QN_DT_U8, 2, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *c = qn_check_array(args[0], &s);
    if (!c) return NULL;
    int64_t bits;
    if (qn_py_get_i64(args[1], "pack_codes", "bits", &bits)) return NULL;
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8))
        return PyErr_Format(PyExc_ValueError, "pack_codes: bits must be 2, 3, 4, 5, 6 or 8, got %lld", (long long)bits);
    int64_t N = PyArray_DIM(c, 0), K = PyArray_DIM(c, 1);
    if (N == 0 || K % QN_CHUNK || K == 0)
        return PyErr_Format(PyExc_ValueError, "pack_codes: codes must be non-empty with K a multiple of 32, got (%lld, %lld)", (long long)N, (long long)K);
    npy_intp dims[2] = {(npy_intp)qn_npanels(N), (npy_intp)((K / QN_CHUNK) * QN_CHUNK_BYTES(bits))};
    PyArrayObject *out = (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_UINT8, 0);
    if (!out) return NULL;
    qn_py_apply_threads();
    qn_status st;
    uint8_t *o = PyArray_DATA(out);
    const uint8_t *ci = PyArray_DATA(c);
    Py_BEGIN_ALLOW_THREADS
    st = qn_pack_codes(o, ci, (int)bits, N, K, K);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

/* unpack_codes(panel_codes, bits, N, K) -> uint8[N, K] */
PyObject *qn_py_unpack_codes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("unpack_codes", nargs, 4)) return NULL;
    int64_t bits, N, K;
    if (qn_py_get_i64(args[1], "unpack_codes", "bits", &bits) || qn_py_get_i64(args[2], "unpack_codes", "N", &N) ||
        qn_py_get_i64(args[3], "unpack_codes", "K", &K))
        return NULL;
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8) || N <= 0 || K <= 0 || K % QN_CHUNK)
        return PyErr_Format(PyExc_ValueError, "unpack_codes: bad bits/N/K (%lld, %lld, %lld)", (long long)bits, (long long)N, (long long)K);
    qn_arrspec s = {"unpack_codes", "codes", QN_DT_U8, 2, {qn_npanels(N), (K / QN_CHUNK) * QN_CHUNK_BYTES(bits), -1, -1}, 0, 0, 1};
    PyArrayObject *c = qn_check_array(args[0], &s);
    if (!c) return NULL;
    npy_intp dims[2] = {(npy_intp)N, (npy_intp)K};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_UINT8);
    if (!out) return NULL;
    qn_py_apply_threads();
    qn_status st;
    uint8_t *o = PyArray_DATA(out);
    const uint8_t *ci = PyArray_DATA(c);
    Py_BEGIN_ALLOW_THREADS
    st = qn_unpack_codes(o, ci, (int)bits, N, K, K);
    Py_END_ALLOW_THREADS
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}


/* qmatmul(x, xdtype, fmt, N, K, codes, scales, offsets, supers, super_mins, out) -> out */
PyObject *qn_py_qmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("qmatmul", nargs, 11)) return NULL;
    int64_t xdt, N, K;
    if (qn_py_get_i64(args[1], "qmatmul", "xdtype", &xdt) || qn_py_get_i64(args[3], "qmatmul", "N", &N) ||
        qn_py_get_i64(args[4], "qmatmul", "K", &K))
        return NULL;
    if (xdt < QN_DT_F32 || xdt > QN_DT_BF16) return PyErr_Format(PyExc_ValueError, "qmatmul: bad xdtype %lld", (long long)xdt);
    const qn_format *f = qn_py_format(args[2], "qmatmul");
    if (!f) return NULL;
    qn_arrspec sx = {"qmatmul", "x", (int)xdt, 2, {-1, K, -1, -1}, 0, 1, 0};
    PyArrayObject *x = qn_check_array(args[0], &sx);
    if (!x) return NULL;
    qn_qweight qw;
    if (get_qweight("qmatmul", f, N, K, args + 5, 0, &qw)) return NULL;
    int64_t M = PyArray_DIM(x, 0);
    PyArrayObject *out;
    if (args[10] == Py_None) {
        npy_intp dims[2] = {(npy_intp)M, (npy_intp)N};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!out) return NULL;
    } else {
        qn_arrspec so = {"qmatmul", "out", QN_DT_F32, 2, {M, N, -1, -1}, 1, 1, 0};
        out = qn_check_array(args[10], &so);
        if (!out) return NULL;
        if (qn_py_overlaps(out, x)) return PyErr_Format(PyExc_ValueError, "qmatmul: out overlaps x");
        Py_INCREF(out);
    }
    if (M == 0) return (PyObject *)out;
    int64_t isz = xdt == QN_DT_F32 ? 4 : 2;
    int64_t ldx = M > 1 ? PyArray_STRIDE(x, 0) / isz : K;
    int64_t ldy = M > 1 ? PyArray_STRIDE(out, 0) / 4 : N;
    if (ldx < K || ldy < N) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "qmatmul: x and out rows must not overlap");
    }
    qn_py_apply_threads();
    int64_t wsb = qn_qmatmul_workspace_size(&qw, M, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) { Py_DECREF(out); return NULL; }
    qn_status st;
    float *y = (float *)PyArray_DATA(out);
    const void *xp = PyArray_DATA(x);
    Py_BEGIN_ALLOW_THREADS
    st = qn_qmatmul(y, &qw, xp, (int)xdt, M, ldx, ldy, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}
