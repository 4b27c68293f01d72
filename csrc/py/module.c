/* module.c — the quanta._C extension module: method table, info, threads, ISA switch. */
#define QN_PY_MODULE_C
#include "args.h"

#include "../cpu_features.h"
#include "../dispatch.h"
#include "../kernels/membench.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int qn_py_nthreads = 1;

static PyObject *py_info(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    const qn_cpu_features *f = qn_cpu_probe();
    return Py_BuildValue(
        "{s:s,s:s,s:i,s:O,s:{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}}",
        "isa", qn_isa_name(qn_kernels.isa), "hw_isa", qn_isa_name(qn_cpu_hw_isa()), "num_threads", qn_py_nthreads,
#ifdef _OPENMP
        "openmp", Py_True,
#else
        "openmp", Py_False,
#endif
        "features", "avx2", f->avx2, "fma", f->fma, "f16c", f->f16c, "avx512f", f->avx512f, "avx512bw", f->avx512bw,
        "avx512vl", f->avx512vl, "avx512dq", f->avx512dq, "avx512vnni", f->avx512vnni, "avx512bf16", f->avx512bf16);
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in 1..1024, got %ld", n);
    qn_py_nthreads = (int)n;
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLong(qn_py_nthreads);
}

/* Test-only: choose the kernel path ("ref", "avx2", "avx512"); returns the path chosen. */
static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int isa;
    if (!strcmp(name, "ref")) isa = QN_ISA_REF;
    else if (!strcmp(name, "avx2")) isa = QN_ISA_AVX2;
    else if (!strcmp(name, "avx512") || !strcmp(name, "best")) isa = QN_ISA_AVX512;
    else return PyErr_Format(PyExc_ValueError, "_set_isa: unknown path '%s' (ref, avx2, avx512, best)", name);
    return PyUnicode_FromString(qn_isa_name(qn_dispatch_set_isa(isa)));
}

/* _read_bandwidth(uint64 array) -> checksum: streams the array with every thread. */
static PyObject *py_read_bandwidth(PyObject *self, PyObject *arg) {
    (void)self;
    qn_arrspec s = {"_read_bandwidth", "a", QN_DT_U64, 1, {-1, -1, -1, -1}, 0, 0, 1};
    PyArrayObject *a = qn_check_array(arg, &s);
    if (!a) return NULL;
    qn_py_apply_threads();
    uint64_t r;
    const uint64_t *p = PyArray_DATA(a);
    int64_t n = PyArray_DIM(a, 0);
    Py_BEGIN_ALLOW_THREADS
    r = qn_membench_read(p, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r);
}

