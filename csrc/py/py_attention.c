/* py_attention.c — binding for prefill attention and paged decode attention.
 * Arguments are positional (METH_FASTCALL); keywords, defaults and dtype codes live in
 * quanta.ops. Every array is validated here, shapes are re-checked against each other,
 * and the kernels run with the GIL released. */
#include "args.h"

#include "../kernels/attention.h"







static const int float_dt[3] = {QN_DT_F32, QN_DT_F16, QN_DT_BF16};

/* Output: a new float32 array of dims, or `out` validated against them (new reference). */
static PyArrayObject *get_out(const char *op, PyObject *obj, int64_t d0, int64_t d1, int64_t d2) {
    if (obj == Py_None) {
        npy_intp dims[3] = {(npy_intp)d0, (npy_intp)d1, (npy_intp)d2};
        return (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    }
    qn_arrspec so = {op, "out", QN_DT_F32, 3, {d0, d1, d2, -1}, 1, 0, 1};
    PyArrayObject *o = qn_check_array(obj, &so);
    if (o) Py_INCREF(o);
    return o;
}

/* attention(q, k, v, dtype, causal, window, softcap, scale, cu_q, cu_k, out) -> out[T, H, D] */
PyObject *qn_py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "attention";
    if (qn_py_check_nargs(op, nargs, 11)) return NULL;
    int64_t dt, causal, window;
    float softcap, scale;
    if (qn_py_get_i64(args[3], op, "dtype", &dt) || qn_py_get_i64(args[4], op, "causal", &causal) ||
        qn_py_get_i64(args[5], op, "window", &window) || qn_py_get_f32(args[6], op, "softcap", &softcap) ||
        qn_py_get_f32(args[7], op, "scale", &scale))
        return NULL;
    if (dt < 0 || dt > 2) return PyErr_Format(PyExc_ValueError, "%s: bad dtype code %lld", op, (long long)dt);
    qn_arrspec sq = {op, "q", float_dt[dt], 3, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *q = qn_check_array(args[0], &sq);
    if (!q) return NULL;
    int64_t T = PyArray_DIM(q, 0), H = PyArray_DIM(q, 1), D = PyArray_DIM(q, 2);
    qn_arrspec sk = {op, "k", float_dt[dt], 3, {-1, -1, D, -1}, 0, 0, 1};
    PyArrayObject *k = qn_check_array(args[1], &sk);
    if (!k) return NULL;
    int64_t S = PyArray_DIM(k, 0), Hkv = PyArray_DIM(k, 1);
    qn_arrspec sv = {op, "v", float_dt[dt], 3, {S, Hkv, D, -1}, 0, 0, 1};
    PyArrayObject *v = qn_check_array(args[2], &sv);
    if (!v) return NULL;
    if (H == 0 || D == 0 || Hkv == 0 || H % Hkv)
        return PyErr_Format(PyExc_ValueError, "%s: q heads H=%lld must be a positive multiple of k/v heads Hkv=%lld "
                            "(and D=%lld positive)", op, (long long)H, (long long)Hkv, (long long)D);
    const int32_t *cu_q = NULL, *cu_k = NULL;
    int64_t n_seq = 0;
    if ((args[8] == Py_None) != (args[9] == Py_None))
        return PyErr_Format(PyExc_ValueError, "%s: cu_seqlens_q and cu_seqlens_k must be given together", op);
    if (args[8] != Py_None) {
        qn_arrspec sc = {op, "cu_seqlens_q", QN_DT_I32, 1, {-1, -1, -1, -1}, 0, 0, 1};
        PyArrayObject *cq = qn_check_array(args[8], &sc);
        if (!cq) return NULL;
        if (PyArray_DIM(cq, 0) < 1)
            return PyErr_Format(PyExc_ValueError, "%s: cu_seqlens_q must have at least one entry", op);
        sc.name = "cu_seqlens_k";
        sc.shape[0] = PyArray_DIM(cq, 0);
        PyArrayObject *ck = qn_check_array(args[9], &sc);
        if (!ck) return NULL;
        cu_q = PyArray_DATA(cq);
        cu_k = PyArray_DATA(ck);
        n_seq = PyArray_DIM(cq, 0) - 1;
    }
    PyArrayObject *out = get_out(op, args[10], T, H, D);
    if (!out) return NULL;
    if (args[10] != Py_None && (qn_py_overlaps(out, q) || qn_py_overlaps(out, k) || qn_py_overlaps(out, v))) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "%s: out must not overlap q, k or v", op);
    }
    qn_attn_params p = {PyArray_DATA(out), PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), (int)dt, (int)dt,
                        T, S, H, Hkv, D, causal != 0, window, scale, softcap, cu_q, cu_k, n_seq};
    qn_py_apply_threads();
    int64_t wsb = qn_attention_workspace_size(&p, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) { Py_DECREF(out); return NULL; }
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_attention(&p, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) { Py_DECREF(out); return qn_raise_status(st); }
    return (PyObject *)out;
}

