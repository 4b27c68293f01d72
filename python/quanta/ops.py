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
