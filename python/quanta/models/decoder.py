"""The decoder-only transformer: pre-norm attention and MLP (dense SwiGLU / GeGLU or a Mixture
of Experts) blocks, optionally with Gemma's post-norms, over a float32 residual stream, on the
quanta kernels.

Two ways through it, sharing every layer:
  prefill  T tokens of one or more sequences (concatenated, ``cu_seqlens``): flash
           attention within each sequence; k and v optionally written to a paged cache.
  decode   one new token for each of B sequences: k and v written to the cache, attention
           over each sequence's cached keys (flash-decoding over the paged cache).
The residual stream is updated by the fused add + RMSNorm kernel: each block writes its
output to ``delta``; the next norm adds it into ``res`` and normalizes.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np

from .. import _C, ops
from ..formats import MoEExperts, QuantizedTensor, SharedExpert
from .config import ModelConfig
from .layers import Embedding, Linear, fuse_bias, fuse_rows

_MLP_CHUNK = 512  # prefill rows per MLP pass: bounds the [rows, ffn] scratch


class Attention:
    def __init__(self, cfg: ModelConfig, layer: int, wq, wk, wv, wo, bq=None, bk=None, bv=None,
                 q_norm=None, k_norm=None, bo=None):
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.hd, self.layer = H, Hkv, hd, layer
        self.nq, self.nkv = H * hd, Hkv * hd
        for name, w, n in (("q", wq, self.nq), ("k", wk, self.nkv), ("v", wv, self.nkv)):
            if tuple(w.shape) != (n, cfg.hidden_size):
                raise ValueError(f"layer {layer}: {name} projection has shape {tuple(w.shape)}, the config "
                                 f"implies {(n, cfg.hidden_size)}")
        if tuple(wo.shape) != (cfg.hidden_size, self.nq):
            raise ValueError(f"layer {layer}: o projection has shape {tuple(wo.shape)}, the config implies "
                             f"{(cfg.hidden_size, self.nq)}")
        fused = fuse_rows([wq, wk, wv])
        if fused is not None:
            self.qkv = Linear(fused, fuse_bias([bq, bk, bv], [self.nq, self.nkv, self.nkv]))
            self.q = self.k = self.v = None
        else:
            self.qkv = None
            self.q, self.k, self.v = Linear(wq, bq), Linear(wk, bk), Linear(wv, bv)
        self.o = Linear(wo, bo)
        self.qk_norm = cfg.qk_norm
        self.q_norm = None if q_norm is None else np.ascontiguousarray(q_norm, dtype=np.float32).reshape(-1)
        self.k_norm = None if k_norm is None else np.ascontiguousarray(k_norm, dtype=np.float32).reshape(-1)
        if self.qk_norm is not None:
            want = (hd, hd) if self.qk_norm == "head" else (self.nq, self.nkv)
            got = (getattr(self.q_norm, "size", None), getattr(self.k_norm, "size", None))
            if got != want:
                raise ValueError(f"layer {layer}: q/k norm weights have sizes {got}, expected {want}")
        self.eps = cfg.rms_eps
        self.window = cfg.layer_windows[layer]
        self.scale = 1.0 / float(np.sqrt(hd)) if cfg.attn_scale is None else cfg.attn_scale
        theta, scaling = cfg.rope_theta, cfg.rope_scaling
        if self.window is not None and cfg.rope_local_theta is not None:  # Gemma's local layers: own theta
            theta, scaling = cfg.rope_local_theta, None
        self.inv_freq, self.mscale = ops.rope_frequencies(cfg.rotary_dim, theta, scaling)
        self.neox = cfg.rope_style == "neox"

    def linears(self):
        return [l for l in (self.qkv, self.q, self.k, self.v, self.o) if l is not None]

    def project(self, h: np.ndarray, b) -> tuple:
        """q [M, H, hd], k, v [M, Hkv, hd] float32 C-contiguous, normed and rotated."""
        M = h.shape[0]
        if self.qkv is not None:
            self.qkv(h, b.qkv)
            if b.qkv_views is not None:
                q, k, v = b.qkv_views
            else:
                q, k, v = b.q, b.k, b.v
                np.copyto(q.reshape(M, -1), b.qkv[:, :self.nq])
                np.copyto(k.reshape(M, -1), b.qkv[:, self.nq:self.nq + self.nkv])
                np.copyto(v.reshape(M, -1), b.qkv[:, self.nq + self.nkv:])
        else:
            q, k, v = b.q, b.k, b.v
            self.q(h, q.reshape(M, -1))
            self.k(h, k.reshape(M, -1))
            self.v(h, v.reshape(M, -1))
        if self.qk_norm == "head":
            _C.rmsnorm(q.reshape(-1, self.hd), 0, self.q_norm, self.eps, None, b.qn.reshape(-1, self.hd))
            _C.rmsnorm(k.reshape(-1, self.hd), 0, self.k_norm, self.eps, None, b.kn.reshape(-1, self.hd))
            q, k = b.qn, b.kn
        elif self.qk_norm == "full":
            _C.rmsnorm(q.reshape(M, -1), 0, self.q_norm, self.eps, None, b.qn.reshape(M, -1))
            _C.rmsnorm(k.reshape(M, -1), 0, self.k_norm, self.eps, None, b.kn.reshape(M, -1))
            q, k = b.qn, b.kn
        _C.rope(q, b.positions, self.inv_freq, self.mscale, self.neox)
        _C.rope(k, b.positions, self.inv_freq, self.mscale, self.neox)
        return q, k, v

    def prefill(self, h, b, cache, slots, cu_seqlens):
        q, k, v = self.project(h, b)
        if cache is not None:
            cache.write(self.layer, slots, k, v)
        _C.attention(q, k, v, 0, 1, -1 if self.window is None else self.window - 1, 0.0, self.scale,
                     cu_seqlens, cu_seqlens, b.attn)
        self.o(b.attn.reshape(h.shape[0], -1), b.delta)

    def decode(self, h, b, cache, slots, block_tables, seq_lens):
        q, k, v = self.project(h, b)
        cache.write(self.layer, slots, k, v)
        kc, vc, ks, vs = cache.kernel_arrays(self.layer)
        _C.paged_attention(q, kc, vc, ks, vs, 0, cache.kv_code, block_tables, seq_lens, self.scale, 0.0, b.attn,
                           -1 if self.window is None else self.window - 1)
        self.o(b.attn.reshape(h.shape[0], -1), b.delta)


class DenseMLP:
    def __init__(self, cfg: ModelConfig, layer: int, gate, up, down, b_gate=None, b_up=None, b_down=None):
        I, D = cfg.intermediate_size, cfg.hidden_size
        for name, w, shape in (("gate", gate, (I, D)), ("up", up, (I, D)), ("down", down, (D, I))):
            if tuple(w.shape) != shape:
                raise ValueError(f"layer {layer}: mlp {name} projection has shape {tuple(w.shape)}, the config "
                                 f"implies {shape}")
        self.I = I
        self.act = _C.gelu_mul if cfg.mlp_act == "gelu_tanh" else _C.silu_mul
        fused = fuse_rows([gate, up])
        self.gate_up = None if fused is None else Linear(fused, fuse_bias([b_gate, b_up], [I, I]))
        self.gate = self.up = None
        if fused is None:
            self.gate, self.up = Linear(gate, b_gate), Linear(up, b_up)
        self.down = Linear(down, b_down)

    def linears(self):
        return [l for l in (self.gate_up, self.gate, self.up, self.down) if l is not None]

    def __call__(self, h, out, b):
        M = h.shape[0]
        if M <= _MLP_CHUNK:
            return self._rows(h, out, b.mlp(M))
        for r in range(0, M, _MLP_CHUNK):
            e = min(r + _MLP_CHUNK, M)
            self._rows(h[r:e], out[r:e], b.mlp(e - r))
        return out

    def _rows(self, h, out, s):
        if self.gate_up is not None:
            self.gate_up(h, s.gu)
            if not s.views:  # several rows: the halves of gu are strided, copy them out
                np.copyto(s.g, s.gu[:, :self.I])
                np.copyto(s.u, s.gu[:, self.I:])
        else:
            self.gate(h, s.g)
            self.up(h, s.u)
        self.act(s.g.reshape(-1), s.u.reshape(-1), 0, s.act.reshape(-1))
        self.down(s.act, out)
        return out


class MoEBlock:
    """Routed experts (+ an optional shared expert with an optional sigmoid gate).

    Quantized experts run in one C call (routing, grouping by expert, SwiGLU, weighted sum);
    float experts (float32 checkpoints, kept exact) run expert by expert on the float matmul.
    """

    def __init__(self, cfg: ModelConfig, layer: int, router, gates, ups, downs, shared=None, shared_gate=None):
        E, D, I = cfg.n_experts, cfg.hidden_size, cfg.moe_intermediate_size
        router = np.ascontiguousarray(np.asarray(router, dtype=np.float32))
        if router.shape != (E, D):
            raise ValueError(f"layer {layer}: router has shape {router.shape}, the config implies {(E, D)}")
        if not (len(gates) == len(ups) == len(downs) == E):
            raise ValueError(f"layer {layer}: {len(gates)}/{len(ups)}/{len(downs)} expert weights for {E} experts")
        for e in range(E):
            for name, w, shape in (("gate", gates[e], (I, D)), ("up", ups[e], (I, D)), ("down", downs[e], (D, I))):
                if tuple(w.shape) != shape:
                    raise ValueError(f"layer {layer}: expert {e} {name} has shape {tuple(w.shape)}, expected {shape}")
        self.router = router
        self.E, self.top_k, self.renorm = E, cfg.top_k, bool(cfg.norm_topk_prob)
        self.quantized = all(isinstance(w, QuantizedTensor) for w in list(gates) + list(ups) + list(downs))
        self.shared_gate = None if shared_gate is None else np.ascontiguousarray(
            np.asarray(shared_gate, dtype=np.float32).reshape(-1))
        shared_q = shared is not None and all(isinstance(w, QuantizedTensor) for w in shared)
        if self.quantized and (shared is None or shared_q):
            self.experts = MoEExperts(gates, ups, downs)
            self.shared = None if shared is None else SharedExpert(*shared, gate=self.shared_gate)
            self._c_shared = None if self.shared is None else self.shared._c
            self.float_experts = None
            self.shared_mlp = None
        else:
            self.experts = self.shared = None
            self.float_experts = [(Linear(g), Linear(u), Linear(d)) for g, u, d in zip(gates, ups, downs)]
            self.shared_mlp = None if shared is None else tuple(Linear(w) for w in shared)
        self._ra = (self.top_k, 0, int(self.renorm), None, 0, 0, float(cfg.routed_scaling))

    def linears(self):
        out = []
        if self.float_experts is not None:
            out += [l for t in self.float_experts for l in t]
        if self.shared_mlp is not None:
            out += list(self.shared_mlp)
        return out

    @property
    def nbytes(self) -> int:
        n = self.router.nbytes + sum(l.nbytes for l in self.linears())
        if self.experts is not None:
            n += self.experts.nbytes + (0 if self.shared is None else self.shared.nbytes)
        return n

    def __call__(self, h, out, b):
        logits = _C.matmul(h, 0, self.router, 0, None)  # as ops.router_logits
        if self.experts is not None:
            _C.moe(h, 0, logits, 0, *self._ra, None, None, self.experts._c, self._c_shared, out, None)
            return out
        w, ids = _C.moe_route(logits, 0, *self._ra)
        out[...] = 0
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            y = _swiglu(h[rows], *self.float_experts[int(e)])
            out[rows] += w[rows, slot][:, None] * y
        if self.shared_mlp is not None:
            y = _swiglu(h, *self.shared_mlp)
            if self.shared_gate is not None:
                z = _C.matmul(h, 0, self.shared_gate[None, :], 0, None)
                y *= (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
            out += y
        return out


def _swiglu(x, gate: Linear, up: Linear, down: Linear) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    M = x.shape[0]
    g = gate(x, np.empty((M, gate.N), np.float32))
    u = up(x, np.empty((M, up.N), np.float32))
    _C.silu_mul(g.reshape(-1), u.reshape(-1), 0, g.reshape(-1))
    return down(g, np.empty((M, down.N), np.float32))


class Block:
    """Pre-norm attention and MLP; with post_attn_norm and post_ffn_norm (Gemma's sandwich
    norms) each sublayer's output is also RMS-normed before it joins the residual stream."""

    def __init__(self, attn_norm, attn: Attention, ffn_norm, mlp, post_attn_norm=None, post_ffn_norm=None):
        self.attn_norm = np.ascontiguousarray(attn_norm, dtype=np.float32).reshape(-1)
        self.ffn_norm = np.ascontiguousarray(ffn_norm, dtype=np.float32).reshape(-1)
        self.attn, self.mlp = attn, mlp
        if (post_attn_norm is None) != (post_ffn_norm is None):
            raise ValueError("Block: post_attn_norm and post_ffn_norm come together")
        self.post_attn_norm = None if post_attn_norm is None else \
            np.ascontiguousarray(post_attn_norm, dtype=np.float32).reshape(-1)
        self.post_ffn_norm = None if post_ffn_norm is None else \
            np.ascontiguousarray(post_ffn_norm, dtype=np.float32).reshape(-1)


