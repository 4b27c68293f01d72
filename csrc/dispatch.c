/* dispatch.c — fills qn_kernels from the CPU probe. */
#include "dispatch.h"

qn_dispatch qn_kernels = {QN_ISA_REF, qn_qtile_int_ref, qn_qtile_lut_ref, qn_quantize_act_row_ref,
                          qn_attn_tile_ref};

int qn_dispatch_set_isa(int isa) {
    int best = qn_cpu_best_isa();
    if (isa > best) isa = best;
    qn_dispatch d = {QN_ISA_REF, qn_qtile_int_ref, qn_qtile_lut_ref, qn_quantize_act_row_ref, qn_attn_tile_ref};
    if (isa >= QN_ISA_AVX2) {
        d.isa = QN_ISA_AVX2;
        d.qtile_int = qn_qtile_int_avx2;
        d.qtile_lut = qn_qtile_lut_avx2;
        d.quant_act = qn_quantize_act_row_avx2;
        d.attn_tile = qn_attn_tile_avx2;
    }
    if (isa >= QN_ISA_AVX512) {
        d.isa = QN_ISA_AVX512;
        d.qtile_int = qn_qtile_int_avx512;
        d.qtile_lut = qn_qtile_lut_avx512;
        d.quant_act = qn_quantize_act_row_avx512;
        d.attn_tile = qn_attn_tile_avx512;
    }
    qn_kernels = d;
    return isa;
}

void qn_dispatch_init(void) { qn_dispatch_set_isa(QN_ISA_AVX512); }
