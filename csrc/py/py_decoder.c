/* py_decoder.c — binding for the fused decode step: decoder_plan(...) validates every
 * weight once and returns a capsule; decoder_step(plan, ...) runs all dense layers for one
 * token per sequence. The capsule keeps the weight arrays alive. */
#include "args.h"

#include <stdlib.h>

#include "../kernels/decoder.h"

typedef struct plan {
    qn_dense_layer *layers;
    qn_decoder_dims dims;
    PyObject *keep; /* the argument tuple: owns every array the layers point into */
} plan;

static const char *CAPSULE = "quanta.decoder_plan";

static void plan_free(PyObject *cap) {
    plan *p = PyCapsule_GetPointer(cap, CAPSULE);
    if (!p) return;
    free(p->layers);
    Py_XDECREF(p->keep);
    free(p);
}

static const float *get_vec(PyObject *o, const char *name, int64_t n) {
    qn_arrspec s = {"decoder_plan", name, QN_DT_F32, 1, {n, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *a = qn_check_array(o, &s);
    return a ? PyArray_DATA(a) : NULL;
}

/* ("q", fmt, N, K, codes, scales, offsets, supers, super_mins, bias) or ("f", N, K, w, wdtype, bias) */
static int get_linear(PyObject *t, const char *name, int64_t N, int64_t K, qn_linear *l) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1) {
        PyErr_Format(PyExc_TypeError, "decoder_plan: %s must be a tuple", name);
        return -1;
    }
    memset(l, 0, sizeof *l);
    PyObject *kind = PyTuple_GET_ITEM(t, 0);
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    int64_t tn, tk;
    int quant = PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "q") == 0;
    if ((quant && n != 10) || (!quant && n != 6)) {
        PyErr_Format(PyExc_ValueError, "decoder_plan: %s has %zd fields", name, n);
        return -1;
    }
    int io = quant ? 2 : 1;
    if (qn_py_get_i64(PyTuple_GET_ITEM(t, io), "decoder_plan", "N", &tn) ||
        qn_py_get_i64(PyTuple_GET_ITEM(t, io + 1), "decoder_plan", "K", &tk))
        return -1;
    if (tn != N || tk != K) {
        PyErr_Format(PyExc_ValueError, "decoder_plan: %s is [%lld, %lld], expected [%lld, %lld]", name,
                     (long long)tn, (long long)tk, (long long)N, (long long)K);
        return -1;
    }
    l->N = N;
    l->K = K;
    if (quant) {
        const qn_format *f = qn_py_format(PyTuple_GET_ITEM(t, 1), "decoder_plan");
        if (!f) return -1;
        l->quantized = 1;
        if (qn_py_get_qweight("decoder_plan", f, N, K, &PyTuple_GET_ITEM(t, 4), 0, &l->qw)) return -1;
    } else {
        int64_t wdt;
        if (qn_py_get_i64(PyTuple_GET_ITEM(t, 4), "decoder_plan", "wdtype", &wdt)) return -1;
        if (wdt < QN_DT_F32 || wdt > QN_DT_BF16) {
            PyErr_Format(PyExc_ValueError, "decoder_plan: %s: bad wdtype %lld", name, (long long)wdt);
            return -1;
        }
        qn_arrspec s = {"decoder_plan", name, (int)wdt, 2, {N, K, -1, -1}, 0, 0, 1};
        PyArrayObject *w = qn_check_array(PyTuple_GET_ITEM(t, 3), &s);
        if (!w) return -1;
        l->w = PyArray_DATA(w);
        l->wdtype = (int)wdt;
    }
    PyObject *bias = PyTuple_GET_ITEM(t, n - 1);
    if (bias != Py_None && !(l->bias = get_vec(bias, "bias", N))) return -1;
    return 0;
}

/* decoder_plan(layers: tuple of (attn_norm, ffn_norm, qkv, o, gate_up, down, q_norm, k_norm, qk_norm,
 *                                window (-1: none)),
 *              dims: (D, H, Hkv, hd, I, eps, attn_scale, inv_freq, mscale, neox)) -> capsule */