class Buffers:
    """Scratch arrays for M rows, and views that skip copies when M == 1."""

    def __init__(self, cfg: ModelConfig, M: int, fused_qkv: bool, mlp_sizes):
        f = np.float32
        D, H, Hkv, hd = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.M = M
        self.res = np.zeros((M, D), f)
        self.delta = np.empty((M, D), f)
        self.h = np.empty((M, D), f)
        self.positions = np.empty(M, np.int32)
        self.qkv = np.empty((M, (H + 2 * Hkv) * hd), f) if fused_qkv else None
        self.qkv_views = None
        if fused_qkv and M == 1:
            r = self.qkv[0]
            self.qkv_views = (r[:H * hd].reshape(1, H, hd), r[H * hd:(H + Hkv) * hd].reshape(1, Hkv, hd),
                              r[(H + Hkv) * hd:].reshape(1, Hkv, hd))
        self.q = np.empty((M, H, hd), f)
        self.k = np.empty((M, Hkv, hd), f)
        self.v = np.empty((M, Hkv, hd), f)
        self.qn = np.empty((M, H, hd), f) if cfg.qk_norm else None
        self.kn = np.empty((M, Hkv, hd), f) if cfg.qk_norm else None
        self.attn = np.empty((M, H, hd), f)
        self._mlp_sizes = mlp_sizes  # intermediate sizes of the dense MLPs
        self._mlp = {}

    def mlp(self, rows: int) -> "_MLPScratch":
        s = self._mlp.get(rows)
        if s is None:
            s = self._mlp[rows] = _MLPScratch(rows, self._mlp_sizes[0] if self._mlp_sizes else 1)
        return s


