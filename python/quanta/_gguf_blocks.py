"""GGUF block types <-> quanta's panel layout, exactly (no re-quantization).

Block layouts (per row, blocks of 32 or 256 inputs), as GGUF stores them:
  Q4_0 (18 B / 32):  d f16, qs[16]: low nibble = input i, high nibble = input i + 16; w = d*(q-8)
  Q4_1 (20 B / 32):  d f16, m f16, qs[16] as Q4_0;                                      w = d*q + m
  Q5_0 (22 B / 32):  d f16, qh u32 (bit i = 5th bit of input i), qs[16] as Q4_0;       w = d*(q-16)
  Q5_1 (24 B / 32):  d f16, m f16, qh u32, qs[16];                                      w = d*q + m
  Q8_0 (34 B / 32):  d f16, qs int8[32];                                                w = d*q
  Q4_K (144 B / 256): d f16, dmin f16, 12 B of 6-bit (sc, mn) x 8, qs[128]: 64-input
                      chunks, low nibbles first;                         w = d*sc*q - dmin*mn
  Q5_K (176 B / 256): as Q4_K plus qh[32] (bit i of qh[l] = 5th bit of input 32*i + l)
  Q6_K (210 B / 256): ql[128], qh[64], sc int8[16], d f16;              w = d*sc*(q - 32)
"""
from __future__ import annotations

import numpy as np

from . import _C
from .formats import PRESETS, QuantizedTensor, _from_panels, _to_panels

_TYPES = {}