PyObject *qn_py_decoder_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "decoder_plan";
    if (qn_py_check_nargs(op, nargs, 2)) return NULL;
    PyObject *layers = args[0], *dims = args[1];
    if (!PyTuple_Check(layers) || PyTuple_GET_SIZE(layers) < 1 || !PyTuple_Check(dims) || PyTuple_GET_SIZE(dims) != 10)
        return PyErr_Format(PyExc_TypeError, "%s: expected a non-empty tuple of layers and a 10-tuple of dims", op);
    qn_decoder_dims d = {0};
    int64_t v[5];
    const char *names[5] = {"D", "H", "Hkv", "hd", "I"};
    for (int i = 0; i < 5; i++) {
        if (qn_py_get_i64(PyTuple_GET_ITEM(dims, i), op, names[i], &v[i])) return NULL;
        if (v[i] <= 0 || v[i] > (1 << 20)) return PyErr_Format(PyExc_ValueError, "%s: %s = %lld", op, names[i], (long long)v[i]);
    }
    d.D = v[0]; d.H = v[1]; d.Hkv = v[2]; d.hd = v[3]; d.F = v[4];
    if (d.H % d.Hkv) return PyErr_Format(PyExc_ValueError, "%s: H %% Hkv != 0", op);
    if (qn_py_get_f32(PyTuple_GET_ITEM(dims, 5), op, "eps", &d.eps) ||
        qn_py_get_f32(PyTuple_GET_ITEM(dims, 6), op, "attn_scale", &d.attn_scale) ||
        qn_py_get_f32(PyTuple_GET_ITEM(dims, 8), op, "mscale", &d.mscale))
        return NULL;
    qn_arrspec sf = {op, "inv_freq", QN_DT_F64, 1, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *fr = qn_check_array(PyTuple_GET_ITEM(dims, 7), &sf);
    if (!fr) return NULL;
    d.inv_freq = PyArray_DATA(fr);
    d.rot = 2 * PyArray_DIM(fr, 0);
    if (d.rot <= 0 || d.rot > d.hd) return PyErr_Format(PyExc_ValueError, "%s: rotary dim %lld", op, (long long)d.rot);
    d.neox = PyObject_IsTrue(PyTuple_GET_ITEM(dims, 9));
    if (d.neox < 0) return NULL;
    d.L = PyTuple_GET_SIZE(layers);
    qn_dense_layer *ls = calloc((size_t)d.L, sizeof *ls);
    if (!ls) return PyErr_NoMemory();
    const int64_t nq = d.H * d.hd, nkv = d.Hkv * d.hd;
    for (int64_t l = 0; l < d.L; l++) {
        PyObject *t = PyTuple_GET_ITEM(layers, l);
        qn_dense_layer *y = &ls[l];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 10) {
            PyErr_Format(PyExc_TypeError, "%s: layer %lld must be a 10-tuple", op, (long long)l);
            goto fail;
        }
        if (qn_py_get_i64(PyTuple_GET_ITEM(t, 9), op, "window", &y->window)) goto fail;
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(t, 8));
        if (mode < 0 || mode > 2) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: qk_norm mode %ld", op, mode);
            goto fail;
        }
        y->qk_norm = (int)mode;
        if (!(y->attn_norm = get_vec(PyTuple_GET_ITEM(t, 0), "attn_norm", d.D)) ||
            !(y->ffn_norm = get_vec(PyTuple_GET_ITEM(t, 1), "ffn_norm", d.D)) ||
            get_linear(PyTuple_GET_ITEM(t, 2), "qkv", nq + 2 * nkv, d.D, &y->qkv) ||
            get_linear(PyTuple_GET_ITEM(t, 3), "o", d.D, nq, &y->o) ||
            get_linear(PyTuple_GET_ITEM(t, 4), "gate_up", 2 * d.F, d.D, &y->gate_up) ||
            get_linear(PyTuple_GET_ITEM(t, 5), "down", d.D, d.F, &y->down))
            goto fail;
        if (mode) {
            if (!(y->q_norm = get_vec(PyTuple_GET_ITEM(t, 6), "q_norm", mode == 1 ? d.hd : nq)) ||
                !(y->k_norm = get_vec(PyTuple_GET_ITEM(t, 7), "k_norm", mode == 1 ? d.hd : nkv)))
                goto fail;
        }
    }
    plan *p = malloc(sizeof *p);
    if (!p) { PyErr_NoMemory(); goto fail; }
    p->layers = ls;
    p->dims = d;
    p->keep = PyTuple_Pack(2, layers, dims);
    if (!p->keep) { free(p); goto fail; }
    PyObject *cap = PyCapsule_New(p, CAPSULE, plan_free);
    if (!cap) { Py_DECREF(p->keep); free(p); goto fail; }
    return cap;
fail:
    free(ls);
    return NULL;
}

/* decoder_step(plan, res[B, D], delta[B, D], k_cache[L * n_blocks, bs, Hkv, hd], v_cache, kvdtype,
 *              tables[B, max_blocks] int32, seq_lens[B] int32, positions[B] int32, slots[B] int64) */