class _MLPScratch:
    """gate|up output gu [rows, 2I], the gate and up halves g, u [rows, I] (views of gu when
    rows == 1, where they are contiguous; else their own arrays) and the activation act."""

    def __init__(self, rows: int, I: int):
        f = np.float32
        self.gu, self.act = np.empty((rows, 2 * I), f), np.empty((rows, I), f)
        self.views = rows == 1
        if self.views:
            self.g, self.u = self.gu[:, :I], self.gu[:, I:]
        else:
            self.g, self.u = np.empty((rows, I), f), np.empty((rows, I), f)


class Decoder:
    """Embedding, blocks, final norm and LM head of a decoder-only transformer."""

    def __init__(self, cfg: ModelConfig, embed: Embedding, blocks: List[Block], norm, lm_head: Linear):
        if len(blocks) != cfg.n_layers:
            raise ValueError(f"{len(blocks)} blocks for {cfg.n_layers} layers")
        self.cfg, self.embed, self.blocks, self.lm_head = cfg, embed, blocks, lm_head
        self.norm = np.ascontiguousarray(norm, dtype=np.float32).reshape(-1)
        if self.norm.shape != (cfg.hidden_size,):
            raise ValueError(f"final norm has {self.norm.size} values, expected {cfg.hidden_size}")
        if (lm_head.N, lm_head.K) != (cfg.vocab_size, cfg.hidden_size) and lm_head.K != cfg.hidden_size:
            raise ValueError(f"lm_head has shape {(lm_head.N, lm_head.K)}, expected ({cfg.vocab_size}, {cfg.hidden_size})")
        self.vocab_size = lm_head.N
        self._fused_qkv = any(b.attn.qkv is not None for b in blocks)  # scratch for the layers that fuse
        self._mlp_sizes = sorted({b.mlp.I for b in blocks if isinstance(b.mlp, DenseMLP)})
        if len(self._mlp_sizes) > 1:
            raise ValueError(f"dense MLP layers of different widths {self._mlp_sizes} are not supported")
        self._local = threading.local()  # decode scratch per thread: one model serves many threads
        self._plan = self._make_plan()

    def _make_plan(self):
        """The fused decode step's validated weights, when every layer is a dense block with
        fused qkv and gate/up projections; else None (the op-by-op path runs)."""
        if not self.cfg.llama_block:  # the fused step runs the Llama-style block only
            return None
        if not all(isinstance(b.mlp, DenseMLP) and b.mlp.gate_up is not None and b.attn.qkv is not None
                   for b in self.blocks):
            return None
        mode = {None: 0, "head": 1, "full": 2}
        layers = tuple((b.attn_norm, b.ffn_norm, b.attn.qkv.plan_tuple(), b.attn.o.plan_tuple(),
                        b.mlp.gate_up.plan_tuple(), b.mlp.down.plan_tuple(), b.attn.q_norm, b.attn.k_norm,
                        mode[b.attn.qk_norm], -1 if b.attn.window is None else b.attn.window - 1)
                       for b in self.blocks)
        a, c = self.blocks[0].attn, self.cfg
        dims = (c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, self._mlp_sizes[0], c.rms_eps, a.scale,
                a.inv_freq, a.mscale, a.neox)
        return _C.decoder_plan(layers, dims)

    def fused_step_ok(self, cache) -> bool:
        return self._plan is not None and cache.kv_code <= 2

    def linears(self) -> List[Linear]:
        out = [self.lm_head]
        for b in self.blocks:
            out += b.attn.linears()
            out += b.mlp.linears()
        return out

    def buffers(self, M: int, keep: bool) -> Buffers:
        if not keep:
            return Buffers(self.cfg, M, self._fused_qkv, self._mlp_sizes)
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        b = bufs.get(M)
        if b is None:
            b = bufs[M] = Buffers(self.cfg, M, self._fused_qkv, self._mlp_sizes)
        return b

    def _run(self, ids, positions, step, b: Buffers, logit_rows):
        cfg = self.cfg
        M = ids.shape[0]
        b.positions[:] = positions
        b.res[...] = 0
        self.embed(ids, b.delta)
        eps = cfg.rms_eps
        for blk in self.blocks:
            _C.rmsnorm(b.delta, 0, blk.attn_norm, eps, b.res, b.h)
            step(blk.attn, b)
            if blk.post_attn_norm is None:
                _C.rmsnorm(b.delta, 0, blk.ffn_norm, eps, b.res, b.h)
                blk.mlp(b.h, b.delta, b)
            else:  # sandwich norms: h and delta swap roles inside the block
                _C.rmsnorm(b.delta, 0, blk.post_attn_norm, eps, None, b.h)
                _C.rmsnorm(b.h, 0, blk.ffn_norm, eps, b.res, b.delta)
                blk.mlp(b.delta, b.h, b)
                _C.rmsnorm(b.h, 0, blk.post_ffn_norm, eps, None, b.delta)
        _C.rmsnorm(b.delta, 0, self.norm, eps, b.res, b.h)
        h = b.h if logit_rows is None else np.ascontiguousarray(b.h[logit_rows])
        logits = self.lm_head(h, np.empty((h.shape[0], self.vocab_size), np.float32))
        if cfg.final_softcap is not None:
            c = np.float32(cfg.final_softcap)
            np.multiply(np.tanh(np.divide(logits, c, out=logits), out=logits), c, out=logits)
        return logits

    def prefill(self, ids: np.ndarray, positions: np.ndarray, cu_seqlens: Optional[np.ndarray] = None,
                cache=None, slots: Optional[np.ndarray] = None, logit_rows=None) -> np.ndarray:
        """Logits [len(logit_rows) or T, V] for T tokens (sequences concatenated per cu_seqlens)."""
        b = self.buffers(ids.shape[0], keep=False)
        return self._run(ids, positions, lambda a, b: a.prefill(b.h, b, cache, slots, cu_seqlens), b, logit_rows)

    def decode(self, ids: np.ndarray, positions: np.ndarray, cache, slots, block_tables, seq_lens) -> np.ndarray:
        """Logits [B, V] for one new token per sequence; seq_lens count the new token."""
        b = self.buffers(ids.shape[0], keep=True)
        if self.fused_step_ok(cache):
            b.res[...] = 0
            self.embed(ids, b.delta)
            _C.decoder_step(self._plan, b.res, b.delta, cache.k_all, cache.v_all, cache.kv_code, block_tables,
                            seq_lens, positions, slots)
            _C.rmsnorm(b.delta, 0, self.norm, self.cfg.rms_eps, b.res, b.h)
            return self.lm_head(b.h, np.empty((b.M, self.vocab_size), np.float32))
        return self._run(ids, positions, lambda a, b: a.decode(b.h, b, cache, slots, block_tables, seq_lens),
                         b, None)
