"""Strict reader and atomic writer for safetensors files (no dependency on the safetensors package).

File layout:
  N: u64 little-endian | N bytes of UTF-8 JSON (the header; may end in spaces) | data section
  header = {"__metadata__": {str: str}  (optional),
            name: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
  offsets are relative to the data section, little-endian row-major data.

The reader enforces the format's rules: JSON without duplicate keys or NaN/Infinity, known dtypes,
non-negative integer shapes, end - begin == prod(shape) * itemsize, and tensors covering the data
section exactly (no overlap, no gap, no trailing bytes). Tensors are read-only views of the file's
read-only mmap (nothing is copied); the mapping lives as long as any view.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from ._mmap import map_file, release
from .errors import ModelFileError

__all__ = ["DTYPES", "read_safetensors", "save_safetensors"]

MAX_HEADER_BYTES = 100 * 2**20
MAX_NDIM = 32

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


class _HeaderRejected(Exception):
    """Raised from inside json.loads hooks; turned into a ModelFileError by the caller."""


def _pairs_without_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _HeaderRejected(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name):
    raise _HeaderRejected(f"non-standard JSON constant {name}")


def parse_json_strict(text: str, path, field: str, base_offset: int | None):
    """json.loads that rejects duplicate keys, NaN/Infinity and runaway nesting with ModelFileError.
    `base_offset` is the byte offset of `text` in the file (None: no offsets reported)."""
    def at(char_pos):
        return None if base_offset is None else base_offset + len(text[:char_pos].encode("utf-8"))
    try:
        return json.loads(text, object_pairs_hook=_pairs_without_duplicates, parse_constant=_reject_constant)
    except _HeaderRejected as e:
        raise ModelFileError(path, field, base_offset, str(e)) from None
    except json.JSONDecodeError as e:
        raise ModelFileError(path, field, at(e.pos), f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ModelFileError(path, field, base_offset, "JSON nested too deeply") from None
    except ValueError as e:          # e.g. an integer literal longer than Python's digit limit
        raise ModelFileError(path, field, base_offset, f"invalid JSON: {e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. Tensors are read-only views of the mapped file
    in header order; metadata is the "__metadata__" dict ({} when absent).

    Raises ModelFileError (a ValueError) naming the field, and the byte offset where one applies.
    """
    path = os.fspath(path)
    mm, size = map_file(path, "header_length", 8)
    try:
        tensors, metadata = _parse(path, mm, size)
    except BaseException:
        release(mm)
        raise
    release(mm)         # unmapped now if no tensor views it (no tensors, or only empty ones)
    return tensors, metadata


