/* py_moe.c — binding for moe_route and the fused MoE block.
 * Positional arguments (METH_FASTCALL); keywords, defaults and the experts container live
 * in quanta.ops / quanta.formats. Each projection's experts arrive stacked: the panel
 * arrays of all E experts concatenated along the panel axis, validated here in one go and
 * handed to C as an array of qn_qweight structs. The GIL is released around the kernels. */
#include "args.h"

#include "../kernels/act.h"
#include "../kernels/moe.h"
#include "../kernels/qmatmul.h"






/* Route parameters from args[0..6]: top_k, scoring, renormalize, bias, n_group, topk_group,
 * routed_scaling; bias checked against E. */
static int get_route_params(const char *op, PyObject *const *a, int64_t E, qn_moe_route_params *p) {
    int64_t v[5];
    if (qn_py_get_i64(a[0], op, "top_k", &v[0]) || qn_py_get_i64(a[1], op, "scoring", &v[1]) ||
        qn_py_get_i64(a[2], op, "renormalize", &v[2]) || qn_py_get_i64(a[4], op, "n_group", &v[3]) ||
        qn_py_get_i64(a[5], op, "topk_group", &v[4]))
        return -1;
    double sc = PyFloat_AsDouble(a[6]);
    if (sc == -1.0 && PyErr_Occurred()) return -1;
    memset(p, 0, sizeof *p);
    p->top_k = v[0];
    p->scoring = (int)v[1];
    p->renormalize = v[2] != 0;
    p->n_group = v[3];
    p->topk_group = v[4];
    p->routed_scaling = (float)sc;
    if (a[3] != Py_None) {
        qn_arrspec sb = {op, "bias", QN_DT_F32, 1, {E, -1, -1, -1}, 0, 0, 1};
        PyArrayObject *b = qn_check_array(a[3], &sb);
        if (!b) return -1;
        p->bias = PyArray_DATA(b);
    }
    return 0;
}

static int64_t logits_ld(PyArrayObject *l, int64_t E) {
    return PyArray_DIM(l, 0) > 1 ? PyArray_STRIDE(l, 0) / PyArray_ITEMSIZE(l) : E;
}

/* moe_route(logits, ldtype, top_k, scoring, renormalize, bias, n_group, topk_group,
 *           routed_scaling) -> (weights float32[T, k], ids int32[T, k]) */
PyObject *qn_py_moe_route(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (qn_py_check_nargs("moe_route", nargs, 9)) return NULL;
    int64_t ldt;
    if (qn_py_get_i64(args[1], "moe_route", "ldtype", &ldt)) return NULL;
    if (ldt < QN_DT_F32 || ldt > QN_DT_BF16) return PyErr_Format(PyExc_ValueError, "moe_route: bad ldtype %lld", (long long)ldt);
    qn_arrspec sl = {"moe_route", "logits", (int)ldt, 2, {-1, -1, -1, -1}, 0, 1, 0};
    PyArrayObject *l = qn_check_array(args[0], &sl);
    if (!l) return NULL;
    int64_t T = PyArray_DIM(l, 0), E = PyArray_DIM(l, 1);
    if (E < 1) return PyErr_Format(PyExc_ValueError, "moe_route: logits must have at least one expert, got shape (%lld, %lld)", (long long)T, (long long)E);
    qn_moe_route_params p;
    if (get_route_params("moe_route", args + 2, E, &p)) return NULL;
    if (p.top_k < 1 || p.top_k > E)
        return PyErr_Format(PyExc_ValueError, "moe_route: top_k must be in 1..%lld, got %lld", (long long)E, (long long)p.top_k);
    npy_intp dims[2] = {(npy_intp)T, (npy_intp)p.top_k};
    PyArrayObject *w = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    PyArrayObject *ids = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT32);
    if (!w || !ids) goto fail;
    qn_py_apply_threads();
    int64_t wsb = qn_moe_route_workspace_size(E, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) goto fail;
    qn_status st;
    float *wp = PyArray_DATA(w);
    int32_t *ip = PyArray_DATA(ids);
    const void *lp = PyArray_DATA(l);
    int64_t ldl = logits_ld(l, E);
    Py_BEGIN_ALLOW_THREADS
    st = qn_moe_route(wp, ip, lp, (int)ldt, T, E, ldl, &p, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) { qn_raise_status(st); goto fail; }
    return Py_BuildValue("(NN)", w, ids);
