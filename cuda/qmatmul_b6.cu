/* qmatmul_b6.cu — quantized matmul kernels for 6-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(6)
