/* qmatmul_b3.cu — quantized matmul kernels for 3-bit weights (qmatmul_kernels.cuh). */
#include "qmatmul_kernels.cuh"

QN_QMM_INSTANTIATE(3)