def _parse(path: str, mm: mmap.mmap, size: int):
    n = struct.unpack_from("<Q", mm, 0)[0]
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(path, "header_length", 0, f"{n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if n > size - 8:
        raise ModelFileError(path, "header_length", 0, f"{n} exceeds the {size - 8} bytes after it")
    raw = mm[8:8 + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, "header", 8 + e.start, f"invalid UTF-8 ({e.reason})") from None
    if not text.startswith("{"):
        raise ModelFileError(path, "header", 8, "must be a JSON object starting with '{'")
    header = parse_json_strict(text, path, "header", 8)
    if not isinstance(header, dict):
        raise ModelFileError(path, "header", 8, "must be a JSON object")
    del raw, text

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ModelFileError(path, "header['__metadata__']", None,
                             f"must be an object of strings, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise ModelFileError(path, f"header['__metadata__'][{k!r}]", None,
                                 f"must be a string, got {type(v).__name__}")

    data_start = 8 + n
    data_len = size - data_start
    entries = []        # (begin, end, name, dtype, shape)
    for name, info in header.items():
        fld = f"header[{name!r}]"
        if not isinstance(info, dict):
            raise ModelFileError(path, fld, None, f"must be an object, got {type(info).__name__}")
        keys = set(info)
        if keys != {"dtype", "shape", "data_offsets"}:
            missing = sorted({"dtype", "shape", "data_offsets"} - keys)
            extra = sorted(keys - {"dtype", "shape", "data_offsets"})
            raise ModelFileError(path, fld, None, f"needs exactly dtype, shape, data_offsets "
                                 f"(missing {missing}, unexpected {extra})")
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFileError(path, fld + ".dtype", None, f"unknown dtype {dtype!r} "
                                 f"(supported: {', '.join(DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise ModelFileError(path, fld + ".shape", None, f"must be a list of at most {MAX_NDIM} "
                                 f"non-negative integers, got {repr(shape)[:80]}")
        for j, d in enumerate(shape):
            if not _is_int(d) or d < 0:
                raise ModelFileError(path, f"{fld}.shape[{j}]", None,
                                     f"must be a non-negative integer, got {repr(d)[:80]}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise ModelFileError(path, fld + ".data_offsets", None,
                                 f"must be [begin, end] integers, got {repr(offs)[:80]}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise ModelFileError(path, fld + ".data_offsets", None, f"[{begin}, {end}] is not a range "
                                 f"inside the {data_len}-byte data section")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ModelFileError(path, fld + ".data_offsets", data_start + begin,
                                 f"holds {end - begin} bytes but {dtype} {shape} needs {nbytes}")
        entries.append((begin, end, name, dtype, tuple(shape)))

    expected = 0
    prev = None
    for begin, end, name, _, _ in sorted(entries):
        if begin < expected:
            raise ModelFileError(path, f"header[{name!r}].data_offsets", data_start + begin,
                                 f"overlaps tensor {prev!r} (data offsets up to {expected})")
        if begin > expected:
            raise ModelFileError(path, f"header[{name!r}].data_offsets", data_start + expected,
                                 f"gap of {begin - expected} bytes before it (the data section must be "
                                 "covered exactly)")
        expected, prev = end, name
    if expected != data_len:
        raise ModelFileError(path, "data", data_start + expected,
                             f"{data_len - expected} trailing bytes after the last tensor")

    tensors = {}
    for begin, end, name, dtype, shape in entries:
        dt = DTYPES[dtype]
        if begin == end:
            arr = np.empty(shape, dt)
            arr.flags.writeable = False
        else:
            arr = np.frombuffer(mm, dt, (end - begin) // dt.itemsize, data_start + begin).reshape(shape)
            if dtype == "BOOL":
                raw = arr.view(np.uint8)
                if raw.max() > 1:
                    bad = int(np.argmax(raw.reshape(-1) > 1))
                    raise ModelFileError(path, f"data[{name!r}][{bad}]", data_start + begin + bad,
                                         f"BOOL byte must be 0 or 1, got {raw.reshape(-1)[bad]}")
        tensors[name] = arr
    return tensors, metadata


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                     ) -> None:
    """Write `tensors` (name -> array of a dtype in DTYPES) and string `metadata` as a safetensors
    file. Atomic: the bytes go to a temporary file in the same folder, which then replaces `path`.

    Tensors are laid out by descending item size, then name, and the header is padded with spaces to
    a multiple of 8 bytes, so every tensor starts aligned to its item size.
    """
    path = os.fspath(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save_safetensors: tensors must be a dict of arrays, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"save_safetensors: metadata must be a dict of str, "
                            f"got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"save_safetensors: metadata must map str to str, "
                                f"got {k!r}: {type(v).__name__}")
    arrays = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"save_safetensors: invalid tensor name {name!r}")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"save_safetensors: tensors[{name!r}] must be a numpy array, "
                            f"got {type(a).__name__}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in _NAMES:
            raise ValueError(f"save_safetensors: tensors[{name!r}] has unsupported dtype {a.dtype} "
                             f"(supported: {', '.join(str(d) for d in DTYPES.values())})")
        arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")   # (ascontiguousarray makes 0-d 1-d)

    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name in order:
                a = arrays[name]
                if a.size:
                    f.write(a.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
