/* py_arrays.h — memory, copies, streams, DLPack and qmatmul entries of quanta._cuda. */
#ifndef QN_PY_ARRAYS_H
#define QN_PY_ARRAYS_H

#include <Python.h>

extern PyMethodDef qn_py_array_methods[];
/* Adds the Buffer and DLPackOwner types and the path constants to the module; -1 on error. */
int qn_py_arrays_init(PyObject *m);

#endif /* QN_PY_ARRAYS_H */
