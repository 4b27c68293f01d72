"""quanta.ops — one function per kernel, on NumPy arrays.

Dimension letters: M rows of activations, N outputs, K inputs. Validation here is cheap
(dtype codes, shapes); the C binding re-checks everything it relies on. No silent slow
fallback: ``backend="reference"`` runs the float64 NumPy twin explicitly.
"""
from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np

from . import _C, reference
from .formats import QuantizedTensor

_BF16 = np.dtype(ml_dtypes.bfloat16)
_DT_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, _BF16: 2}


def _dtype_code(op: str, name: str, a) -> int:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy array, got {type(a).__name__}")
    code = _DT_CODES.get(a.dtype)
    if code is None:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {a.dtype} with shape {a.shape}")
    return code


def _as_rows(op: str, x: np.ndarray, K: int) -> np.ndarray:
    """x[..., K] as a 2-D [M, K] view (1-D x is one row)."""
    if x.ndim == 0 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must have shape (M, {K}), got {x.dtype} with shape {x.shape}")
    if x.ndim == 2:
        return x
    return x.reshape(-1, K)


def qmatmul(x: np.ndarray, w: QuantizedTensor, out: Optional[np.ndarray] = None,
            backend: str = "auto") -> np.ndarray:
    """Quantized matmul: y[M, N] = x[M, K] @ W[N, K]^T, float32 output.

    x: float32, float16 or bfloat16, shape (M, K), (K,) or (..., K); rows may be strided
    (``x[:, :K]`` of a wider array) but each row must be contiguous. M may be 0.
    w: a `QuantizedTensor` of any format. out: optional float32 (M, N) to write into.

    Integer formats quantize x per block of min(group, 256) inputs to int8 (absmax / 127,
    round half to even) and run integer dot products (VNNI / AVX2); the result equals
    ``reference.qmatmul(x, w, act_quant=True)`` up to float32 rounding. Lookup-table
    formats (nf4, fp8) multiply fp32 x with the table values. Results are bitwise
    identical across kernel paths, thread counts and M.
    backend: "auto" (C kernels) or "reference" (float64 NumPy, for tests).
    """
    if not isinstance(w, QuantizedTensor):
        raise TypeError(f"qmatmul: w must be a quanta.QuantizedTensor, got {type(w).__name__}")
    xdt = _dtype_code("qmatmul", "x", x)
    N, K = w.shape
    x2 = _as_rows("qmatmul", x, K)
    lead = x.shape[:-1]
    if backend == "reference":
        y = reference.qmatmul(x2, w, act_quant=w.format.kind != "lut").astype(np.float32)
        if out is not None:
            out[...] = y.reshape(out.shape)
            return out
        return y.reshape(lead + (N,))
    if backend != "auto":
        raise ValueError(f"qmatmul: backend must be 'auto' or 'reference', got {backend!r}")
    out2 = out if (out is None or out.ndim == 2) else out.reshape(-1, N)
    y = _C.qmatmul(x2, xdt, w.format._c, N, K, *w.arrays, out2)
    return out if out is not None else y.reshape(lead + (N,))


