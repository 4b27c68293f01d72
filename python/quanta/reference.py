"""quanta.reference — float64 NumPy twins of the kernels: the test oracle.

Written for clarity, independent of the C code: the panel layout is decoded here from its
definition (csrc/qn_formats.h), not through the C unpacker.
"""
from __future__ import annotations

import numpy as np

from .formats import CHUNK, PANEL, SUPER, QuantizedTensor

_PLANE_BYTES = {"nib": 256, "crumb": 128, "bit": 64}
_PLANES = {8: ("byte",), 6: ("nib", "crumb"), 5: ("nib", "bit"), 4: ("nib",), 3: ("crumb", "bit"), 2: ("crumb",)}


def unpack_codes(w: QuantizedTensor) -> np.ndarray:
    """uint8 codes[N, K] decoded from the panel layout."""
    N, K = w.shape
    bits = w.format.bits
    npan, pbytes = w.codes.shape
    nch = pbytes // (64 * bits)
    c = w.codes.reshape(npan, nch, 64 * bits)
    quads = np.zeros((npan, nch, 8, PANEL, 4), np.uint8)  # [panel, chunk, quad, row, j]
    off, shift = 0, 0
    for plane in _PLANES[bits]:
        if plane == "byte":
            quads = c.reshape(npan, nch, 8, PANEL, 4).copy()
            break
        nbytes = _PLANE_BYTES[plane]
        p = c[:, :, off:off + nbytes]
        if plane == "nib":
            v = p.reshape(npan, nch, 4, PANEL, 4)
            part = np.stack([v & 15, v >> 4], axis=3).reshape(npan, nch, 8, PANEL, 4)  # quad 2v, 2v+1
            width = 4
        elif plane == "crumb":
            v = p.reshape(npan, nch, 2, PANEL, 4)
            part = np.stack([(v >> (2 * i)) & 3 for i in range(4)], axis=3).reshape(npan, nch, 8, PANEL, 4)
            width = 2
        else:
            v = p.reshape(npan, nch, PANEL, 4)
            part = np.stack([(v >> i) & 1 for i in range(8)], axis=2)
            width = 1
        quads |= (part << shift).astype(np.uint8)
        shift += width
        off += nbytes
    codes = quads.transpose(0, 3, 1, 2, 4).reshape(npan * PANEL, nch * CHUNK)
    return codes[:N, :K]


def _per_row(a: np.ndarray, N: int) -> np.ndarray:
    npan, G, _ = a.shape
    return a.transpose(0, 2, 1).reshape(npan * PANEL, G)[:N]


