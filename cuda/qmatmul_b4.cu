/* qmatmul_b4.cu — quantized matmul kernels for 4-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(4)