def matmul(x: np.ndarray, w: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Float matmul: y[M, N] = x[M, K] @ w[N, K]^T with fp32 accumulation, float32 output.

    x and w: float32, float16 or bfloat16 (may differ); x (M, K), (K,) or (..., K) with
    contiguous rows; w (N, K) with contiguous rows. out: optional float32 (M, N).
    """
    xdt = _dtype_code("matmul", "x", x)
    wdt = _dtype_code("matmul", "w", w)
    if w.ndim != 2:
        raise ValueError(f"matmul: w must have shape (N, K), got {w.dtype} with shape {w.shape}")
    N, K = w.shape
    x2 = _as_rows("matmul", x, K)
    out2 = out if (out is None or out.ndim == 2) else out.reshape(-1, N)
    y = _C.matmul(x2, xdt, w, wdt, out2)
    return out if out is not None else y.reshape(x.shape[:-1] + (N,))


# ---- Mixture-of-Experts ------------------------------------------------------------------

_SCORING = {"softmax": 0, "sigmoid": 1}


def silu_mul(gate: np.ndarray, up: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """out[...] = silu(gate) * up with silu(g) = g / (1 + exp(-g)), float32, elementwise.

    exp is quanta's own (about 1 ulp; its argument is clamped to [-87, 88], so for
    g < -87 the result is g / e^87, tiny but not exactly 0), vectorized by the compiler,
    identical on every kernel path and thread count.

    gate, up: float32 C-contiguous arrays of one shape (..., N); out: optional float32 of that
    shape (may be gate or up itself). Rows are split over threads.
    """
    return _C.silu_mul(gate, up, out)


def _route_args(op, E, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling):
    if scoring not in _SCORING:
        raise ValueError(f"{op}: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    top_k = int(top_k)
    if not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be in 1..{E} (the number of experts), got {top_k}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (E,):
            raise ValueError(f"{op}: bias must have shape ({E},), got {bias.dtype} with shape {bias.shape}")
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    ng = 0 if n_group is None else int(n_group)
    tg = 0 if topk_group is None else int(topk_group)
    if ng > 1:
        if E % ng:
            raise ValueError(f"{op}: n_group={ng} must divide the number of experts {E}")
        if not 1 <= tg <= ng:
            raise ValueError(f"{op}: topk_group must be in 1..n_group={ng}, got {topk_group}")
        if top_k > tg * (E // ng):
            raise ValueError(f"{op}: top_k={top_k} exceeds the {tg * (E // ng)} experts of "
                             f"topk_group={tg} groups")
    elif ng < 0:
        raise ValueError(f"{op}: n_group must be None or >= 1, got {n_group}")
    return (top_k, _SCORING[scoring], int(bool(renormalize)), bias, ng, tg, float(routed_scaling))


def moe_route(logits: np.ndarray, top_k: int, scoring: str = "softmax", renormalize: bool = True,
              bias: Optional[np.ndarray] = None, n_group: Optional[int] = None,
              topk_group: Optional[int] = None, routed_scaling: float = 1.0, backend: str = "auto"):
    """Router of a Mixture-of-Experts block: logits[T, E] -> (weights[T, top_k] float32,
    ids[T, top_k] int32).

    Per token: scores = softmax(logits) or sigmoid(logits) (float32). The top_k experts are
    chosen by the logits themselves when neither bias nor groups are given (scores are
    monotone in them), else by scores + bias (bias[E] is used for the choice only). With
    n_group > 1 the E experts form n_group consecutive groups, a group's key is the sum of
    its two largest keys, and only the topk_group best groups compete. weights = the
    unbiased scores of the chosen experts, divided by their sum when renormalize, times
    routed_scaling. Ties go to the lower expert (group) id; each row of ids is sorted by
    descending weight, ties by ascending id.

    ==================  ==========================================================================
    model family        arguments
    ==================  ==========================================================================
    Mixtral             scoring="softmax", top_k=2, renormalize=True
    Qwen2-MoE           scoring="softmax", top_k=4 (config), renormalize=False (norm_topk_prob)
    Qwen3-MoE, OLMoE    scoring="softmax", top_k=8, renormalize=config.norm_topk_prob
    DeepSeek-V3         scoring="sigmoid", top_k=8, bias=e_score_correction_bias, n_group=8,
                        topk_group=4, renormalize=config.norm_topk_prob, routed_scaling=2.5
    Llama-4             scoring="sigmoid", top_k=1, renormalize=False (top-1 on the logits, weight
                        sigmoid(chosen logit): the same thing)
    ==================  ==========================================================================

    logits: float32, float16 or bfloat16 (T, E) with contiguous rows; T may be 0.
    backend: "auto" (C) or "reference" (float64 NumPy, for tests).
    """
    _dtype_code("moe_route", "logits", logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"moe_route: logits must have shape (T, E), got {logits.dtype} with shape "
                         f"{logits.shape}")
    ra = _route_args("moe_route", logits.shape[1], top_k, scoring, renormalize, bias, n_group, topk_group,
                     routed_scaling)
    if backend == "reference":
        w, i = reference.moe_route(logits, top_k, scoring, renormalize, ra[3], n_group, topk_group,
                                   routed_scaling)
        return w.astype(np.float32), i
    if backend != "auto":
        raise ValueError(f"moe_route: backend must be 'auto' or 'reference', got {backend!r}")
    return _C.moe_route(logits, _dtype_code("moe_route", "logits", logits), *ra)


def _moe_common(op, x, experts, shared, out, return_counts):
    from .formats import MoEExperts, SharedExpert
    ex = MoEExperts.coerce(experts)
    sh = None if shared is None else SharedExpert.coerce(shared)
    if sh is not None and sh.d != ex.d:
        raise ValueError(f"{op}: shared expert has d={sh.d}, the experts have d={ex.d}")
    xdt = _dtype_code(op, "x", x)
    if x.ndim != 2 or x.shape[1] != ex.d:
        raise ValueError(f"{op}: x must have shape (T, {ex.d}), got {x.dtype} with shape {x.shape}")
    counts = np.zeros(ex.E, np.int64) if return_counts else None
    return ex, sh, xdt, counts


def moe(x: np.ndarray, router_w: np.ndarray, experts, top_k: int, scoring: str = "softmax",
        renormalize: bool = True, bias: Optional[np.ndarray] = None, n_group: Optional[int] = None,
        topk_group: Optional[int] = None, routed_scaling: float = 1.0, shared=None,
        out: Optional[np.ndarray] = None, return_counts: bool = False, backend: str = "auto"):
    """A whole Mixture-of-Experts block: y[T, d] from x[T, d].

    logits[T, E] = x @ router_w[E, d]^T (float32, NumPy/BLAS), then in one C call: routing
    as in `moe_route` (same arguments), a stable permutation of the (token, slot) pairs by
    expert, per expert with tokens its quantized gate/up matmuls, silu(gate) * up, the
    down matmul, and y[t] += weight * row, experts visited in id order (deterministic, the
    same for any thread count); experts without tokens cost nothing. Plus the shared
    expert when given: y[t] += sigmoid(x_t . shared.gate) * shared(x_t) (no sigmoid factor
    when shared has no gate).

    x: float32, float16 or bfloat16 (T, d), contiguous rows; T may be 0.
    router_w: float (E, d). experts: `quanta.formats.MoEExperts` (build it once; a dict of
    gate_proj/up_proj/down_proj lists or a list of per-expert dicts is converted per call).
    shared: None, `quanta.formats.SharedExpert` or a dict (gate_proj, up_proj, down_proj,
    optional gate[d]). out: optional float32 (T, d).
    Integer formats quantize the activations entering each matmul to int8 (see `qmatmul`).
    Returns y, or (y, counts int64[E]: tokens per expert) when return_counts.
    backend: "auto" (C) or "reference" (float64 NumPy from dequantized weights).
    """
    ex, sh, xdt, counts = _moe_common("moe", x, experts, shared, out, return_counts)
    router_w = np.asarray(router_w)
    if router_w.shape != (ex.E, ex.d):
        raise ValueError(f"moe: router_w must have shape ({ex.E}, {ex.d}), got {router_w.dtype} with shape "
                         f"{router_w.shape}")
    ra = _route_args("moe", ex.E, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling)
    if backend == "reference":
        y, c = reference.moe(x, router_w, ex, top_k, scoring, renormalize, ra[3], n_group, topk_group,
                             routed_scaling, sh)
        y = y.astype(np.float32)
        if out is not None:
            out[...] = y
            y = out
        return (y, c) if return_counts else y
    if backend != "auto":
        raise ValueError(f"moe: backend must be 'auto' or 'reference', got {backend!r}")
    rw = router_w if router_w.dtype == np.float32 else router_w.astype(np.float32)
    logits = np.asarray(x, dtype=np.float32) @ rw.T
    y = _C.moe(x, xdt, logits, 0, *ra, None, None, ex._c, None if sh is None else sh._c, out, counts)
    return (y, counts) if return_counts else y


def moe_experts(x: np.ndarray, weights: np.ndarray, ids: np.ndarray, experts, shared=None,
                out: Optional[np.ndarray] = None, return_counts: bool = False):
    """The expert half of `moe` under a given routing: y[T, d] = sum_j weights[t, j] *
    expert_{ids[t, j]}(x_t) (+ the shared expert), same kernel and order as `moe`.

    weights: float32 (T, k); ids: int32 (T, k), each in [0, E) and distinct within a row
    (else ValueError naming ids). Other arguments as in `moe`.
    """
    ex, sh, xdt, counts = _moe_common("moe_experts", x, experts, shared, out, return_counts)
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int32:
        got = getattr(ids, "dtype", type(ids).__name__)
        raise TypeError(f"moe_experts: ids must be an int32 numpy array, got {got}")
    if ids.ndim != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: ids must have shape ({x.shape[0]}, k), got {ids.shape}")
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.shape != ids.shape:
        raise ValueError(f"moe_experts: weights must have the shape of ids {ids.shape}, got {weights.shape}")
    y = _C.moe(x, xdt, None, 0, 1, 0, 0, None, 0, 0, 1.0, weights, np.ascontiguousarray(ids), ex._c,
               None if sh is None else sh._c, out, counts)
    return (y, counts) if return_counts else y