PyObject *qn_py_decoder_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *op = "decoder_step";
    if (qn_py_check_nargs(op, nargs, 10)) return NULL;
    if (!PyCapsule_IsValid(args[0], CAPSULE))
        return PyErr_Format(PyExc_TypeError, "%s: plan must be what decoder_plan returned", op);
    plan *p = PyCapsule_GetPointer(args[0], CAPSULE);
    if (!p) return NULL;
    const qn_decoder_dims *d = &p->dims;
    int64_t kvdt;
    if (qn_py_get_i64(args[5], op, "kvdtype", &kvdt)) return NULL;
    if (kvdt < 0 || kvdt > 2) return PyErr_Format(PyExc_ValueError, "%s: the fused step takes float caches only", op);
    qn_arrspec sr = {op, "res", QN_DT_F32, 2, {-1, d->D, -1, -1}, 1, 0, 1};
    PyArrayObject *res = qn_check_array(args[1], &sr);
    if (!res) return NULL;
    int64_t B = PyArray_DIM(res, 0);
    if (B <= 0) return PyErr_Format(PyExc_ValueError, "%s: empty batch", op);
    qn_arrspec sd = {op, "delta", QN_DT_F32, 2, {B, d->D, -1, -1}, 1, 0, 1};
    PyArrayObject *delta = qn_check_array(args[2], &sd);
    if (!delta) return NULL;
    if (qn_py_overlaps(res, delta)) return PyErr_Format(PyExc_ValueError, "%s: res and delta overlap", op);
    const int cdt[3] = {QN_DT_F32, QN_DT_F16, QN_DT_BF16};
    qn_arrspec sk = {op, "k_cache", cdt[kvdt], 4, {-1, -1, d->Hkv, d->hd}, 1, 0, 1};
    PyArrayObject *kc = qn_check_array(args[3], &sk);
    if (!kc) return NULL;
    int64_t nbl = PyArray_DIM(kc, 0), bs = PyArray_DIM(kc, 1);
    if (nbl % d->L || bs <= 0) return PyErr_Format(PyExc_ValueError, "%s: k_cache must be [L * n_blocks, bs, Hkv, hd]", op);
    qn_arrspec sv = {op, "v_cache", cdt[kvdt], 4, {nbl, bs, d->Hkv, d->hd}, 1, 0, 1};
    PyArrayObject *vc = qn_check_array(args[4], &sv);
    if (!vc) return NULL;
    if (qn_py_overlaps(kc, vc)) return PyErr_Format(PyExc_ValueError, "%s: k_cache and v_cache overlap", op);
    qn_arrspec st_ = {op, "block_tables", QN_DT_I32, 2, {B, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *tb = qn_check_array(args[6], &st_);
    if (!tb) return NULL;
    qn_arrspec sl = {op, "seq_lens", QN_DT_I32, 1, {B, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *lens = qn_check_array(args[7], &sl);
    if (!lens) return NULL;
    sl.name = "positions";
    PyArrayObject *pos = qn_check_array(args[8], &sl);
    if (!pos) return NULL;
    qn_arrspec ss = {op, "slots", QN_DT_I64, 1, {B, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *slots = qn_check_array(args[9], &ss);
    if (!slots) return NULL;
    int64_t n_blocks = nbl / d->L, max_blocks = PyArray_DIM(tb, 1);
    const int64_t *sp = PyArray_DATA(slots);
    for (int64_t b = 0; b < B; b++)
        if (sp[b] < 0 || sp[b] >= n_blocks * bs)
            return PyErr_Format(PyExc_ValueError, "%s: slots[%lld] = %lld is outside [0, %lld)", op, (long long)b,
                                (long long)sp[b], (long long)(n_blocks * bs));
    qn_decoder_io io = {B, PyArray_DATA(res), PyArray_DATA(delta), PyArray_DATA(kc), PyArray_DATA(vc), (int)kvdt,
                        n_blocks, bs, max_blocks, PyArray_DATA(tb), PyArray_DATA(lens), PyArray_DATA(pos), sp};
    const int32_t *lp = PyArray_DATA(lens);
    for (int64_t b = 0; b < B; b++)  /* the workspace size reads them: check first */
        if (lp[b] < 1 || lp[b] > max_blocks * bs)
            return PyErr_Format(PyExc_ValueError, "%s: seq_lens[%lld] = %d is outside [1, %lld]", op, (long long)b,
                                lp[b], (long long)(max_blocks * bs));
    qn_py_apply_threads();
    int64_t wsb = qn_decoder_workspace_size(p->layers, d, &io, qn_py_nthreads_now());
    void *ws = qn_py_workspace(wsb);
    if (!ws) return NULL;
    qn_status st;
    Py_BEGIN_ALLOW_THREADS
    st = qn_decoder_step(p->layers, d, &io, ws, wsb);
    Py_END_ALLOW_THREADS
    qn_py_workspace_release(ws);
    if (st) return qn_raise_status(st);
    Py_RETURN_NONE;
}