fail:
    Py_XDECREF(w);
    Py_XDECREF(ids);
    return NULL;
}

/* One projection's E experts from (fmt, N, K, arrays 5-tuple) into qw[0 .. E). */
static int get_stacked(const char *op, PyObject *fmt_obj, PyObject *arrays, int64_t E, int64_t N, int64_t K,
                       qn_qweight *qw) {
    const qn_format *f = qn_py_format(fmt_obj, op);
    if (!f) return -1;
    if (!PyTuple_Check(arrays) || PyTuple_GET_SIZE(arrays) != 5) {
        PyErr_Format(PyExc_TypeError, "%s: arrays must be a tuple of 5 (codes, scales, offsets, supers, super_mins)", op);
        return -1;
    }
    int64_t np = qn_npanels(N);
    qn_qweight all;
    /* the stacked arrays are exactly those of one matrix of E * np panels */
    if (qn_py_get_qweight(op, f, E * np * QN_PANEL, K, &PyTuple_GET_ITEM(arrays, 0), 0, &all)) return -1;
    int64_t Kp = qn_fmt_kpad(f, K), ng = qn_fmt_ngroups(f, K), nsup = Kp / QN_SUPER;
    int64_t pbytes = (Kp / QN_CHUNK) * QN_CHUNK_BYTES(f->bits);
    int sb = qn_fmt_nested(f) ? 1 : qn_scale_bytes(f->scale), ob = qn_offset_bytes(f);
    for (int64_t e = 0; e < E; e++) {
        qn_qweight *w = &qw[e];
        w->fmt = f;
        w->N = N;
        w->K = K;
        w->codes = all.codes + e * np * pbytes;
        w->scales = (const char *)all.scales + e * np * ng * QN_PANEL * sb;
        w->offsets = all.offsets ? (const char *)all.offsets + e * np * ng * QN_PANEL * ob : NULL;
        w->supers = all.supers ? all.supers + e * np * nsup * QN_PANEL : NULL;
        w->super_mins = all.super_mins ? all.super_mins + e * np * nsup * QN_PANEL : NULL;
    }
    return 0;
}


/* moe(x, xdtype, logits, ldtype, top_k, scoring, renormalize, bias, n_group, topk_group,
 *     routed_scaling, weights, ids, experts, shared, out, counts) -> out
 * Either logits[T, E] (routing runs here) or weights[T, k] + ids[T, k] (logits None).
 * experts: (fmt_gate, fmt_up, fmt_down, E, d, ffn, gate_arrays, up_arrays, down_arrays)
 * shared:  None or (fmt_gate, fmt_up, fmt_down, ffn, gate_arrays, up_arrays, down_arrays, gate_w)
 * out: None or float32[T, d]; counts: None or int64[E]. */
