"""One table of tolerances, by what is compared; `assert_close` prints the evidence.

Keys name the comparison, not the test: a kernel against its float64 reference twin with
the same rounding modelled (tight), or against float math where the kernel approximates
by design (int8 activations: loose, at the level of an 8-bit quantizer).
"""
from __future__ import annotations

import numpy as np

TOL = {
    # qmatmul vs reference.qmatmul(act_quant=True): only float32 accumulation order differs
    "qmatmul_int": dict(rel_l2=2e-6, max_abs_rel=2e-5),
    # lut formats vs reference.qmatmul: fp32 FMA accumulation over K
    "qmatmul_lut": dict(rel_l2=2e-6, max_abs_rel=2e-5),
    # int formats vs float x (int8 activation quantization per block of <= 256)
    "qmatmul_float_x": dict(rel_l2=2e-2, max_abs_rel=1e-1),
    # GPTQ vs reference.gptq: the same float32 operations in the same order, so codes, group
    # parameters and dequantized values are equal bit for bit
    "gptq": dict(rel_l2=0.0, max_abs_rel=0.0),
    # float matmul, fp32 accumulation (CPU; GPU GEMV and FMA paths)
    "matmul_f32": dict(rel_l2=2e-6, max_abs_rel=2e-5),
    # GPU float matmul on tensor cores (x and w both f16 or both bf16): products are exact, but
    # mma.sync adds each k16 step's products into the fp32 accumulator with truncating alignment
    # (Fasi et al. 2021, "Numerical behavior of NVIDIA tensor cores"), so each step may lose up to
    # an fp32 ulp of the running sum, all in one direction: about K / 16 ulps for K ~ 1000
    "matmul_gpu_tc": dict(rel_l2=2e-5, max_abs_rel=1e-4),
    # GPU qmatmul vs reference.qmatmul (float x, no activation quantization): the GEMV path
    # (M <= 16) computes in fp32; the tensor-core path rounds dequantized weights (and float32
    # x) to bf16 or f16 tiles, fp32 accumulation: bf16's 8-bit mantissa sets the bound
    "qmatmul_gpu": dict(rel_l2=1e-2, max_abs_rel=4e-2),
    # GPU FP8 tensor-core path: x cast to e4m3 (3-bit mantissa) with a per-row scale
    "qmatmul_gpu_fp8": dict(rel_l2=6e-2, max_abs_rel=2e-1),
    # attention vs reference.attention on the same (rounded) inputs: fp32 dot products,
    # a polynomial exp and online-softmax rescaling
    "attention": dict(rel_l2=1e-5, max_abs_rel=5e-5),
    # an ISA path against the _ref kernel (both fp32, different summation order and exp)
    "attention_isa": dict(rel_l2=1e-5, max_abs_rel=5e-5),
    # attention vs torch.nn.functional.scaled_dot_product_attention (fp32 on both sides)
    "attention_torch": dict(rel_l2=2e-5, max_abs_rel=1e-4),
    # paged decode vs prefill attention over the same (dequantized) keys
    "paged_vs_prefill": dict(rel_l2=1e-5, max_abs_rel=5e-5),
    # paged decode over an int8 cache (AVX-512): q rounded to int16 per row for integer q . k,
    # which moves each score by ~1e-5 of |q| |k| (relative errors of p; nothing like the
    # cache's own int8 rounding, ~1e-2)
    "attention_i8_cache": dict(rel_l2=5e-5, max_abs_rel=2e-4),
    # rmsnorm, add, silu_mul, rope vs float64: a few float32 roundings per element
    "layer_f32": dict(rel_l2=1e-6, max_abs_rel=1e-5),
    # moe_route weights vs reference.moe_route: float32 exp / division, a few ulp
    "moe_route": dict(rel_l2=2e-6, max_abs_rel=4e-6),
    # silu_mul vs float64: libm expf and two float32 roundings
    "silu_mul": dict(rel_l2=1e-6, max_abs_rel=2e-6),
    # gelu_mul vs float64: g / (1 + exp(t)), t = g (K0 + K1 g^2) rounded a few times in float32,
    # so exp(t) carries a relative error of about |t| * 1e-7 (1.5e-6 at t = 30, g = -6, where
    # the product is 1e-13), plus our polynomial exp's ulp, a division and a product
    "gelu_mul": dict(rel_l2=2e-6, max_abs_rel=4e-6),
    # fused moe vs reference.moe(act_quant=True) (int formats): float32 accumulation, and an
    # int8 code of silu*up may round the other way when float32 and float64 h straddle .5
    "moe_int": dict(rel_l2=5e-5, max_abs_rel=5e-4),
    # fused moe vs reference.moe (lut formats, fp32 activations): fp32 accumulation, 3 matmuls
    "moe_lut": dict(rel_l2=5e-6, max_abs_rel=5e-5),
    # fused moe (int formats) vs float activations / a float32 torch block: int8 activations
    "moe_float_x": dict(rel_l2=3e-2, max_abs_rel=1e-1),
    # fused moe (lut formats) vs a float32 torch block with the same dequantized weights
    "moe_torch_f32": dict(rel_l2=1e-5, max_abs_rel=1e-4),
}


def assert_close(actual, expected, key: str, what: str = ""):
    """Fails with max abs error, relative L2 error and the worst index when out of tolerance.

    max_abs_rel bounds max|a - e| / max|e|; rel_l2 bounds ||a - e|| / ||e||."""
    tol = TOL[key]
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if e.size == 0:
        return
    assert np.all(np.isfinite(a)), f"{what}: non-finite values at {np.argwhere(~np.isfinite(a))[:5].tolist()}"
    diff = np.abs(a - e)
    scale = max(np.abs(e).max(), 1e-30)
    rel_l2 = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    msg = (f"{what} [{key}]: max abs err {diff.max():.3e} (rel {diff.max() / scale:.3e}, limit "
           f"{tol['max_abs_rel']:.1e}), rel L2 err {rel_l2:.3e} (limit {tol['rel_l2']:.1e}), worst index "
           f"{tuple(int(i) for i in worst)}: got {a[worst]!r}, expected {e[worst]!r}")
    assert rel_l2 <= tol["rel_l2"] and diff.max() / scale <= tol["max_abs_rel"], msg
