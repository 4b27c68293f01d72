"""How much quantization changes a weight matrix, a layer's output, and a whole model.

    weight_error(w, w_hat)                  MSE and SQNR of W_hat against W
    output_error(x, w, w_hat)               the same for the layer's output x @ W^T
    output_error(w=w, w_hat=w_hat, hessian=H)   ... from H = X^T X / M instead of X
    evaluate({"q4_k": m1, "nf4": m2}, ids, reference=m_f32)   perplexity, KL, top-1 per model
    perplexity(model, ids)                  one model's perplexity

Everything is computed in float64. Shapes: W, W_hat [N, K] (N outputs, K inputs), X [M, K],
H [K, K], token ids [n], logits [T, V].
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["Result", "evaluate", "output_error", "perplexity", "weight_error", "windows"]

_ROWS = 64  # logit rows per float64 log-softmax block: 64 x V doubles (25 MB at V = 49152)


# ---- one matrix ----

def _matrix(a, fn: str, name: str) -> np.ndarray:
    """a as a float64 2-D array; a QuantizedTensor (anything with dequantize()) is dequantized."""
    if hasattr(a, "dequantize"):
        a = a.dequantize()
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{fn}: {name} must be a real array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty 2-D array, got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf when noise is 0 (exact), -inf when only signal is 0."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def weight_error(w, w_hat) -> dict[str, float]:
    """Error of W_hat [N, K] (an array or a QuantizedTensor, dequantized) against W [N, K].

    mse     = mean over the N*K entries of (W - W_hat)^2
    sqnr_db = 10 log10(sum W^2 / sum (W - W_hat)^2)   (inf when W_hat == W)
    """
    w = _matrix(w, "weight_error", "w")
    w_hat = _matrix(w_hat, "weight_error", "w_hat")
    if w.shape != w_hat.shape:
        raise ValueError(f"weight_error: w_hat must have the shape of w {w.shape}, got {w_hat.shape}")
    d = w - w_hat
    noise = float(np.sum(d * d))
    return {"mse": noise / d.size, "sqnr_db": _db(float(np.sum(w * w)), noise)}


def output_error(x=None, w=None, w_hat=None, *, hessian=None) -> dict[str, float]:
    """Error of the layer output Y_hat = X W_hat^T against Y = X W^T, for activations X [M, K]
    or, instead of X, their second moment H = X^T X / M [K, K] (keyword `hessian`).

    With dW = W - W_hat [N, K]:

    mse     = mean over the M*N outputs of (Y - Y_hat)^2 = ||X dW^T||_F^2 / (M N)
            = trace(dW H dW^T) / N
    sqnr_db = 10 log10(||X W^T||_F^2 / ||X dW^T||_F^2) = 10 log10(trace(W H W^T) / trace(dW H dW^T))
    rel     = ||X dW^T||_F / ||X W^T||_F   (relative Frobenius error of the output)

    The two routes give the same numbers for H = X^T X / M (up to float64 rounding); H must be
    symmetric positive semi-definite. w_hat may be a QuantizedTensor (dequantized).
    """
    if (x is None) == (hessian is None):
        raise ValueError("output_error: pass exactly one of x (activations [M, K]) and hessian (X^T X / M, [K, K])")
    if w is None or w_hat is None:
        raise ValueError("output_error: w and w_hat are required")
    w = _matrix(w, "output_error", "w")
    w_hat = _matrix(w_hat, "output_error", "w_hat")
    if w.shape != w_hat.shape:
        raise ValueError(f"output_error: w_hat must have the shape of w {w.shape}, got {w_hat.shape}")
    N, K = w.shape
    d = w - w_hat
    if x is not None:
        x = _matrix(x, "output_error", "x")
        if x.shape[1] != K:
            raise ValueError(f"output_error: x must have shape (M, {K}) to match w, got {x.shape}")
        e, y = x @ d.T, x @ w.T  # [M, N]
        noise, signal = float(np.mean(e * e)), float(np.mean(y * y))
    else:
        h = _matrix(hessian, "output_error", "hessian")
        if h.shape != (K, K):
            raise ValueError(f"output_error: hessian must have shape ({K}, {K}) to match w, got {h.shape}")
        noise, signal = float(np.sum((d @ h) * d)) / N, float(np.sum((w @ h) * w)) / N
    if signal == 0:
        rel = 0.0 if noise == 0 else math.inf
    else:
        rel = math.sqrt(max(noise, 0.0) / signal)
    return {"mse": noise, "sqnr_db": _db(signal, noise), "rel": rel}


# ---- whole models ----

@dataclasses.dataclass(frozen=True)
class Result:
    """One model's scores on a token sequence (see `evaluate`).

    nll: mean negative log-likelihood of the scored tokens, in nats; ppl = exp(nll);
    n_tokens: how many tokens were scored. Against a reference (else None): kl, the mean
    over scored tokens of KL(P_ref || P_model) in nats; kl_p99, its 99th percentile over
    tokens; top1, the fraction of scored positions where both argmaxes agree;
    delta_ppl = ppl - the reference's ppl.
    """

    nll: float
    ppl: float
    n_tokens: int
    kl: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    delta_ppl: float | None = None

    def __str__(self) -> str:
        s = f"ppl {self.ppl:.4f}  nll {self.nll:.5f}"
        if self.kl is not None:
            s += f"  kl {self.kl:.5f}  kl_p99 {self.kl_p99:.4f}  top1 {self.top1:.4f}  dppl {self.delta_ppl:+.4f}"
        return s + f"  ({self.n_tokens} tokens)"


def windows(n: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first) of each window over n tokens: the model reads tokens[begin:end] and
    scores tokens[first:end], each from the logits of the position before it.

    Windows start every `stride` tokens; the last one ends at n. A window scores only the
    tokens no earlier window scored, so the first window scores all its tokens but the first
    (it has no context), and with stride < window every token but token 0 is scored exactly
    once, each with at least window - stride tokens of context. With stride == window the
    windows do not overlap and the first token of each window is not scored. Windows that
    would score nothing are left out.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride or window):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis, max subtracted first."""
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


