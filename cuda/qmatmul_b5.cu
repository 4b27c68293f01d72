/* qmatmul_b5.cu — quantized matmul kernels for 5-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(5)
