/* args.h — the one array validator of the binding, and small shared helpers.
 * Only csrc/py/ includes Python.h and the NumPy headers. */
#ifndef QN_PY_ARGS_H
#define QN_PY_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_23_API_VERSION
#define NPY_TARGET_VERSION NPY_1_23_API_VERSION
#ifndef QN_PY_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#define PY_ARRAY_UNIQUE_SYMBOL quanta_ARRAY_API
#include <numpy/arrayobject.h>

#include "../qn_common.h"
#include "../qn_formats.h"

/* dtype codes shared with python/quanta/ops.py */
enum { QN_DT_F32 = 0, QN_DT_F16 = 1, QN_DT_BF16 = 2, QN_DT_U8 = 3, QN_DT_I8 = 4, QN_DT_I32 = 5, QN_DT_U16 = 6, QN_DT_U64 = 7, QN_DT_F64 = 8, QN_DT_I64 = 9 };

/* What an array argument must be. ndim and shape entries < 0 are not checked. */
typedef struct qn_arrspec {
    const char *op, *name;
    int dtype;            /* QN_DT_* */
    int ndim;
    int64_t shape[4];     /* -1: any */
    int writeable;
    int rows_contiguous;  /* innermost stride == itemsize (rows may be strided) */
    int contiguous;       /* fully C-contiguous */
} qn_arrspec;

/* Returns the array (borrowed) or NULL with TypeError/ValueError set. */
PyArrayObject *qn_check_array(PyObject *obj, const qn_arrspec *spec);
const char *qn_dtype_name(int dt);

/* Raises the Python exception for a kernel status; returns NULL. */
PyObject *qn_raise_status(qn_status st);
/* Sets the calling thread's OpenMP thread count to the library setting. */
void qn_py_apply_threads(void);
/* Thread-local workspace, grown on demand; NULL with MemoryError set on failure.
 * Buffers above 256 MiB are not kept: the caller frees them with qn_py_workspace_release. */
void *qn_py_workspace(int64_t bytes);
void qn_py_workspace_release(void *p);

/* Small argument helpers shared by every binding file. Each returns 0 on success and -1
 * with a Python exception set. */
int qn_py_check_nargs(const char *op, Py_ssize_t nargs, Py_ssize_t want);
int qn_py_get_i64(PyObject *o, const char *op, const char *name, int64_t *out);
int qn_py_get_f32(PyObject *o, const char *op, const char *name, float *out);
/* Threads the next kernel call will use (after qn_py_apply_threads). */
int qn_py_nthreads_now(void);
/* Whether the memory spans of two arrays (any strides) intersect. */
int qn_py_overlaps(PyArrayObject *a, PyArrayObject *b);

/* A format descriptor from its packed bytes (made by _C.make_format). */
const qn_format *qn_py_format(PyObject *obj, const char *op);

/* Validates the arrays arr[0..4] (codes, scales, offsets, supers, super_mins) of a
 * quantized matrix [N, K] in format f and fills w; -1 with an exception set on failure. */
int qn_py_get_qweight(const char *op, const qn_format *f, int64_t N, int64_t K, PyObject *const *arr, int writeable,
                      qn_qweight *w);

/* Binding entry points defined in py_*.c, listed in module.c's method table. */
PyObject *qn_py_make_format(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_gptq(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_pack_codes(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_unpack_codes(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_qmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_paged_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_gelu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_moe_route(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_moe(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_decoder_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qn_py_decoder_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