def dequantize(w: QuantizedTensor) -> np.ndarray:
    """float64 W[N, K] from codes and scales, by the formulas of quanta.formats."""
    f = w.format
    N, K = w.shape
    q = unpack_codes(w).astype(np.float64)
    g = f.group or f.kpad(K)

    def expand(a):  # [N, G] -> [N, K]
        return np.repeat(a, g, axis=1)[:, :K]

    if f.scale == "bf16":
        s = (_per_row(w.scales, N).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        s = _per_row(w.scales, N).astype(np.float64)
    if f.nested:
        d = np.repeat(_per_row(w.supers, N).astype(np.float64), SUPER // g, axis=1)
        s = d * s
    if f.kind == "lut":
        return expand(s) * np.asarray(f.lut, np.float64)[q.astype(np.int64)]
    if f.kind == "sym":
        return expand(s) * (q - 2 ** (f.bits - 1))
    if f.offset == "zero":
        return expand(s) * (q - expand(_per_row(w.offsets, N).astype(np.float64)))
    if f.nested:
        dmin = np.repeat(_per_row(w.super_mins, N).astype(np.float64), SUPER // g, axis=1)
        m = -dmin * _per_row(w.offsets, N).astype(np.float64)
    elif f.scale == "bf16":
        m = (_per_row(w.offsets, N).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        m = _per_row(w.offsets, N).astype(np.float64)
    return expand(s) * q + expand(m)


def act_block(w: QuantizedTensor) -> int:
    """Inputs per int8 activation block for w's format: min(group, 256)."""
    K = w.shape[1]
    g = w.format.group or w.format.kpad(K)
    return min(g, SUPER)


def quantize_act(x: np.ndarray, fb: int) -> np.ndarray:
    """x[M, K] -> float64 x_hat: int8 per block of fb inputs (absmax / 127, round half to
    even), with the kernels' float32 operations, returned dequantized."""
    x = np.asarray(x, np.float32)
    M, K = x.shape
    out = np.zeros((M, K), np.float64)
    for k0 in range(0, K, fb):
        blk = x[:, k0:k0 + fb]
        amax = np.abs(blk).max(axis=1, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        q = np.clip(np.rint((blk * inv).astype(np.float32)), -127, 127)
        out[:, k0:k0 + fb] = q.astype(np.float64) * d.astype(np.float64)
    return out


def qmatmul(x: np.ndarray, w: QuantizedTensor, act_quant: bool = False) -> np.ndarray:
    """float64 y[M, N] = x[M, K] @ W[N, K]^T; act_quant models the int8 activations of the
    integer-format kernels."""
    xf = np.asarray(x).astype(np.float64)
    if act_quant:
        xf = quantize_act(np.asarray(x).astype(np.float32), act_block(w))
    return xf @ dequantize(w).T


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 y[M, N] = x[M, K] @ w[N, K]^T."""
    return np.asarray(x).astype(np.float64) @ np.asarray(w).astype(np.float64).T


def attention_mask(Tq: int, Sk: int, causal: bool, window) -> np.ndarray:
    """bool[Tq, Sk]: query i (at position p = i + Sk - Tq) sees key j iff j <= p when causal,
    p - window <= j when a window is given, and j <= p + window when not causal."""
    p = np.arange(Tq)[:, None] + Sk - Tq
    j = np.arange(Sk)[None, :]
    m = np.ones((Tq, Sk), bool)
    if causal:
        m &= j <= p
    if window is not None:
        m &= j >= p - window
        if not causal:
            m &= j <= p + window
    return m


def _attend(q, k, v, mask, scale, softcap):
    """float64 o[T, H, D] for one sequence; q[T, H, D], k, v[S, Hkv, D], mask[T, S]."""
    T, H, D = q.shape
    G = H // k.shape[1]
    o = np.zeros((T, H, D))
    for h in range(H):
        s = (q[:, h] @ k[:, h // G].T) * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = np.where(mask, s, -np.inf)
        mx = s.max(axis=1, keepdims=True) if s.shape[1] else np.full((T, 1), -np.inf)
        seen = np.isfinite(mx)
        p = np.where(mask, np.exp(s - np.where(seen, mx, 0.0)), 0.0)
        den = p.sum(axis=1, keepdims=True)
        o[:, h] = np.where(seen, p @ v[:, h // G] / np.where(den > 0, den, 1.0), 0.0)
    return o


def attention(q, k, v, causal=True, window=None, softcap=None, scale=None, cu_seqlens_q=None,
              cu_seqlens_k=None) -> np.ndarray:
    """float64 naive attention o[T, H, D] with the masks of quanta.ops.attention; fully
    masked rows give zeros."""
    q, k, v = (np.asarray(a).astype(np.float64) for a in (q, k, v))
    D = q.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    cq = [0, q.shape[0]] if cu_seqlens_q is None else list(np.asarray(cu_seqlens_q))
    ck = [0, k.shape[0]] if cu_seqlens_k is None else list(np.asarray(cu_seqlens_k))
    o = np.zeros(q.shape)
    for s in range(len(cq) - 1):
        qs, ks = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        mask = attention_mask(cq[s + 1] - cq[s], ck[s + 1] - ck[s], causal, window)
        o[qs] = _attend(q[qs], k[ks], v[ks], mask, scale, softcap)
    return o


def paged_attention(q, k_blocks, v_blocks, block_tables, seq_lens, scale=None, softcap=None,
                    window=None) -> np.ndarray:
    """float64 decode attention o[B, H, D]: q[B, H, D] against the first seq_lens[b] keys of the
    blocks block_tables[b] of k_blocks, v_blocks[n_blocks, block_size, Hkv, D] (already
    dequantized); with window w only keys j >= seq_lens[b] - 1 - w."""
    q = np.asarray(q).astype(np.float64)
    B, H, D = q.shape
    bs = k_blocks.shape[1]
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    o = np.zeros((B, H, D))
    for b in range(B):
        n = int(seq_lens[b])
        ids = np.asarray(block_tables[b][: -(-n // bs)], np.int64)
        k = np.asarray(k_blocks, np.float64)[ids].reshape(-1, *k_blocks.shape[2:])[:n]
        v = np.asarray(v_blocks, np.float64)[ids].reshape(-1, *v_blocks.shape[2:])[:n]
        mask = np.ones((1, n), bool)
        if window is not None:
            mask[0, :max(0, n - 1 - int(window))] = False
        o[b] = _attend(q[b][None], k, v, mask, scale, softcap)[0]
    return o


def rmsnorm(x, w, eps=1e-6, residual=None):
    """float64 y[..., N] = v / sqrt(mean(v^2) + eps) * w, v = x (+ residual when given)."""
    v = np.asarray(x).astype(np.float64)
    if residual is not None:
        v = v + np.asarray(residual, np.float64)
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def silu_mul(gate, up):
    """float64 silu(gate) * up."""
    g = np.asarray(gate).astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: the limit 0 is right
        return g / (1.0 + np.exp(-g)) * np.asarray(up).astype(np.float64)


def gelu_mul(gate, up):
    """float64 gelu_tanh(gate) * up, gelu_tanh(g) = 0.5 g (1 + tanh(y)), y = sqrt(2/pi) (g + 0.044715 g^3).

    Evaluated as the equal g / (1 + exp(-2y)): 1 + tanh(y) cancels for y << 0 (relative error
    1e-16 / (1 + tanh(y)), already 1e-5 in float64 at y = -13)."""
    g = np.asarray(gate).astype(np.float64)
    y = np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)
    with np.errstate(over="ignore"):  # exp(-2y) = inf for very negative g: the limit 0 is right
        return g / (1.0 + np.exp(-2.0 * y)) * np.asarray(up).astype(np.float64)


def rope(x, positions, inv_freq, mscale=1.0, neox=True):
    """float64 rotary embedding of x[T, nh, D] (see quanta.ops.rope): pairs (i, i + rot/2)
    for NeoX, (2i, 2i + 1) interleaved; dims past rot = 2 * len(inv_freq) unchanged."""
    x = np.asarray(x).astype(np.float64).copy()
    half = len(inv_freq)
    a = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    c, s = (mscale * np.cos(a))[:, None, :], (mscale * np.sin(a))[:, None, :]
    i1 = np.arange(half) if neox else 2 * np.arange(half)
    i2 = i1 + (half if neox else 1)
    x1, x2 = x[..., i1].copy(), x[..., i2].copy()
    x[..., i1] = x1 * c - x2 * s
    x[..., i2] = x1 * s + x2 * c
    return x


# ---- Mixture-of-Experts ------------------------------------------------------------------

def moe_route(logits: np.ndarray, top_k: int, scoring: str = "softmax", renormalize: bool = True, bias=None,
              n_group=None, topk_group=None, routed_scaling: float = 1.0):
    """float64 twin of quanta.ops.moe_route: (weights[T, k] float64, ids[T, k] int32), same
    selection rule, ties to the lower id, rows sorted by (-weight, id)."""
    L = np.asarray(logits).astype(np.float64)
    T, E = L.shape
    if scoring == "softmax":
        z = np.exp(L - L.max(axis=1, keepdims=True))
        S = z / z.sum(axis=1, keepdims=True)
    else:
        S = 1.0 / (1.0 + np.exp(-L))
    grouped = n_group is not None and n_group > 1
    if bias is None and not grouped:
        K = L
    else:
        K = S + (0.0 if bias is None else np.asarray(bias, np.float64)[None, :])
    W = np.zeros((T, top_k))
    ids = np.zeros((T, top_k), np.int32)
    for t in range(T):
        cand = np.arange(E)
        if grouped:
            gs = E // n_group
            gkey = np.array([np.sort(K[t, g * gs:(g + 1) * gs])[::-1][:2].sum() for g in range(n_group)])
            keep = np.lexsort((np.arange(n_group), -gkey))[:topk_group]
            cand = np.concatenate([np.arange(g * gs, (g + 1) * gs) for g in sorted(keep)])
        order = cand[np.lexsort((cand, -K[t, cand]))][:top_k]
        w = S[t, order]
        if renormalize and w.sum() > 0:
            w = w / w.sum()
        w = w * routed_scaling
        o2 = np.lexsort((order, -w))
        W[t], ids[t] = w[o2], order[o2]
    return W, ids


def _mlp(x, gate, up, down, act_quant):
    g = qmatmul(x, gate, act_quant=act_quant)
    u = qmatmul(x, up, act_quant=act_quant)
    h = silu_mul(g, u)
    return qmatmul(h.astype(np.float32) if act_quant else h, down, act_quant=act_quant)


def moe_experts(x, weights, ids, experts, shared=None, act_quant: bool = False):
    """float64 y[T, d] = sum_j weights[t, j] * expert_{ids[t, j]}(x_t) + the shared expert
    (times sigmoid(x_t . gate) when it has a gate), with dequantized weights; act_quant
    models the int8 activations of the integer formats (x and silu * up, rounded to float32
    first). Returns (y, counts[E])."""
    T = x.shape[0]
    E, d = experts.E, experts.d
    y = np.zeros((T, d))
    xin = np.asarray(x, np.float32) if act_quant else np.asarray(x).astype(np.float64)
    ids = np.asarray(ids)
    for e in range(E):
        rows, slots = np.nonzero(ids == e)
        if rows.size == 0:
            continue
        ex = experts[e]
        o = _mlp(xin[rows], ex["gate_proj"], ex["up_proj"], ex["down_proj"], act_quant)
        y[rows] += np.asarray(weights, np.float64)[rows, slots][:, None] * o
    if shared is not None and T > 0:
        o = _mlp(xin, shared["gate_proj"], shared["up_proj"], shared["down_proj"], act_quant)
        if shared.gate is not None:
            z = np.asarray(x).astype(np.float64) @ shared.gate.astype(np.float64)
            o = o / (1.0 + np.exp(-z))[:, None]
        y += o
    counts = np.bincount(ids.ravel(), minlength=E).astype(np.int64)
    return y, counts


def moe(x, router_w, experts, top_k, scoring="softmax", renormalize=True, bias=None, n_group=None,
        topk_group=None, routed_scaling=1.0, shared=None, act_quant: bool = False):
    """float64 twin of quanta.ops.moe. The router logits are the float32 product the
    kernel path routes on (`quanta.ops.router_logits`, checked by the matmul tests), so both
    choose the same experts."""
    from .ops import router_logits
    logits = router_logits(np.asarray(x), np.asarray(router_w, np.float32))
    w, ids = moe_route(logits, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling)
    return moe_experts(x, w, ids, experts, shared, act_quant)


# ---- GPTQ -------------------------------------------------------------------------------------

def _group_params(w: QuantizedTensor):
    """float32 (s, z, o) [N, n_groups]: w = s * (q - z) + o (lut: s * lut[q]), computed in
    float32 as the C kernels decode them."""
    f = w.format
    N = w.shape[0]
    f32 = np.float32
    if f.scale == "bf16":
        s = (_per_row(w.scales, N).astype(np.uint32) << 16).view(f32)
    else:
        s = _per_row(w.scales, N).astype(f32)
    z = np.zeros_like(s)
    o = np.zeros_like(s)
    if f.nested:
        g = f.group
        d = np.repeat(_per_row(w.supers, N).astype(f32), SUPER // g, axis=1)
        s = (d * s).astype(f32)
        if f.scale == "nested_u6":
            dmin = np.repeat(_per_row(w.super_mins, N).astype(f32), SUPER // g, axis=1)
            o = -(dmin * _per_row(w.offsets, N).astype(f32))
        else:
            z[:] = 2 ** (f.bits - 1)
    elif f.kind == "sym":
        z[:] = 2 ** (f.bits - 1)
    elif f.offset == "zero":
        z = _per_row(w.offsets, N).astype(f32)
    elif f.offset == "min":
        o = (_per_row(w.offsets, N).astype(np.uint32) << 16).view(f32) if f.scale == "bf16" else \
            _per_row(w.offsets, N).astype(f32)
    return s, z, o


def _nearest_codes(f, x, s, z, o):
    """Codes nearest x (float32 vectors) given per-element group parameters."""
    f32 = np.float32
    if f.kind == "lut":
        t = np.where(s != 0, x / np.where(s != 0, s, f32(1)), f32(0)).astype(f32)
        table = np.asarray(f.lut, f32)
        vals, first = np.unique(table, return_index=True)  # sorted; the lowest code of equal values
        if f.lut_kind != "table":
            t = np.clip(t, vals[0], vals[-1])
        mids = (f32(0.5) * (vals[:-1] + vals[1:])).astype(f32)
        return first[np.searchsorted(mids, t, side="left")].astype(np.uint8)
    qmax = 2 ** f.bits - 1
    safe = np.where(s != 0, s, f32(1))
    v = np.clip(((x - o) / safe).astype(f32), -4194304, 4194304)
    q = np.rint(v) + z
    return np.where(s != 0, np.clip(q, 0, qmax), np.clip(z, 0, qmax)).astype(np.uint8)


def _values(f, q, s, z, o):
    f32 = np.float32
    if f.kind == "lut":
        return (s * np.asarray(f.lut, f32)[q]).astype(f32)
    return (s * (q.astype(f32) - z) + o).astype(f32)


def gptq(w: np.ndarray, U: np.ndarray, fmt, cols=None, block: int = 128, static_params: bool = False):
    """Reference of _C.gptq: float32 NumPy with the kernel's operation order, one row at a
    time. w [N, K] in processing order, U [K, K] upper Cholesky factor of H^-1 (same
    order), cols the input index of each processing column. Returns (codes uint8 [N, K] in
    input order, group parameters (s, z, o) [N, n_groups], loss)."""
    from . import formats as F
    f = F.get(fmt)
    w = np.array(w, np.float32)
    U = np.asarray(U, np.float32)
    N, K = w.shape
    cols = np.arange(K) if cols is None else np.asarray(cols)
    g = f.group or f.kpad(K)
    span = SUPER if f.nested else g
    block = min(block, K)
    codes = np.zeros((N, K), np.uint8)
    G = f.kpad(K) // g
    s, z, o = (np.zeros((N, G), np.float32) for _ in range(3))
    if static_params:
        s, z, o = _group_params(F.quantize(w[:, np.argsort(cols)], f))
    loss = 0.0
    for jb in range(0, K, block):
        je = min(jb + block, K)
        err = np.zeros((N, je - jb), np.float32)
        for j in range(jb, je):
            oc = int(cols[j])
            if not static_params and j % span == 0:
                k1 = min(j + span, K)
                ps, pz, po = _group_params(F.quantize(np.ascontiguousarray(w[:, j:k1]), f))
                g0 = j // g
                n_g = min(ps.shape[1], G - g0)
                s[:, g0:g0 + n_g], z[:, g0:g0 + n_g], o[:, g0:g0 + n_g] = ps[:, :n_g], pz[:, :n_g], po[:, :n_g]
            gi = oc // g
            x = w[:, j].copy()
            q = _nearest_codes(f, x, s[:, gi], z[:, gi], o[:, gi])
            e = ((x - _values(f, q, s[:, gi], z[:, gi], o[:, gi])) / U[j, j]).astype(np.float32)
            codes[:, oc] = q
            err[:, j - jb] = e
            loss += float(0.5 * np.sum(e.astype(np.float64) ** 2))
            w[:, j + 1:je] -= e[:, None] * U[j, j + 1:je][None, :]
        for j in range(jb, je):
            w[:, je:] -= err[:, j - jb][:, None] * U[j, je:][None, :]
    return codes, (s, z, o), loss
