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


def _on_gpu(x) -> bool:
    """Whether x is GPU memory (checked without importing quanta.cuda for NumPy inputs)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    if hasattr(x, "__dlpack_device__"):
        from . import cuda
        return cuda.is_device_array(x)
    return False


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

    GPU: when x lives on a GPU (a `quanta.cuda.Array` or any CUDA array-interface / DLPack
    object) the call runs `quanta.cuda.qmatmul` on w's device; w must have been moved once
    with ``w.to("cuda")``. The output is then a float32 `quanta.cuda.Array` (or out=).
    """
    if not isinstance(x, np.ndarray) and _on_gpu(x):
        if backend != "auto":
            raise ValueError(f"qmatmul: backend must be 'auto' for GPU arrays, got {backend!r}")
        from . import cuda
        return cuda.qmatmul(x, w, out=out)
    if not isinstance(w, QuantizedTensor):
        if type(w).__name__ == "CudaQuantizedTensor":
            raise TypeError(f"qmatmul: w lives on cuda:{w.device} but x is a {type(x).__name__}: copy x with "
                            "quanta.cuda.to_device(x), or bring w back with w.to('cpu')")
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
    contiguous rows; w (N, K), N, K >= 1, with contiguous rows. out: optional float32 (M, N).

    GPU: when x lives on a GPU (a `quanta.cuda.Array` or any CUDA array-interface / DLPack
    object) the call runs on x's device: `quanta.cuda.matmul` when w is a GPU array of
    float32, float16 or bfloat16 (copy it once with ``quanta.cuda.to_device(w)``; a NumPy w
    is a TypeError), `quanta.cuda.qmatmul` when w is a quantized tensor moved with
    ``w.to("cuda")``. The output is then a float32 `quanta.cuda.Array` shaped (..., N), or
    out= (a GPU array of float32, float16 or bfloat16). The GPU kernels keep fp32 accuracy:
    tensor cores only when x and w are both float16 or both bfloat16 (exact products).
    """
    if not isinstance(x, np.ndarray) and _on_gpu(x):
        from . import cuda
        if type(w).__name__ == "CudaQuantizedTensor" or isinstance(w, QuantizedTensor):
            return cuda.qmatmul(x, w, out=out)
        return cuda.matmul(x, w, out=out)
    if not isinstance(w, np.ndarray) and _on_gpu(w):
        raise TypeError(f"matmul: w lives on the GPU but x is a {type(x).__name__}: copy x with "
                        "quanta.cuda.to_device(x), or bring w back to the host (w.numpy() for a "
                        "quanta.cuda.Array)")
    xdt = _dtype_code("matmul", "x", x)
    wdt = _dtype_code("matmul", "w", w)
    if w.ndim != 2:
        raise ValueError(f"matmul: w must have shape (N, K), got {w.dtype} with shape {w.shape}")
    N, K = w.shape
    x2 = _as_rows("matmul", x, K)
    out2 = out if (out is None or out.ndim == 2) else out.reshape(-1, N)
    y = _C.matmul(x2, xdt, w, wdt, out2)
    return out if out is not None else y.reshape(x.shape[:-1] + (N,))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True, window: Optional[int] = None,
              softcap: Optional[float] = None, scale: Optional[float] = None,
              cu_seqlens_q: Optional[np.ndarray] = None, cu_seqlens_k: Optional[np.ndarray] = None,
              out: Optional[np.ndarray] = None, backend: str = "auto") -> np.ndarray:
    """Flash attention (prefill): o[T, H, D] = softmax(mask(scale * q k^T)) v, float32 output.

    q: [T, H, D]; k, v: [S, Hkv, D], C-contiguous, all float32, all float16 or all bfloat16
    (ml_dtypes.bfloat16); H must be a multiple of Hkv (GQA; Hkv = 1 is MQA): query head h
    uses KV head h // (H // Hkv). Products and sums run in float32; the output is float32.
    Any D works; D = 64, 80, 96, 128, 256 have specialized kernels.

    Mask (per sequence with Tq queries and Sk keys): query i sits at position
    p = i + Sk - Tq (aligned bottom-right, so the last query is the last key's position)
    and sees key j when
        causal:          j <= p
        window=w (>= 0): j >= p - w, and also j <= p + w when causal=False.
    A query that sees no key (e.g. causal with Sk < Tq) gives a row of zeros, never NaN.
    softcap=c (> 0): logits s = scale * q.k become c * tanh(s / c) before the softmax.
    scale: default 1 / sqrt(D).
    cu_seqlens_q, cu_seqlens_k: int32 [n_seq + 1], non-decreasing from 0 to T and S: a varlen
    batch where sequence s owns queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys
    cu_seqlens_k[s]:cu_seqlens_k[s+1] and attends only within itself.
    out: optional float32 [T, H, D] to write into (must not overlap the inputs).
    backend: "auto" (C kernels) or "reference" (float64 NumPy, for tests).
    Tiles of 64 queries x 64 keys with an online softmax: T x S is never materialized; work
    is split over (sequence, query tile, head) across threads; results do not depend on the
    thread count.
    """
    op = "attention"
    dt = _dtype_code(op, "q", q)
    for name, a in (("k", k), ("v", v)):
        if _dtype_code(op, name, a) != dt:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {a.dtype} with shape {a.shape}")
    if window is not None and (not isinstance(window, (int, np.integer)) or window < 0):
        raise ValueError(f"{op}: window must be None or an int >= 0, got {window!r}")
    if softcap is not None and not (float(softcap) > 0):
        raise ValueError(f"{op}: softcap must be None or > 0, got {softcap!r}")
    if q.ndim != 3:
        raise ValueError(f"{op}: q must have shape (T, H, D), got {q.dtype} with shape {q.shape}")
    if scale is None:
        scale = 1.0 / float(np.sqrt(q.shape[2])) if q.shape[2] else 1.0
    if backend == "reference":
        for name, a in (("k", k), ("v", v)):
            if a.ndim != 3 or a.shape[2] != q.shape[2] or q.shape[1] % max(a.shape[1], 1) or a.shape[1] == 0:
                raise ValueError(f"{op}: {name} must have shape (S, Hkv, {q.shape[2]}) with H % Hkv == 0, "
                                 f"got {a.shape}")
        o = reference.attention(q, k, v, causal, window, softcap, scale, cu_seqlens_q, cu_seqlens_k)
        o = o.astype(np.float32)
        if out is not None:
            out[...] = o
            return out
        return o
    if backend != "auto":
        raise ValueError(f"{op}: backend must be 'auto' or 'reference', got {backend!r}")
    return _C.attention(q, k, v, dt, int(bool(causal)), -1 if window is None else int(window),
                        0.0 if softcap is None else float(softcap), float(scale), cu_seqlens_q, cu_seqlens_k, out)


def paged_attention(q: np.ndarray, cache, layer: int, block_tables: np.ndarray, seq_lens: np.ndarray,
                    out: Optional[np.ndarray] = None, scale: Optional[float] = None,
                    softcap: Optional[float] = None, window: Optional[int] = None,
                    backend: str = "auto") -> np.ndarray:
    """Decode attention over a paged KV cache: o[B, H, D], float32.

    q: [B, H, D] float32, float16 or bfloat16, one query token per sequence; H must be a
    multiple of the cache's Hkv (query head h reads KV head h // (H // Hkv)).
    cache: a `quanta.KVCache`; layer: which of its layers. Sequence b attends to its first
    seq_lens[b] keys (all of them: the query is the newest position, so the causal mask
    keeps every stored key), found in blocks block_tables[b, 0 .. ceil(seq_lens[b] /
    block_size) - 1] of the cache (key j at block_tables[b, j // block_size], row
    j % block_size).
    block_tables: int32 [B, max_blocks] (e.g. cache.block_tables(ids)); entries past a
    sequence's blocks are ignored, used ones must lie in [0, n_blocks).
    seq_lens: int32 [B] in [0, max_blocks * block_size]; a sequence with 0 keys gives zeros.
    int8 / fp8 caches are dequantized on the fly (code * per-block, per-head scale).
    scale: default 1 / sqrt(D); softcap as in `attention`; out: optional float32 [B, H, D].
    window=w (>= 0): sliding window as in `attention` — the query, at position
    seq_lens[b] - 1, sees only keys j >= seq_lens[b] - 1 - w.
    Flash-decoding: each sequence's keys are split in chunks of 256 processed in parallel
    (so one long sequence uses every core), then the partial softmaxes are merged in chunk
    order; results do not depend on the thread count.
    """
    from .kv_cache import KVCache
    op = "paged_attention"
    if not isinstance(cache, KVCache):
        raise TypeError(f"{op}: cache must be a quanta.KVCache, got {type(cache).__name__}")
    qdt = _dtype_code(op, "q", q)
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < cache.n_layers:
        raise ValueError(f"{op}: layer must be in [0, {cache.n_layers}), got {layer!r}")
    if softcap is not None and not (float(softcap) > 0):
        raise ValueError(f"{op}: softcap must be None or > 0, got {softcap!r}")
    if window is not None and (not isinstance(window, (int, np.integer)) or window < 0):
        raise ValueError(f"{op}: window must be None or an int >= 0, got {window!r}")
    D = cache.head_dim
    if q.ndim != 3 or q.shape[2] != D:
        raise ValueError(f"{op}: q must have shape (B, H, {D}) (the cache's head_dim), got {q.dtype} with shape {q.shape}")
    if scale is None:
        scale = 1.0 / float(np.sqrt(D))
    if backend == "reference":
        k, v = cache.dequantized(layer)
        o = reference.paged_attention(q, k, v, block_tables, seq_lens, scale, softcap, window).astype(np.float32)
        if out is not None:
            out[...] = o
            return out
        return o
    if backend != "auto":
        raise ValueError(f"{op}: backend must be 'auto' or 'reference', got {backend!r}")
    k, v, ks, vs = cache.kernel_arrays(layer)
    return _C.paged_attention(q, k, v, ks, vs, qdt, cache.kv_code, block_tables, seq_lens, float(scale),
                              0.0 if softcap is None else float(softcap), out, -1 if window is None else int(window))


# ---- elementwise layer kernels: RMSNorm, residual add, SiLU- and GELU-gated products, RoPE ----

def _rows(op: str, name: str, a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous")
    return a.reshape(-1, a.shape[-1])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
            out: Optional[np.ndarray] = None) -> np.ndarray:
    """RMSNorm over the last axis: y[..., N] = v / sqrt(mean(v^2) + eps) * weight[N], float32.

    x: float32, float16 or bfloat16 [..., N], C-contiguous. weight: float32 [N].
    residual: optional float32 [..., N] (x's shape), updated in place to residual + x before
    the norm, which then reads it (the fused add + norm of a pre-norm decoder layer).
    out: optional float32 of x's shape. Sums of squares in float64.
    """
    dt = _dtype_code("rmsnorm", "x", x)
    x2 = _rows("rmsnorm", "x", x)
    r2 = None
    if residual is not None:
        if not isinstance(residual, np.ndarray) or residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual must have x's shape {x.shape}, got "
                             f"{getattr(residual, 'shape', type(residual).__name__)}")
        r2 = _rows("rmsnorm", "residual", residual)
    o2 = None if out is None else _rows("rmsnorm", "out", out)
    y = _C.rmsnorm(x2, dt, weight, float(eps), r2, o2)
    return out if out is not None else y.reshape(x.shape)


def _elementwise_pair(op: str, an: str, a, bn: str, b, out) -> tuple:
    """Checks two same-shape C-contiguous operands (and out) of an elementwise op; returns
    their dtype codes."""
    adt, bdt = _dtype_code(op, an, a), _dtype_code(op, bn, b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: {an} and {bn} must have the same shape, got {a.shape} and {b.shape}")
    for name, arr in ((an, a), (bn, b)) + ((("out", out),) if out is not None else ()):
        if not arr.flags.c_contiguous:
            raise ValueError(f"{op}: {name} must be C-contiguous")
    if out is not None and out.shape != a.shape:
        raise ValueError(f"{op}: out must have shape {a.shape}, got {out.shape}")
    return adt, bdt


def add(a: np.ndarray, b: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Elementwise a + b (same shape; float32, float16 or bfloat16), float32 output; out may
    be a or b itself (a float32 residual stream updated in place)."""
    adt, bdt = _elementwise_pair("add", "a", a, "b", b, out)
    y = _C.add(a.reshape(-1), adt, b.reshape(-1), bdt, None if out is None else out.reshape(-1))
    return out if out is not None else y.reshape(a.shape)


def silu_mul(gate: np.ndarray, up: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """SwiGLU's product silu(gate) * up, silu(g) = g / (1 + exp(-g)); gate and up [..., F] of
    one dtype (float32, float16, bfloat16), C-contiguous; float32 output of the same shape."""
    dt, udt = _elementwise_pair("silu_mul", "gate", gate, "up", up, out)
    if udt != dt:
        raise TypeError(f"silu_mul: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    y = _C.silu_mul(gate.reshape(-1), up.reshape(-1), dt, None if out is None else out.reshape(-1))
    return out if out is not None else y.reshape(gate.shape)


def gelu_mul(gate: np.ndarray, up: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """GeGLU's product gelu_tanh(gate) * up, with GELU in its tanh form (PyTorch's
    gelu(approximate="tanh"), Gemma's gelu_pytorch_tanh):
    gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), computed as the equal
    g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3))) in float32.

    gate, up: [..., F] of one dtype (float32, float16, bfloat16), C-contiguous.
    out: optional float32 [..., F], C-contiguous; may be gate or up itself when they are
    float32. Returns float32 [..., F].
    """
    dt, udt = _elementwise_pair("gelu_mul", "gate", gate, "up", up, out)
    if udt != dt:
        raise TypeError(f"gelu_mul: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    y = _C.gelu_mul(gate.reshape(-1), up.reshape(-1), dt, None if out is None else out.reshape(-1))
    return out if out is not None else y.reshape(gate.shape)


def rope_frequencies(rotary_dim: int, theta: float = 10000.0, scaling: Optional[dict] = None):
    """(inv_freq float64 [rotary_dim // 2], attention_factor) for RoPE, following Hugging Face's
    rope_scaling: None / {"rope_type": "default"}; "linear" (factor); "llama3" (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings); "yarn" (factor,
    original_max_position_embeddings, beta_fast=32, beta_slow=1, mscale, mscale_all_dim,
    attention_factor, truncate=True). attention_factor multiplies cos and sin (YaRN)."""
    import math
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rope: rotary_dim must be even and >= 2, got {rotary_dim}")
    dim = rotary_dim
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    sc = dict(scaling or {})
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    factor = float(sc["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        lo_f, hi_f = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo_f, inv / factor, inv)
        smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi_f) & ~(wavelen > old / lo_f)
        return np.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        old = float(sc["original_max_position_embeddings"])

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        att = sc.get("attention_factor")
        if att is None:
            m, mad = sc.get("mscale"), sc.get("mscale_all_dim")
            att = get_mscale(factor, m) / get_mscale(factor, mad) if (m and mad) else get_mscale(factor)
        beta_fast, beta_slow = float(sc.get("beta_fast") or 32), float(sc.get("beta_slow") or 1)

        def corr_dim(n_rot):
            return (dim * math.log(old / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if sc.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        return (inv / factor) * (1 - extrap) + inv * extrap, float(att)
    raise ValueError(f"rope: unknown rope_type {kind!r} (default, linear, llama3, yarn)")


def rope(q: np.ndarray, k: Optional[np.ndarray], positions: np.ndarray, theta: float = 10000.0,
         style: str = "neox", rotary_dim: Optional[int] = None, scaling: Optional[dict] = None) -> None:
    """Rotary position embedding, in place on float32 q[T, H, D] and k[T, Hkv, D] (k may be None).

    positions: int32 [T], the position of each token. For pair i < rotary_dim / 2 (default
    rotary_dim = D) the angle is positions[t] * inv_freq[i] (computed in float64) with
    inv_freq from `rope_frequencies(rotary_dim, theta, scaling)` (plain, linear, Llama-3 or
    YaRN scaling, as Hugging Face's rope_scaling); (x1, x2) -> (x1 cos - x2 sin,
    x1 sin + x2 cos), cos and sin times YaRN's attention factor. style "neox" pairs
    (i, i + rotary_dim / 2) (Hugging Face Llama, Qwen, Mistral); "interleaved" pairs
    (2i, 2i + 1) (GPT-J, Meta's Llama checkpoints). Dims past rotary_dim are unchanged.
    """
    if style not in ("neox", "interleaved"):
        raise ValueError(f"rope: style must be 'neox' or 'interleaved', got {style!r}")
    if not isinstance(q, np.ndarray) or q.ndim != 3:
        raise ValueError(f"rope: q must have shape (T, H, D), got {getattr(q, 'shape', type(q).__name__)}")
    D = q.shape[2]
    rot = D if rotary_dim is None else int(rotary_dim)
    if rot > D:
        raise ValueError(f"rope: rotary_dim {rot} exceeds the head dim {D}")
    if k is not None and (not isinstance(k, np.ndarray) or k.ndim != 3 or k.shape[2] != D or k.shape[0] != q.shape[0]):
        raise ValueError(f"rope: k must have shape ({q.shape[0]}, Hkv, {D}), got {getattr(k, 'shape', None)}")
    inv, att = rope_frequencies(rot, theta, scaling)
    for x in (q, k):
        if x is not None:
            _C.rope(x, positions, inv, float(att), style == "neox")


# ---- Mixture-of-Experts ------------------------------------------------------------------

_SCORING = {"softmax": 0, "sigmoid": 1}


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


def router_logits(x: np.ndarray, router_w: np.ndarray) -> np.ndarray:
    """float32 logits[T, E] = x[T, d] @ router_w[E, d]^T: the product `moe` routes on (and
    `quanta.reference.moe`, so both pick the same experts). On quanta's float matmul, not
    NumPy's BLAS: whose idle worker threads would spin beside quanta's on the same cores."""
    rw = router_w if router_w.dtype == np.float32 else np.asarray(router_w, np.float32)
    return matmul(np.ascontiguousarray(x), np.ascontiguousarray(rw))


def moe(x: np.ndarray, router_w: np.ndarray, experts, top_k: int, scoring: str = "softmax",
        renormalize: bool = True, bias: Optional[np.ndarray] = None, n_group: Optional[int] = None,
        topk_group: Optional[int] = None, routed_scaling: float = 1.0, shared=None,
        out: Optional[np.ndarray] = None, return_counts: bool = False, backend: str = "auto"):
    """A whole Mixture-of-Experts block: y[T, d] from x[T, d].

    logits[T, E] = `router_logits` (x @ router_w^T), then in one C call: routing
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
    logits = router_logits(x, router_w)
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
