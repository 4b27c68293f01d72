/* dispatch.h — the table of inner-kernel pointers, filled once at import from the CPU
 * probe (and refilled by the test-only qn_dispatch_set_isa). */
#ifndef QN_DISPATCH_H
#define QN_DISPATCH_H

#include "cpu_features.h"
#include "kernels/act.h"
#include "kernels/attention.h"
#include "kernels/qmatmul.h"
#include "kernels/matmul.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*qn_quant_act_fn)(int8_t *, float *, float *, int32_t *, const void *, int,
                                int64_t, int64_t, int64_t);

typedef struct qn_dispatch {
    int isa;                       /* enum qn_isa of the table */
    qn_qtile_fn qtile_int;
    qn_qtile_fn qtile_lut;
    qn_quant_act_fn quant_act;
    qn_mm_tile_fn mm_dot;          /* float matmul, dot (GEMV) tiles */
    qn_mm_tile_fn mm_gemm;         /* float matmul, packed GEMM tiles */
    qn_mm_cvt_fn mm_cvt;           /* fp16 / bf16 rows to fp32 */
    qn_attn_tile_fn attn_tile;     /* attention, one query tile x key tile */
    qn_attn_tile_fn attn_decode;   /* the same for decode tiles (few rows per KV head) */
    qn_gelu_mul_fn gelu_mul;       /* gelu_tanh(gate) * up, one slice */
    qn_silu_mul_fn silu_mul;       /* silu(gate) * up, float32 */
} qn_dispatch;

extern qn_dispatch qn_kernels;

/* Fills the table for the best ISA the CPU allows. */
void qn_dispatch_init(void);
/* Fills the table for min(isa, best); returns the level chosen. */
int qn_dispatch_set_isa(int isa);

#ifdef __cplusplus
}
#endif
#endif
