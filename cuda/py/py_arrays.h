/* py_arrays.h — memory, copies, streams, DLPack, qmatmul and matmul entries of quanta._cuda. */
#ifndef QN_PY_ARRAYS_H
#define QN_PY_ARRAYS_H

#include <Python.h>

#include "qn_cuda.h"

extern PyMethodDef qn_py_array_methods[];
/* Raises the Python exception for a status (QN_EINVAL -> ValueError, QN_ENOMEM ->
 * MemoryError, QN_EUNSUPPORTED -> NotImplementedError, else RuntimeError) with the last
 * error message; returns NULL. Defined in module.c. */
PyObject *qn_cuda_raise(qn_status st);
/* Adds the Buffer and DLPackOwner types and the path constants to the module; -1 on error. */
int qn_py_arrays_init(PyObject *m);

#endif /* QN_PY_ARRAYS_H */