class _Tally:
    """Running sums of one model's scores over the windows."""

    def __init__(self):
        self.nll, self.n, self.top1 = 0.0, 0, 0
        self.kl: list[np.ndarray] = []

    def result(self, ref: Result | None) -> Result:
        nll = self.nll / self.n
        ppl = math.exp(nll)
        if ref is None:
            return Result(nll, ppl, self.n)
        kl = np.concatenate(self.kl)
        return Result(nll, ppl, self.n, float(kl.mean()), float(np.percentile(kl, 99)), self.top1 / self.n,
                      ppl - ref.ppl)


def _score(tally: _Tally, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None) -> None:
    """Adds the scores of rows logits[i] (predicting targets[i]) to tally, in blocks of _ROWS rows."""
    for r in range(0, targets.size, _ROWS):
        lp = _log_softmax(logits[r:r + _ROWS])
        t = targets[r:r + _ROWS]
        tally.nll -= float(lp[np.arange(t.size), t].sum())
        tally.n += t.size
        if ref_logits is not None:
            lr = _log_softmax(ref_logits[r:r + _ROWS])
            p = np.exp(lr)
            # p log(p/q) is 0 where p is 0, whatever q
            terms = np.where(p > 0, p * (lr - lp), 0.0)
            tally.kl.append(terms.sum(axis=-1))
            tally.top1 += int(np.count_nonzero(lp.argmax(axis=-1) == lr.argmax(axis=-1)))


def _check_model(name: str, m) -> None:
    if not (callable(getattr(m, "forward", None)) and hasattr(getattr(m, "config", None), "vocab_size")):
        raise ValueError(f"evaluate: {name!r} must be a quanta Model (forward and config.vocab_size), "
                         f"got {type(m).__name__}")


