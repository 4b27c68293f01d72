"""quanta.KVCache — a paged key/value cache for decode attention (quanta.ops.paged_attention).

Storage per layer: k and v blocks [n_blocks, block_size, Hkv, D] in float32, float16,
bfloat16, int8 or fp8 e4m3 (ml_dtypes.float8_e4m3fn); int8 / fp8 blocks carry a float32
scale per (block, KV head): k_scale, v_scale [n_blocks, Hkv], value = code * scale.
Sequences own blocks through a block table (the same block ids for every layer); a block
allocator hands them out on append and takes them back on free_sequence.

Quantized appends: the scale of a (block, head) is absmax / qmax (127 for int8, 448 for fp8)
of the rows written so far and only grows. Rows appended into a partially filled block whose
values fit the current scale are coded with it, leaving earlier codes untouched (exact);
when new rows need a larger scale, the block's earlier rows of that head are requantized
from their dequantized values to the new scale (one more rounding, at the new step).
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import ml_dtypes
import numpy as np

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# storage dtype -> code of the C kernel (enum qn_attn_dtype)
_KV_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, _BF16: 2, np.dtype(np.int8): 3, _FP8: 4}
_NAMES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
          "bfloat16": _BF16, "bf16": _BF16, "int8": np.int8, "fp8_e4m3": _FP8, "float8_e4m3fn": _FP8}
_QMAX = {3: 127.0, 4: 448.0}


class KVCacheFullError(MemoryError):
    """The cache has too few free blocks for an append; nothing was written."""


class KVCache:
    """Paged KV cache: KVCache(n_layers, n_blocks, block_size, n_kv_heads, head_dim, dtype).

    dtype: float32, float16, bfloat16, int8 or fp8_e4m3 (a NumPy / ml_dtypes dtype or its
    name). Arrays: k[layer], v[layer] [n_blocks, block_size, Hkv, D]; for int8 / fp8 also
    k_scale[layer], v_scale[layer] float32 [n_blocks, Hkv].
    """

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype=np.float16):
        for name, val in (("n_layers", n_layers), ("n_blocks", n_blocks), ("block_size", block_size),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        dt = _NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        try:
            dt = np.dtype(dt)
        except TypeError:
            dt = None
        if dt not in _KV_CODES:
            raise TypeError(f"KVCache: dtype must be float32, float16, bfloat16, int8 or fp8_e4m3, got {dtype!r}")
        self.n_layers, self.n_blocks, self.block_size = int(n_layers), int(n_blocks), int(block_size)
        self.n_kv_heads, self.head_dim, self.dtype = int(n_kv_heads), int(head_dim), dt
        self.kv_code = _KV_CODES[dt]
        self.quantized = self.kv_code >= 3
        # one array per K and V for all layers ([n_layers * n_blocks, ...], what the fused
        # decode step takes); k[layer] / v[layer] are views of it
        shape = (self.n_layers * self.n_blocks, self.block_size, self.n_kv_heads, self.head_dim)
        self.k_all, self.v_all = np.zeros(shape, dt), np.zeros(shape, dt)
        nb = self.n_blocks
        self.k = [self.k_all[l * nb:(l + 1) * nb] for l in range(self.n_layers)]
        self.v = [self.v_all[l * nb:(l + 1) * nb] for l in range(self.n_layers)]
        if self.quantized:
            self.k_scale = [np.zeros((self.n_blocks, self.n_kv_heads), np.float32) for _ in range(self.n_layers)]
            self.v_scale = [np.zeros((self.n_blocks, self.n_kv_heads), np.float32) for _ in range(self.n_layers)]
        else:
            self.k_scale = self.v_scale = [None] * self.n_layers
        self._free: List[int] = list(range(self.n_blocks - 1, -1, -1))  # pop() gives the lowest id
        self._tables: Dict[object, List[int]] = {}
        self._lens: Dict[object, List[int]] = {}

    # ---- allocator ----

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def add_sequence(self, seq_id) -> None:
        if seq_id in self._tables:
            raise ValueError(f"KVCache: sequence {seq_id!r} already exists")
        self._tables[seq_id] = []
        self._lens[seq_id] = [0] * self.n_layers

    def free_sequence(self, seq_id) -> None:
        blocks = self._get(seq_id)
        self._free.extend(reversed(blocks))
        del self._tables[seq_id], self._lens[seq_id]

    def _get(self, seq_id) -> List[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"KVCache: unknown sequence {seq_id!r}") from None

    def append(self, layer: int, seq_id, k: np.ndarray, v: np.ndarray) -> None:
        """Appends k, v [T, Hkv, D] (any float dtype) to sequence seq_id at layer `layer`.
        Raises KVCacheFullError, before writing anything, when the blocks run out."""
        table = self._get(seq_id)
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise ValueError(f"KVCache.append: layer must be in [0, {self.n_layers}), got {layer!r}")
        want = (self.n_kv_heads, self.head_dim)
        for name, a in (("k", k), ("v", v)):
            if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[1:] != want:
                raise ValueError(f"KVCache.append: {name} must have shape (T, {want[0]}, {want[1]}), got "
                                 f"{getattr(a, 'shape', type(a).__name__)}")
            if a.dtype.kind != "f" and a.dtype != _BF16:
                raise TypeError(f"KVCache.append: {name} must be a float array, got {a.dtype}")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"KVCache.append: k and v must have the same T, got {k.shape[0]} and {v.shape[0]}")
        T, bs = k.shape[0], self.block_size
        n0 = self._lens[seq_id][layer]
        self._grow(seq_id, table, n0 + T)
        kf, vf = k.astype(np.float32), v.astype(np.float32)
        pos = n0
        while pos < n0 + T:
            blk, row = table[pos // bs], pos % bs
            m = min(bs - row, n0 + T - pos)
            src = slice(pos - n0, pos - n0 + m)
            self._write(self.k[layer], self.k_scale[layer], blk, row, kf[src])
            self._write(self.v[layer], self.v_scale[layer], blk, row, vf[src])
            pos += m
        self._lens[seq_id][layer] = n0 + T

    def _grow(self, seq_id, table: List[int], tokens: int) -> None:
        """Allocates blocks until table holds `tokens` tokens (new blocks' scales zeroed);
        raises KVCacheFullError, allocating nothing, when too few are free."""
        bs = self.block_size
        need = -(-tokens // bs) - len(table)
        if need > len(self._free):
            raise KVCacheFullError(f"KVCache: sequence {seq_id!r} needs {need} more blocks of {bs} tokens, "
                                   f"{len(self._free)} free of {self.n_blocks}; nothing was written")
        for _ in range(max(need, 0)):
            b = self._free.pop()
            table.append(b)
            if self.quantized:
                for sc in self.k_scale + self.v_scale:
                    sc[b] = 0.0

    def reserve(self, seq_id, n: int) -> np.ndarray:
        """Room for n more tokens of sequence seq_id in every layer: allocates blocks and
        advances the sequence's length in all layers at once (the model's path; `append`
        is the per-layer one). Returns int64 slots [n] (block * block_size + row) for
        `write`. Raises KVCacheFullError, allocating nothing, when blocks run out."""
        table = self._get(seq_id)
        lens = self._lens[seq_id]
        n0, bs = lens[0], self.block_size
        if any(x != n0 for x in lens):
            raise ValueError(f"KVCache.reserve: sequence {seq_id!r} has different lengths per layer {lens}")
        self._grow(seq_id, table, n0 + n)
        pos = np.arange(n0, n0 + n)
        lens[:] = [n0 + n] * self.n_layers
        return np.asarray(table, np.int64)[pos // bs] * bs + pos % bs

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Stores float32 k, v [n, Hkv, D] at `slots` (from `reserve`) of layer `layer`."""
        if not self.quantized:
            flat = (self.n_blocks * self.block_size, self.n_kv_heads, self.head_dim)
            self.k[layer].reshape(flat)[slots] = k
            self.v[layer].reshape(flat)[slots] = v
            return
        bs = self.block_size
        start = 0
        n = len(slots)
        while start < n:  # runs of consecutive slots within one block
            blk, row = divmod(int(slots[start]), bs)
            end = start + 1
            while end < n and slots[end] == slots[end - 1] + 1 and slots[end] // bs == blk:
                end += 1
            self._write(self.k[layer], self.k_scale[layer], blk, row, np.asarray(k[start:end], np.float32))
            self._write(self.v[layer], self.v_scale[layer], blk, row, np.asarray(v[start:end], np.float32))
            start = end

    def _write(self, store: np.ndarray, scale, blk: int, row: int, x: np.ndarray) -> None:
        """Rows row .. row + len(x) of block blk from float32 x [m, Hkv, D]."""
        m = x.shape[0]
        if not self.quantized:
            store[blk, row:row + m] = x.astype(self.dtype)
            return
        qmax = _QMAX[self.kv_code]
        old = scale[blk].astype(np.float32)                          # [Hkv]
        amax = np.abs(x).max(axis=(0, 2)) if m else np.zeros_like(old)
        new = np.maximum(old, (amax / np.float32(qmax)).astype(np.float32))
        grow = new > old
        if row > 0 and grow.any():  # requantize earlier rows of the heads whose scale grows
            sub = store[blk]                                         # [bs, Hkv, D] view
            prev = sub[:row, grow].astype(np.float32) * old[grow][None, :, None]
            sub[:row, grow] = self._encode(prev, new[grow][None, :, None])
        scale[blk] = new
        store[blk, row:row + m] = self._encode(x, new[None, :, None])

    def _encode(self, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        qmax = _QMAX[self.kv_code]
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(s > 0, x / np.where(s > 0, s, 1), 0).astype(np.float32)
        y = np.clip(y, -qmax, qmax)
        if self.kv_code == 3:
            return np.rint(y).astype(np.int8)
        return y.astype(_FP8)

    # ---- views for the kernels ----

    def seq_lens(self, seq_ids: Iterable, layer: int = 0) -> np.ndarray:
        """int32 [B]: tokens stored for each sequence at `layer`."""
        return np.array([self._lens_of(s)[layer] for s in seq_ids], np.int32).reshape(-1)

    def _lens_of(self, seq_id):
        self._get(seq_id)
        return self._lens[seq_id]

    def block_tables(self, seq_ids: Iterable) -> np.ndarray:
        """int32 [B, max_blocks]: each sequence's block ids in order, padded with 0."""
        tabs = [self._get(s) for s in seq_ids]
        width = max([len(t) for t in tabs] + [1])
        out = np.zeros((len(tabs), width), np.int32)
        for i, t in enumerate(tabs):
            out[i, :len(t)] = t
        return out

    def dequantized(self, layer: int):
        """float64 (k, v) [n_blocks, block_size, Hkv, D]: the values the kernels read."""
        k = self.k[layer].astype(np.float64)
        v = self.v[layer].astype(np.float64)
        if self.quantized:
            k *= self.k_scale[layer].astype(np.float64)[:, None, :, None]
            v *= self.v_scale[layer].astype(np.float64)[:, None, :, None]
        return k, v

    def kernel_arrays(self, layer: int):
        """(k, v, k_scale, v_scale) as the C kernel takes them (fp8 viewed as uint8)."""
        k, v = self.k[layer], self.v[layer]
        if self.kv_code == 4:
            k, v = k.view(np.uint8), v.view(np.uint8)
        return k, v, self.k_scale[layer], self.v_scale[layer]

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, n_blocks={self.n_blocks}, block_size={self.block_size}, "
                f"n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"sequences={len(self._tables)}, free_blocks={self.free_blocks})")
