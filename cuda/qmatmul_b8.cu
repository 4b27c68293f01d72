/* qmatmul_b8.cu — quantized matmul kernels for 8-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(8)