def evaluate(models, tokens, reference=None, window: int = 512, stride: int | None = None,
             progress: bool = True) -> dict[str, Result]:
    """Perplexity of each model on `tokens` and, given a reference model, how far each model's
    next-token distributions are from the reference's.

    models: a dict name -> quanta Model, or one Model (reported as "model"). tokens: int [n]
    token ids (n >= 2), e.g. ``corpus.tokens(model.tokenizer, "eval")``.

    The sequence is read in windows of `window` tokens starting every `stride` tokens
    (default stride = window), the strided method of Hugging Face's perplexity guide: each
    window scores only the tokens not scored by an earlier window, the first window all but
    its first token (see `windows`). nll is the mean over scored tokens of -log P(token |
    the window's tokens before it), in nats, from a float64 log-softmax of the logits;
    ppl = exp(nll).

    With a reference: kl is the mean over scored positions of KL(P_ref || P_model) =
    sum_v P_ref(v) (log P_ref(v) - log P_model(v)), exact over the whole vocabulary in
    float64; kl_p99 its 99th percentile; top1 the fraction of positions where the argmax of
    both agrees; delta_ppl = ppl - the reference's ppl. The reference's own Result is
    returned under "reference" (kl 0, top1 1, delta_ppl 0).

    All models advance window by window: each window's reference forward runs once and is
    shared, so a window costs 1 + len(models) forwards, and at most the reference's and one
    model's logits [window, V] are held at a time. A model that `is` the reference reuses its
    logits. Returns dict name -> Result, "reference" first.
    """
    if not isinstance(models, Mapping):
        models = {"model": models}
    models = dict(models)
    if not models:
        raise ValueError("evaluate: no models given")
    if reference is not None and "reference" in models:
        raise ValueError("evaluate: the name 'reference' is reserved for the reference model")
    everyone = dict({"reference": reference} if reference is not None else {}, **models)
    for name, m in everyone.items():
        _check_model(name, m)
    vocab = {name: int(m.config.vocab_size) for name, m in everyone.items()}
    if len(set(vocab.values())) > 1:
        raise ValueError(f"evaluate: all models must share one vocabulary, got vocab sizes {vocab}")
    V = next(iter(vocab.values()))

    ids = np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError(f"evaluate: tokens must be a 1-D array of token ids, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("evaluate: tokens is empty")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"evaluate: tokens must be integer token ids, got dtype {ids.dtype}")
    if ids.size < 2:
        raise ValueError("evaluate: need at least 2 tokens (the first one is never scored)")
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"evaluate: token ids must lie in [0, {V}), got min {ids.min()} max {ids.max()}")
    ids = ids.astype(np.int64)
    window = int(window)
    stride = window if stride is None else int(stride)
    if window < 2:
        raise ValueError(f"evaluate: window must be >= 2, got {window}")
    if not 0 < stride <= window:
        raise ValueError(f"evaluate: stride must lie in [1, window={window}], got {stride}")
    for name, m in everyone.items():
        ctx = getattr(m.config, "max_position", None)
        if ctx is not None and min(window, ids.size) > ctx:
            raise ValueError(f"evaluate: window {window} exceeds the context of {name!r} ({ctx} tokens)")

    spans = windows(ids.size, window, stride)
    tallies = {name: _Tally() for name in everyone}
    from tqdm.auto import tqdm
    bar = tqdm(spans, desc="evaluate", unit="window", disable=not progress)
    for begin, end, first in bar:
        x = ids[begin:end]
        targets = ids[first:end]
        rows = slice(first - begin - 1, end - begin - 1)  # the logits that predict targets
        ref_logits = None
        if reference is not None:
            ref_logits = _logits(reference, x, V)[rows]
            _score(tallies["reference"], ref_logits, targets, None)
        for name, m in models.items():
            logits = ref_logits if m is reference else _logits(m, x, V)[rows]
            _score(tallies[name], logits, targets, ref_logits)
            del logits
        if progress:
            bar.set_postfix({n: f"{math.exp(t.nll / t.n):.3f}" for n, t in tallies.items()}, refresh=False)
    bar.close()

    out: dict[str, Result] = {}
    ref = None
    if reference is not None:
        t = tallies["reference"]
        nll = t.nll / t.n
        ref = out["reference"] = Result(nll, math.exp(nll), t.n, 0.0, 0.0, 1.0, 0.0)
    for name in models:
        out[name] = tallies[name].result(ref)
    return out


def _logits(model, x: np.ndarray, V: int) -> np.ndarray:
    logits = model.forward(x)
    if logits.shape != (x.size, V):
        raise ValueError(f"evaluate: {type(model).__name__}.forward returned logits of shape {logits.shape}, "
                         f"expected {(x.size, V)}")
    return logits


def perplexity(model, tokens, window: int = 512, stride: int | None = None, progress: bool = True) -> Result:
    """One model's Result (nll, ppl, n_tokens) on tokens; windows as in `evaluate`."""
    return evaluate({"model": model}, tokens, window=window, stride=stride, progress=progress)["model"]
