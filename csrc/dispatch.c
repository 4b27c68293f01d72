/* dispatch.c — fills qn_kernels from the CPU probe. */
#include "dispatch.h"

qn_dispatch qn_kernels = {QN_ISA_REF, qn_qtile_int_ref, qn_qtile_lut_ref, qn_quantize_act_row_ref};

int qn_dispatch_set_isa(int isa) {
    int best = qn_cpu_best_isa();
    if (isa > best) isa = best;
    qn_dispatch d = {QN_ISA_REF, qn_qtile_int_ref, qn_qtile_lut_ref, qn_quantize_act_row_ref};
    if (isa >= QN_ISA_AVX2) {
        d.isa = QN_ISA_AVX2;
        d.qtile_int = qn_qtile_int_avx2;
        d.qtile_lut = qn_qtile_lut_avx2;
        d.quant_act = qn_quantize_act_row_avx2;
    }
    if (isa >= QN_ISA_AVX512) {
        d.isa = QN_ISA_AVX512;
        d.qtile_int = qn_qtile_int_avx512;
        d.qtile_lut = qn_qtile_lut_avx512;
        d.quant_act = qn_quantize_act_row_avx512;
    }
    d.mm_dot = isa >= QN_ISA_AVX512 ? qn_matmul_dot_avx512 : isa >= QN_ISA_AVX2 ? qn_matmul_dot_avx2 : qn_matmul_dot_ref;
    d.mm_gemm = isa >= QN_ISA_AVX512 ? qn_matmul_gemm_avx512 : isa >= QN_ISA_AVX2 ? qn_matmul_gemm_avx2 : qn_matmul_gemm_ref;
    d.mm_cvt = isa >= QN_ISA_AVX512 ? qn_matmul_cvt_avx512 : isa >= QN_ISA_AVX2 ? qn_matmul_cvt_avx2 : qn_matmul_cvt_ref;
    qn_kernels = d;
    return isa;
}

void qn_dispatch_init(void) { qn_dispatch_set_isa(QN_ISA_AVX512); }