PyObject *qn_py_moe(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "moe";
    if (qn_py_check_nargs(op, nargs, 17)) return NULL;
    PyObject *exo = args[13], *sho = args[14];
    if (!PyTuple_Check(exo) || PyTuple_GET_SIZE(exo) != 9)
        return PyErr_Format(PyExc_TypeError, "moe: experts must be a quanta.formats.MoEExperts");
    if (sho != Py_None && (!PyTuple_Check(sho) || PyTuple_GET_SIZE(sho) != 8))
        return PyErr_Format(PyExc_TypeError, "moe: shared must be None or a quanta.formats.SharedExpert");
    int64_t xdt, E, d, ffn;
    if (qn_py_get_i64(args[1], op, "xdtype", &xdt) || qn_py_get_i64(PyTuple_GET_ITEM(exo, 3), op, "E", &E) ||
        qn_py_get_i64(PyTuple_GET_ITEM(exo, 4), op, "d", &d) || qn_py_get_i64(PyTuple_GET_ITEM(exo, 5), op, "ffn", &ffn))
        return NULL;
    if (xdt < QN_DT_F32 || xdt > QN_DT_BF16) return PyErr_Format(PyExc_ValueError, "moe: bad xdtype %lld", (long long)xdt);
    if (E < 1 || d < 1 || ffn < 1)
        return PyErr_Format(PyExc_ValueError, "moe: experts need E, d, ffn >= 1, got %lld, %lld, %lld", (long long)E, (long long)d, (long long)ffn);
    qn_arrspec sx = {op, "x", (int)xdt, 2, {-1, d, -1, -1}, 0, 1, 0};
    PyArrayObject *x = qn_check_array(args[0], &sx);
    if (!x) return NULL;
    int64_t T = PyArray_DIM(x, 0), k;
    int routed = args[2] != Py_None;
    PyArrayObject *logits = NULL, *wts = NULL, *ids = NULL;
    qn_moe_route_params rp;
    int64_t ldt = 0;
    if (routed) {
        if (args[11] != Py_None || args[12] != Py_None)
            return PyErr_Format(PyExc_ValueError, "moe: give either logits or weights and ids");
        if (qn_py_get_i64(args[3], op, "ldtype", &ldt)) return NULL;
        if (ldt < QN_DT_F32 || ldt > QN_DT_BF16) return PyErr_Format(PyExc_ValueError, "moe: bad ldtype %lld", (long long)ldt);
        qn_arrspec sl = {op, "logits", (int)ldt, 2, {T, E, -1, -1}, 0, 1, 0};
        if (!(logits = qn_check_array(args[2], &sl))) return NULL;
        if (get_route_params(op, args + 4, E, &rp)) return NULL;
        k = rp.top_k;
        if (k < 1 || k > E) return PyErr_Format(PyExc_ValueError, "moe: top_k must be in 1..%lld, got %lld", (long long)E, (long long)k);
    } else {
        qn_arrspec si = {op, "ids", QN_DT_I32, 2, {T, -1, -1, -1}, 0, 0, 1};
        if (!(ids = qn_check_array(args[12], &si))) return NULL;
        k = PyArray_DIM(ids, 1);
        if (k < 1 || k > E) return PyErr_Format(PyExc_ValueError, "moe: ids must have 1..%lld columns (top_k), got %lld", (long long)E, (long long)k);
        qn_arrspec sw = {op, "weights", QN_DT_F32, 2, {T, k, -1, -1}, 0, 0, 1};
        if (!(wts = qn_check_array(args[11], &sw))) return NULL;
    }
    PyArrayObject *counts = NULL;
    if (args[16] != Py_None) {
        qn_arrspec sc = {op, "counts", QN_DT_I64, 1, {E, -1, -1, -1}, 1, 0, 1};
        if (!(counts = qn_check_array(args[16], &sc))) return NULL;
    }
    qn_qweight *qw = PyMem_Malloc(sizeof(qn_qweight) * (size_t)(3 * E + 3));
    if (!qw) return PyErr_NoMemory();
    PyArrayObject *out = NULL;
    qn_moe_experts ex = {E, d, ffn, qw, qw + E, qw + 2 * E};
    if (get_stacked("moe: experts.gate_proj", PyTuple_GET_ITEM(exo, 0), PyTuple_GET_ITEM(exo, 6), E, ffn, d, qw) ||
        get_stacked("moe: experts.up_proj", PyTuple_GET_ITEM(exo, 1), PyTuple_GET_ITEM(exo, 7), E, ffn, d, qw + E) ||
        get_stacked("moe: experts.down_proj", PyTuple_GET_ITEM(exo, 2), PyTuple_GET_ITEM(exo, 8), E, d, ffn, qw + 2 * E))
        goto fail;
    qn_moe_shared sh, *shp = NULL;
    if (sho != Py_None) {
        int64_t fs;
        if (qn_py_get_i64(PyTuple_GET_ITEM(sho, 3), op, "shared ffn", &fs)) goto fail;
        if (fs < 1) { PyErr_Format(PyExc_ValueError, "moe: shared ffn must be >= 1"); goto fail; }
        qn_qweight *s3 = qw + 3 * E;
        if (get_stacked("moe: shared.gate_proj", PyTuple_GET_ITEM(sho, 0), PyTuple_GET_ITEM(sho, 4), 1, fs, d, s3) ||
            get_stacked("moe: shared.up_proj", PyTuple_GET_ITEM(sho, 1), PyTuple_GET_ITEM(sho, 5), 1, fs, d, s3 + 1) ||
            get_stacked("moe: shared.down_proj", PyTuple_GET_ITEM(sho, 2), PyTuple_GET_ITEM(sho, 6), 1, d, fs, s3 + 2))
            goto fail;
        sh = (qn_moe_shared){fs, s3, s3 + 1, s3 + 2, NULL};
        if (PyTuple_GET_ITEM(sho, 7) != Py_None) {
            qn_arrspec sg = {op, "shared.gate", QN_DT_F32, 1, {d, -1, -1, -1}, 0, 0, 1};
            PyArrayObject *g = qn_check_array(PyTuple_GET_ITEM(sho, 7), &sg);
            if (!g) goto fail;
            sh.gate_w = PyArray_DATA(g);
        }
        shp = &sh;
    }
    if (args[15] == Py_None) {
        npy_intp dims[2] = {(npy_intp)T, (npy_intp)d};
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto fail;
    } else {
        qn_arrspec so = {op, "out", QN_DT_F32, 2, {T, d, -1, -1}, 1, 1, 0};
        if (!(out = qn_check_array(args[15], &so))) goto fail;
        Py_INCREF(out);
        if (qn_py_overlaps(out, x)) { PyErr_Format(PyExc_ValueError, "moe: out overlaps x"); goto fail; }
    }
    if (T == 0) {
        if (counts) memset(PyArray_DATA(counts), 0, (size_t)E * 8);
        PyMem_Free(qw);
        return (PyObject *)out;
    }
    int64_t isz = xdt == QN_DT_F32 ? 4 : 2;
    int64_t ldx = T > 1 ? PyArray_STRIDE(x, 0) / isz : d, ldy = T > 1 ? PyArray_STRIDE(out, 0) / 4 : d;
    if (ldx < d || ldy < d) { PyErr_Format(PyExc_ValueError, "moe: x and out rows must not overlap"); goto fail; }
    qn_py_apply_threads();
    int nth = qn_py_nthreads_now();
    int64_t rb = routed ? qn_round_up(T * k * 4, 64) : 0;
    int64_t rws = routed ? qn_moe_route_workspace_size(E, nth) : 0;
    int64_t mws = qn_moe_workspace_size(&ex, shp, T, k, nth);
    int64_t wsb = 2 * rb + rws + mws + 64;
    void *ws = qn_py_workspace(wsb);
    if (!ws) goto fail;
    char *wsp = (char *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
    qn_status st = QN_OK;
    float *y = PyArray_DATA(out);
    const void *xp = PyArray_DATA(x);
    int64_t *cp = counts ? PyArray_DATA(counts) : NULL;
    const float *wp = wts ? PyArray_DATA(wts) : (const float *)wsp;
    const int32_t *ip = ids ? PyArray_DATA(ids) : (const int32_t *)(wsp + rb);
    const void *lp = logits ? PyArray_DATA(logits) : NULL;
    int64_t ldl = logits ? logits_ld(logits, E) : 0;
    Py_BEGIN_ALLOW_THREADS
    if (routed)
        st = qn_moe_route((float *)wsp, (int32_t *)(wsp + rb), lp, (int)ldt, T, E, ldl, &rp, wsp + 2 * rb, rws);
    if (!st) st = qn_moe_experts_apply(y, cp, xp, (int)xdt, ip, wp, T, k, ldx, ldy, &ex, shp, wsp + 2 * rb + rws, mws);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) { qn_raise_status(st); goto fail; }
    PyMem_Free(qw);
    return (PyObject *)out;
fail:
    PyMem_Free(qw);
    Py_XDECREF(out);
    return NULL;
}