/* paged_attention(q, k_cache, v_cache, k_scale, v_scale, qdtype, kvdtype, block_tables, seq_lens,
 *                 scale, softcap, out) -> out[B, H, D]
 * kvdtype: 0 f32, 1 f16, 2 bf16, 3 int8, 4 fp8 e4m3 (cache arrays viewed as uint8). */
PyObject *qn_py_paged_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "paged_attention";
    if (qn_py_check_nargs(op, nargs, 13)) return NULL;
    int64_t qdt, kvdt, window;
    if (qn_py_get_i64(args[12], op, "window", &window)) return NULL;
    float scale, softcap;
    if (qn_py_get_i64(args[5], op, "qdtype", &qdt) || qn_py_get_i64(args[6], op, "kvdtype", &kvdt) ||
        qn_py_get_f32(args[9], op, "scale", &scale) || qn_py_get_f32(args[10], op, "softcap", &softcap))
        return NULL;
    if (qdt < 0 || qdt > 2 || kvdt < 0 || kvdt > 4)
        return PyErr_Format(PyExc_ValueError, "%s: bad dtype codes %lld, %lld", op, (long long)qdt, (long long)kvdt);
    static const int cache_dt[5] = {QN_DT_F32, QN_DT_F16, QN_DT_BF16, QN_DT_I8, QN_DT_U8};
    qn_arrspec sq = {op, "q", float_dt[qdt], 3, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *q = qn_check_array(args[0], &sq);
    if (!q) return NULL;
    int64_t B = PyArray_DIM(q, 0), H = PyArray_DIM(q, 1), D = PyArray_DIM(q, 2);
    qn_arrspec sk = {op, "k_cache", cache_dt[kvdt], 4, {-1, -1, -1, D}, 0, 0, 1};
    PyArrayObject *kc = qn_check_array(args[1], &sk);
    if (!kc) return NULL;
    int64_t nb = PyArray_DIM(kc, 0), bs = PyArray_DIM(kc, 1), Hkv = PyArray_DIM(kc, 2);
    qn_arrspec sv = {op, "v_cache", cache_dt[kvdt], 4, {nb, bs, Hkv, D}, 0, 0, 1};
    PyArrayObject *vc = qn_check_array(args[2], &sv);
    if (!vc) return NULL;
    if (H == 0 || D == 0 || Hkv == 0 || H % Hkv || bs == 0)
        return PyErr_Format(PyExc_ValueError, "%s: q heads H=%lld must be a positive multiple of cache heads Hkv=%lld "
                            "(D=%lld, block_size=%lld positive)", op, (long long)H, (long long)Hkv, (long long)D,
                            (long long)bs);
    const float *ksc = NULL, *vsc = NULL;
    if (kvdt >= 3) {
        qn_arrspec ss = {op, "k_scale", QN_DT_F32, 2, {nb, Hkv, -1, -1}, 0, 0, 1};
        PyArrayObject *a = qn_check_array(args[3], &ss);
        if (!a) return NULL;
        ss.name = "v_scale";
        PyArrayObject *b = qn_check_array(args[4], &ss);
        if (!b) return NULL;
        ksc = PyArray_DATA(a);
        vsc = PyArray_DATA(b);
    } else if (args[3] != Py_None || args[4] != Py_None) {
        return PyErr_Format(PyExc_ValueError, "%s: k_scale and v_scale must be None for a float cache", op);
    }
    qn_arrspec st_ = {op, "block_tables", QN_DT_I32, 2, {B, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *tab = qn_check_array(args[7], &st_);
    if (!tab) return NULL;
    qn_arrspec sl = {op, "seq_lens", QN_DT_I32, 1, {B, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *lens = qn_check_array(args[8], &sl);
    if (!lens) return NULL;
    PyArrayObject *out = get_out(op, args[11], B, H, D);
    if (!out) return NULL;
    if (args[11] != Py_None && (qn_py_overlaps(out, q) || qn_py_overlaps(out, kc) || qn_py_overlaps(out, vc))) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "%s: out must not overlap q or the cache", op);
    }
    qn_paged_params p = {PyArray_DATA(out), PyArray_DATA(q), PyArray_DATA(kc), PyArray_DATA(vc), ksc, vsc,
                         (int)qdt, (int)kvdt, PyArray_DATA(tab), PyArray_DATA(lens),
                         B, H, Hkv, D, nb, bs, PyArray_DIM(tab, 1), scale, softcap, window};
    qn_py_apply_threads();
    int64_t wsb = qn_paged_attention_workspace_size(&p, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) { Py_DECREF(out); return NULL; }
    qn_status s;
    Py_BEGIN_ALLOW_THREADS
    s = qn_paged_attention(&p, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (s) { Py_DECREF(out); return qn_raise_status(s); }
    return (PyObject *)out;
}