static PyMethodDef methods[] = {
    {"_read_bandwidth", py_read_bandwidth, METH_O, "_read_bandwidth(a: uint64[n]) -> int (benchmarks)."},
    {"info", py_info, METH_NOARGS, "info() -> dict: kernel path, CPU features, threads."},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads used by every kernel."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int."},
    {"_set_isa", py_set_isa, METH_O, "_set_isa(name) -> str: test-only kernel path switch."},
    {"make_format", (PyCFunction)(void (*)(void))qn_py_make_format, METH_FASTCALL,
     "make_format(bits, group, kind, offset, scale, rule, lut_kind, lut) -> bytes"},
    {"quantize", (PyCFunction)(void (*)(void))qn_py_quantize, METH_FASTCALL,
     "quantize(w, fmt, codes, scales, offsets, supers, super_mins)"},
    {"gptq", (PyCFunction)(void (*)(void))qn_py_gptq, METH_FASTCALL,
     "gptq(W, fmt, U, cols, block, static_params, codes, scales, offsets, supers, super_mins) -> loss"},
    {"dequantize", (PyCFunction)(void (*)(void))qn_py_dequantize, METH_FASTCALL,
     "dequantize(fmt, N, K, codes, scales, offsets, supers, super_mins) -> float32[N, K]"},
    {"pack_codes", (PyCFunction)(void (*)(void))qn_py_pack_codes, METH_FASTCALL,
     "pack_codes(codes[N, K] uint8, bits) -> panel codes"},
    {"unpack_codes", (PyCFunction)(void (*)(void))qn_py_unpack_codes, METH_FASTCALL,
     "unpack_codes(panel_codes, bits, N, K) -> uint8[N, K]"},
    {"qmatmul", (PyCFunction)(void (*)(void))qn_py_qmatmul, METH_FASTCALL,
     "qmatmul(x, xdtype, fmt, N, K, codes, scales, offsets, supers, super_mins, out) -> out"},
    {"matmul", (PyCFunction)(void (*)(void))qn_py_matmul, METH_FASTCALL,
     "matmul(x, xdtype, w, wdtype, out) -> out"},
    {"attention", (PyCFunction)(void (*)(void))qn_py_attention, METH_FASTCALL,
     "attention(q, k, v, dtype, causal, window, softcap, scale, cu_q, cu_k, out) -> out[T, H, D]"},
    {"paged_attention", (PyCFunction)(void (*)(void))qn_py_paged_attention, METH_FASTCALL,
     "paged_attention(q, k_cache, v_cache, k_scale, v_scale, qdtype, kvdtype, block_tables, seq_lens, scale, "
     "softcap, out, window) -> out[B, H, D]"},
    {"rmsnorm", (PyCFunction)(void (*)(void))qn_py_rmsnorm, METH_FASTCALL,
     "rmsnorm(x[M, N], xdtype, w[N], eps, residual, out) -> out[M, N]"},
    {"add", (PyCFunction)(void (*)(void))qn_py_add, METH_FASTCALL, "add(a[n], adtype, b[n], bdtype, out) -> out[n]"},
    {"silu_mul", (PyCFunction)(void (*)(void))qn_py_silu_mul, METH_FASTCALL,
     "silu_mul(gate[n], up[n], dtype, out) -> out[n]"},
    {"gelu_mul", (PyCFunction)(void (*)(void))qn_py_gelu_mul, METH_FASTCALL,
     "gelu_mul(gate[n], up[n], dtype, out) -> out[n]: gelu_tanh(gate) * up"},
    {"rope", (PyCFunction)(void (*)(void))qn_py_rope, METH_FASTCALL,
     "rope(x[T, nh, D], positions[T], inv_freq[rot / 2], mscale, neox) (in place)"},
    {"moe_route", (PyCFunction)(void (*)(void))qn_py_moe_route, METH_FASTCALL,
     "moe_route(logits, ldtype, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling)"
     " -> (weights, ids)"},
    {"decoder_plan", (PyCFunction)(void (*)(void))qn_py_decoder_plan, METH_FASTCALL,
     "decoder_plan(layers, dims) -> capsule: validated weights of the dense layers for decoder_step."},
    {"decoder_step", (PyCFunction)(void (*)(void))qn_py_decoder_step, METH_FASTCALL,
     "decoder_step(plan, res, delta, k_cache, v_cache, kvdtype, tables, seq_lens, positions, slots): "
     "one decode step through all planned layers."},
    {"moe", (PyCFunction)(void (*)(void))qn_py_moe, METH_FASTCALL,
     "moe(x, xdtype, logits, ldtype, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling,"
     " weights, ids, experts, shared, out, counts) -> out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_C", "quanta's C kernels.", -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    qn_dispatch_init();
#ifdef _OPENMP
    qn_py_nthreads = omp_get_max_threads(); /* honours OMP_NUM_THREADS */
#endif
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "PANEL", QN_PANEL);
    PyModule_AddIntConstant(m, "CHUNK", QN_CHUNK);
    PyModule_AddIntConstant(m, "SUPER", QN_SUPER);
    PyModule_AddIntConstant(m, "FORMAT_BYTES", (long)sizeof(qn_format));
    return m;
}
