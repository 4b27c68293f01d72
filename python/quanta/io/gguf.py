"""Strict reader for GGUF files (versions 2 and 3, little-endian), weights memory-mapped.

File layout (all integers little-endian):
  magic b"GGUF" | version u32 | n_tensors u64 | n_kv u64
  n_kv x      key: string | value type u32 | value
  n_tensors x name: string | n_dims u32 | dims u64[n_dims] (ggml order: row length first)
              | ggml type u32 | offset u64 (relative to the data section)
  padding to `general.alignment` (default 32), then the data section
  string = length u64 + UTF-8 bytes;  array = element type u32 + count u64 + elements
  (an element of an array of arrays is itself element type + count + elements)

Every length, count and size is checked, with Python integers, against the bytes that are left
*before* anything is allocated, so a small hostile file cannot make the reader allocate more than
about its own size. Tensor data are never read: each tensor's `data` is a read-only NumPy view of
the file's read-only mmap, which stays mapped while any view is alive.
The gguf package supplies only constants (its own reader does not check sizes before allocating).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ._mmap import map_file, release
from .errors import ModelFileError

__all__ = ["GGUFFile", "GGUFTensor", "read_gguf"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_KEY_BYTES = 65535          # the GGUF specification's limit on key length
MAX_NAME_BYTES = 65535         # tensor names (llama.cpp itself allows fewer than 64)
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4            # arrays of arrays of ... (bounds the recursion)
_INT64_MAX = 2**63 - 1
_U64 = struct.Struct("<Q")

V = GGUFValueType
# value type -> (struct format, NumPy dtype of an array of it)
_SCALARS = {
    V.UINT8: ("<B", np.dtype("<u1")), V.INT8: ("<b", np.dtype("<i1")),
    V.UINT16: ("<H", np.dtype("<u2")), V.INT16: ("<h", np.dtype("<i2")),
    V.UINT32: ("<I", np.dtype("<u4")), V.INT32: ("<i", np.dtype("<i4")),
    V.UINT64: ("<Q", np.dtype("<u8")), V.INT64: ("<q", np.dtype("<i8")),
    V.FLOAT32: ("<f", np.dtype("<f4")), V.FLOAT64: ("<d", np.dtype("<f8")),
    V.BOOL: ("<B", np.dtype("<u1")),
}
_INTEGER_TYPES = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_VALUE_TYPES = {int(t) for t in V}
# The fewest bytes one element can take: a string is at least its length field, an array at least
# its element type and count. Used to reject a count before a list of that size is built.
_MIN_ELEM_BYTES = {**{t: s[1].itemsize for t, s in _SCALARS.items()}, V.STRING: 8, V.ARRAY: 12}
# Smallest key/value pair (length, 1-byte key, type, 1-byte value) and tensor info (length, 1-byte
# name, n_dims, one dim, type, offset): n_kv and n_tensors are bounded by the bytes left.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8

T = GGMLQuantizationType
_PLAIN_DTYPES = {
    T.F32: np.dtype("<f4"), T.F16: np.dtype("<f2"), T.BF16: np.dtype(ml_dtypes.bfloat16),
    T.F64: np.dtype("<f8"), T.I8: np.dtype("i1"), T.I16: np.dtype("<i2"),
    T.I32: np.dtype("<i4"), T.I64: np.dtype("<i8"),
}


@dataclass(eq=False)
class GGUFTensor:
    """One tensor. `shape` is in NumPy row-major order (the reverse of ggml's dims), e.g. a weight
    [N_out, K_in]. `data` is a read-only view of the file: an array of `shape` for F32, F16, BF16,
    F64 and the integer types; for block-quantized types uint8 [prod(shape[:-1]), row bytes]."""
    name: str
    shape: tuple
    ggml_type: int
    offset: int                     # absolute byte offset of the data in the file
    data: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass(eq=False)
class GGUFFile:
    """A parsed GGUF file: metadata values (str, int, float, bool; arrays as list of str, a NumPy
    array for numbers and bools, or a list of those for arrays of arrays) and tensors in file order."""
    path: str
    version: int
    alignment: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: dict[str, GGUFTensor] = field(repr=False)
    data_offset: int = 0            # start of the data section
    _mmap: mmap.mmap | None = field(default=None, repr=False, compare=False)


class _Cursor:
    """Bounds-checked reads from the mapped file; every failure is a ModelFileError."""

    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, field: str, message: str, offset: int | None = None):
        raise ModelFileError(self.path, field, self.pos if offset is None else offset, message)

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, field: str) -> None:
        if n > self.left:
            self.fail(field, f"needs {n} bytes but only {self.left} remain (file truncated?)")

    def unpack(self, fmt: str, size: int, field: str):
        self.need(size, field)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, field: str) -> int:
        return self.unpack("<I", 4, field)

    def u64(self, field: str) -> int:
        return self.unpack("<Q", 8, field)

    def string(self, field: str, max_bytes: int | None = None) -> str:
        start = self.pos
        n = self.u64(field + ".length")
        if n > self.left:
            self.fail(field + ".length", f"string length {n} exceeds the {self.left} bytes left in the file",
                      start)
        if max_bytes is not None and n > max_bytes:
            self.fail(field + ".length", f"string length {n} exceeds the limit of {max_bytes} bytes", start)
        raw = self.buf[self.pos:self.pos + n]
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(field, f"invalid UTF-8 ({e.reason})", self.pos + e.start)
        self.pos += n
        return s

    def strings(self, field: str, count: int) -> list:
        """`count` strings; the same checks as string(), in one loop (vocabularies hold 100k+)."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = []
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"{field}[{i}].length")
            n = unpack(buf, pos)[0]
            if n > size - pos - 8:
                self.pos = pos
                self.string(f"{field}[{i}]")        # raises with the message string() gives
            try:
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
            except UnicodeDecodeError:
                self.pos = pos
                self.string(f"{field}[{i}]")
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, vtype: int, field: str, depth: int = 0):
        if vtype in _SCALARS:
            at = self.pos
            fmt, dt = _SCALARS[vtype]
            v = self.unpack(fmt, dt.itemsize, field)
            if vtype == V.BOOL:
                if v > 1:
                    self.fail(field, f"bool value must be 0 or 1, got {v}", at)
                return bool(v)
            return float(v) if vtype in (V.FLOAT32, V.FLOAT64) else int(v)
        if vtype == V.STRING:
            return self.string(field)
        if vtype == V.ARRAY:
            return self.array(field, depth)
        self.fail(field + ".type", f"unknown value type {vtype}")

    def array(self, field: str, depth: int):
        at = self.pos
        etype = self.u32(field + ".element_type")
        if etype not in _VALUE_TYPES:
            self.fail(field + ".element_type", f"unknown array element type {etype}", at)
        count_at = self.pos
        count = self.u64(field + ".count")
        least = count * _MIN_ELEM_BYTES[etype]
        if least > self.left:
            self.fail(field + ".count", f"{count} elements of type {V(etype).name} need at least {least} "
                      f"bytes but only {self.left} remain", count_at)
        if etype in _SCALARS:
            dt = _SCALARS[etype][1]
            arr = np.frombuffer(self.buf, dt, count, self.pos).copy() if count else np.empty(0, dt)
            if etype == V.BOOL:
                if count and arr.max() > 1:
                    bad = int(np.argmax(arr > 1))
                    self.fail(f"{field}[{bad}]", f"bool value must be 0 or 1, got {arr[bad]}", self.pos + bad)
                arr = arr.view(np.bool_)
            else:
                arr = arr.astype(dt.newbyteorder("="), copy=False)
            self.pos += least
            return arr
        if etype == V.STRING:
            return self.strings(field, count)
        if depth + 1 >= MAX_ARRAY_DEPTH:
            self.fail(field + ".element_type", f"arrays nested more than {MAX_ARRAY_DEPTH} deep", at)
        return [self.array(f"{field}[{i}]", depth + 1) for i in range(count)]


