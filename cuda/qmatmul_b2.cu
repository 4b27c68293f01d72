/* qmatmul_b2.cu — quantized matmul kernels for 2-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(2)
