/* dispatch.c — fills qn_kernels from the CPU probe: each entry takes the highest ISA level
 * allowed (min of the request and what the CPU and QUANTA_DISABLE_ISA permit). */
#include "dispatch.h"

#define QN_PICK(isa, name) ((isa) >= QN_ISA_AVX512 ? name##_avx512 : (isa) >= QN_ISA_AVX2 ? name##_avx2 : name##_ref)

static qn_dispatch table_for(int isa) {
    qn_dispatch d;
    d.isa = isa;
    d.qtile_int = QN_PICK(isa, qn_qtile_int);
    d.qtile_lut = QN_PICK(isa, qn_qtile_lut);
    d.quant_act = QN_PICK(isa, qn_quantize_act_row);
    d.mm_dot = QN_PICK(isa, qn_matmul_dot);
    d.mm_gemm = QN_PICK(isa, qn_matmul_gemm);
    d.mm_cvt = QN_PICK(isa, qn_matmul_cvt);
    d.attn_tile = QN_PICK(isa, qn_attn_tile);
    d.attn_decode = isa >= QN_ISA_AVX512 ? qn_attn_decode_avx512 : d.attn_tile;
    d.gelu_mul = QN_PICK(isa, qn_gelu_tanh_mul);
    d.silu_mul = QN_PICK(isa, qn_silu_mul);
    return d;
}

qn_dispatch qn_kernels = {QN_ISA_REF, qn_qtile_int_ref, qn_qtile_lut_ref, qn_quantize_act_row_ref,
                          qn_matmul_dot_ref, qn_matmul_gemm_ref, qn_matmul_cvt_ref, qn_attn_tile_ref,
                          qn_attn_tile_ref, qn_gelu_tanh_mul_ref, qn_silu_mul_ref};

int qn_dispatch_set_isa(int isa) {
    int best = qn_cpu_best_isa();
    if (isa > best) isa = best;
    qn_kernels = table_for(isa);
    return isa;
}

void qn_dispatch_init(void) { qn_dispatch_set_isa(QN_ISA_AVX512); }