def read_gguf(path) -> GGUFFile:
    """Parse and validate a GGUF file; tensor data stay in the file (memory-mapped, read-only).

    Raises ModelFileError (a ValueError) naming the field and byte offset of the first problem;
    OSError if the file cannot be opened.
    """
    path = os.fspath(path)
    mm, size = map_file(path, "magic", len(MAGIC))
    try:
        return _parse(path, mm, size)
    except BaseException:
        release(mm)
        raise


def _parse(path: str, mm: mmap.mmap, size: int) -> GGUFFile:
    c = _Cursor(path, mm, size)

    # ---- header
    c.need(4, "magic")
    magic = mm[0:4]
    if magic != MAGIC:
        c.fail("magic", f"expected {MAGIC!r}, got {magic!r} (not a GGUF file)")
    c.pos = 4
    version = c.u32("header.version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, 2, 3):
            why = "big-endian GGUF files are not supported; convert the file to little-endian"
        elif version == 1:
            why = "GGUF version 1 (32-bit counts) is obsolete and not supported; re-convert the model"
        else:
            why = f"unsupported GGUF version {version} (supported: 2, 3)"
        c.fail("header.version", why, 4)
    n_tensors = c.u64("header.n_tensors")
    n_kv = c.u64("header.n_kv")
    if n_kv * _MIN_KV_BYTES > c.left:
        c.fail("header.n_kv", f"{n_kv} key/value pairs cannot fit in the {c.left} bytes left", 16)
    if n_tensors * _MIN_TENSOR_INFO_BYTES > c.left - n_kv * _MIN_KV_BYTES:
        c.fail("header.n_tensors", f"{n_tensors} tensor infos cannot fit in the {c.left} bytes left", 8)

    # ---- metadata
    metadata: dict[str, Any] = {}
    where: dict[str, tuple] = {}       # key -> (value type, byte offset of the value)
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"metadata[{i}].key", MAX_KEY_BYTES)
        if not key:
            c.fail(f"metadata[{i}].key", "empty key", at)
        if key in metadata:
            c.fail(f"metadata[{key!r}]", "duplicate key", at)
        type_at = c.pos
        vtype = c.u32(f"metadata[{key!r}].type")
        if vtype not in _VALUE_TYPES:
            c.fail(f"metadata[{key!r}].type", f"unknown value type {vtype}", type_at)
        where[key] = (vtype, c.pos)
        metadata[key] = c.value(vtype, f"metadata[{key!r}]")

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        vtype, at = where["general.alignment"]
        alignment = metadata["general.alignment"]
        if vtype not in _INTEGER_TYPES:
            c.fail("metadata['general.alignment']", f"must be an integer, got type {V(vtype).name}", at)
        if alignment <= 0 or alignment & (alignment - 1):
            c.fail("metadata['general.alignment']", f"must be a power of two, got {alignment}", at)

    # ---- tensor infos
    infos = {}
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"tensor_info[{i}].name", MAX_NAME_BYTES)
        if not name:
            c.fail(f"tensor_info[{i}].name", "empty tensor name", at)
        if name in infos:
            c.fail(f"tensor_info[{i}].name", f"duplicate tensor name {name!r}", at)
        fld = f"tensors[{name!r}]"
        nd_at = c.pos
        n_dims = c.u32(fld + ".n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(fld + ".n_dims", f"must be 1..{MAX_DIMS}, got {n_dims}", nd_at)
        dims_at = c.pos
        c.need(8 * n_dims, fld + ".dims")
        dims = struct.unpack_from(f"<{n_dims}Q", mm, c.pos)
        c.pos += 8 * n_dims
        count = 1
        for j, d in enumerate(dims):
            if d == 0:
                c.fail(f"{fld}.dims[{j}]", "dimension is 0 (empty tensors are not supported)",
                       dims_at + 8 * j)
            count *= d
            if count > _INT64_MAX:
                c.fail(fld + ".dims", f"element count of dims {list(dims)} overflows int64", dims_at)
        type_at = c.pos
        t = c.u32(fld + ".type")
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            qtype = None
        if qtype is None or qtype not in GGML_QUANT_SIZES:
            c.fail(fld + ".type", f"unknown ggml tensor type {t}", type_at)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            c.fail(fld + ".dims[0]", f"row length {dims[0]} is not a multiple of the {qtype.name} block "
                   f"size {block}", dims_at)
        nbytes = count // block * type_size
        off_at = c.pos
        offset = c.u64(fld + ".offset")
        if offset % alignment:
            c.fail(fld + ".offset", f"offset {offset} is not a multiple of the alignment {alignment}", off_at)
        infos[name] = (dims, qtype, offset, nbytes, off_at)

    # ---- data section
    data_start = -(-c.pos // alignment) * alignment
    if infos and data_start > size:
        c.fail("data", f"data section would start at byte {data_start}, past the end of the "
               f"{size}-byte file", c.pos)
    for name, (dims, qtype, offset, nbytes, off_at) in infos.items():
        end = data_start + offset + nbytes
        if end > size:
            c.fail(f"tensors[{name!r}].offset", f"data [{data_start + offset}, {end}) ({nbytes} bytes of "
                   f"{qtype.name} {list(dims)}) extends past the end of the {size}-byte file", off_at)
    by_offset = sorted(infos.items(), key=lambda kv: kv[1][2])
    for (prev, pinfo), (name, info) in zip(by_offset, by_offset[1:]):
        if info[2] < pinfo[2] + pinfo[3]:
            c.fail(f"tensors[{name!r}].offset", f"data at relative offset {info[2]} overlaps tensor "
                   f"{prev!r} (relative bytes [{pinfo[2]}, {pinfo[2] + pinfo[3]}))", info[4])

    tensors = {}
    for name, (dims, qtype, offset, nbytes, _) in infos.items():
        start = data_start + offset
        shape = tuple(int(d) for d in reversed(dims))
        if qtype in _PLAIN_DTYPES:
            dt = _PLAIN_DTYPES[qtype]
            data = np.frombuffer(mm, dt, nbytes // dt.itemsize, start).reshape(shape)
        else:
            row_bytes = dims[0] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
            data = np.frombuffer(mm, np.uint8, nbytes, start).reshape(nbytes // row_bytes, row_bytes)
        tensors[name] = GGUFTensor(name, shape, int(qtype), start, data)
    return GGUFFile(path, version, alignment, metadata, tensors, data_start, mm)