def _types():
    if not _TYPES:
        import gguf
        T = gguf.GGMLQuantizationType
        _TYPES.update({T.Q4_0: ("q4_0", 32, 18), T.Q4_1: ("q4_1", 32, 20), T.Q8_0: ("q8_0", 32, 34),
                       T.Q5_0: ("q5_0", 32, 22), T.Q5_1: ("q5_1", 32, 24),
                       T.Q4_K: ("q4_k", 256, 144), T.Q5_K: ("q5_k", 256, 176), T.Q6_K: ("q6_k", 256, 210)})
    return _TYPES


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _kscales_unpack(s: np.ndarray):
    """12 bytes -> sc[8], mn[8] (6-bit each)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _kscales_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    out = np.empty(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return out


def from_gguf(data: np.ndarray, qtype, shape) -> QuantizedTensor:
    types = _types()
    if qtype not in types:
        raise ValueError(f"from_gguf: unsupported GGUF type {qtype!r}; supported: "
                         f"{', '.join(t.name for t in types)}")
    name, bs, bb = types[qtype]
    N, K = (int(v) for v in shape)
    if N <= 0 or K <= 0 or K % bs:
        raise ValueError(f"from_gguf: {name} needs K a positive multiple of {bs}, got shape {(N, K)}")
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise TypeError(f"from_gguf: data must be uint8 bytes, got {data.dtype}")
    nb = K // bs
    if data.size != N * nb * bb:
        raise ValueError(f"from_gguf: {name} [{N}, {K}] needs {N * nb * bb} bytes, got {data.size}")
    blk = data.reshape(N, nb, bb)
    fmt = PRESETS[name]
    arr = {}
    if name in ("q4_0", "q4_1"):
        off = 2 if name == "q4_0" else 4
        qs = blk[:, :, off:off + 16]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)
        arr["scales"] = _to_panels(_f16(blk[:, :, 0:2]), np.float16)
        if name == "q4_1":
            arr["offsets"] = _to_panels(_f16(blk[:, :, 2:4]), np.float16)
    elif name in ("q5_0", "q5_1"):
        off = 2 if name == "q5_0" else 4
        qh = blk[:, :, off:off + 4].copy().view("<u4")                           # [N, nb, 1]
        qs = blk[:, :, off + 4:off + 20]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)                      # [N, nb, 32]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = (low | (high << 4)).reshape(N, K)
        arr["scales"] = _to_panels(_f16(blk[:, :, 0:2]), np.float16)
        if name == "q5_1":
            arr["offsets"] = _to_panels(_f16(blk[:, :, 2:4]), np.float16)
    elif name == "q8_0":
        codes = (blk[:, :, 2:34] ^ 0x80).reshape(N, K)
        arr["scales"] = _to_panels(_f16(blk[:, :, 0:2]), np.float16)
    elif name in ("q4_k", "q5_k"):
        sc, mn = _kscales_unpack(blk[:, :, 4:16])
        if name == "q4_k":
            qs = blk[:, :, 16:144]
        else:
            qh = blk[:, :, 16:48]
            qs = blk[:, :, 48:176]
        qs = qs.reshape(N, nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(N, nb, 256)
        if name == "q5_k":
            hb = (qh.reshape(N, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
            codes = codes | (hb.reshape(N, nb, 256) << 4)
        codes = codes.reshape(N, K)
        arr["scales"] = _to_panels(sc.reshape(N, nb * 8), np.uint8)
        arr["offsets"] = _to_panels(mn.reshape(N, nb * 8), np.uint8)
        arr["supers"] = _to_panels(_f16(blk[:, :, 0:2]), np.float16)
        arr["super_mins"] = _to_panels(_f16(blk[:, :, 2:4]), np.float16)
    else:  # q6_k
        ql = blk[:, :, 0:128].reshape(N, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        qh = blk[:, :, 128:192].reshape(N, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        codes = ((ql & 0x0F).reshape(N, nb, 256) | ((qh & 0x03).reshape(N, nb, 256) << 4)).reshape(N, K)
        arr["scales"] = _to_panels(blk[:, :, 192:208].view(np.int8).reshape(N, nb * 16), np.int8)
        arr["supers"] = _to_panels(_f16(blk[:, :, 208:210]), np.float16)
    arr["codes"] = _C.pack_codes(np.ascontiguousarray(codes, dtype=np.uint8), fmt.bits)
    return QuantizedTensor(fmt, (N, K), **arr)


def to_gguf(qt: QuantizedTensor):
    fmt = qt.format
    qtype = fmt.gguf_type
    if qtype is None or PRESETS.get(fmt.name) != fmt:
        raise ValueError(f"to_gguf: format {fmt} has no GGUF block type (GGUF presets: "
                         "q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)")
    name, bs, bb = _types()[qtype]
    N, K = qt.shape
    if K % bs:
        raise ValueError(f"to_gguf: GGUF {name} rows hold whole blocks of {bs} inputs; K = {K} is not a multiple")
    nb = K // bs
    codes = qt.unpacked_codes().reshape(N, nb, bs)
    out = np.empty((N, nb, bb), np.uint8)

    def f16b(a):  # [N, nb] float16 -> [N, nb, 2] bytes
        return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(N, nb, 2)

    scales = _from_panels(qt.scales, N)
    if name in ("q4_0", "q4_1"):
        off = 2 if name == "q4_0" else 4
        out[:, :, 0:2] = f16b(scales)
        if name == "q4_1":
            out[:, :, 2:4] = f16b(_from_panels(qt.offsets, N))
        out[:, :, off:off + 16] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    elif name in ("q5_0", "q5_1"):
        off = 2 if name == "q5_0" else 4
        out[:, :, 0:2] = f16b(scales)
        if name == "q5_1":
            out[:, :, 2:4] = f16b(_from_panels(qt.offsets, N))
        bits = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        out[:, :, off:off + 4] = np.bitwise_or.reduce(bits, axis=2).astype("<u4").view(np.uint8).reshape(N, nb, 4)
        out[:, :, off + 4:off + 20] = (codes[:, :, :16] & 0x0F) | ((codes[:, :, 16:] & 0x0F) << 4)
    elif name == "q8_0":
        out[:, :, 0:2] = f16b(scales)
        out[:, :, 2:34] = codes ^ 0x80
    elif name in ("q4_k", "q5_k"):
        out[:, :, 0:2] = f16b(_from_panels(qt.supers, N))
        out[:, :, 2:4] = f16b(_from_panels(qt.super_mins, N))
        out[:, :, 4:16] = _kscales_pack(scales.reshape(N, nb, 8), _from_panels(qt.offsets, N).reshape(N, nb, 8))
        c = codes.reshape(N, nb, 4, 2, 32)
        qs = ((c[:, :, :, 0, :] & 0x0F) | ((c[:, :, :, 1, :] & 0x0F) << 4)).reshape(N, nb, 128)
        if name == "q4_k":
            out[:, :, 16:144] = qs
        else:
            hb = (codes >> 4).reshape(N, nb, 8, 32).astype(np.uint8)
            out[:, :, 16:48] = np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1), axis=2)
            out[:, :, 48:176] = qs
    else:  # q6_k
        c = codes.reshape(N, nb, 2, 2, 64)
        out[:, :, 0:128] = ((c[:, :, :, 0, :] & 0x0F) | ((c[:, :, :, 1, :] & 0x0F) << 4)).reshape(N, nb, 128)
        h = (codes >> 4).reshape(N, nb, 2, 4, 32)
        out[:, :, 128:192] = (h[:, :, :, 0] | (h[:, :, :, 1] << 2) | (h[:, :, :, 2] << 4)
                              | (h[:, :, :, 3] << 6)).reshape(N, nb, 64)
        out[:, :, 192:208] = scales.reshape(N, nb, 16).view(np.uint8)
        out[:, :, 208:210] = f16b(_from_panels(qt.supers, N))
    return qtype, out.reshape(N, nb * bb)
