"""safetensors reader and writer: interchange with the safetensors package in both directions, and a
corpus of malformed files each rejected with ModelFileError naming the field."""
import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from quanta.io import ModelFileError, read_safetensors, save_safetensors

ALL_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def sample_tensors(rng) -> dict:
    out = {}
    for i, (name, dt) in enumerate(ALL_DTYPES.items()):
        shape = [(3, 5), (7,), (2, 1, 3), ()][i % 4]
        if dt == np.bool_:
            a = rng.random(shape) > 0.5
        elif np.dtype(dt).kind in "iu":
            a = rng.integers(-100, 100, shape).astype(dt)
        else:
            a = (rng.standard_normal(shape) * 4).astype(np.float32).astype(dt)
        out["t." + name.lower()] = np.asarray(a)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["empty.i8"] = np.zeros((3, 0), np.int8)
    return out


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_our_files_read_back(tmp_path, rng):
    tensors = sample_tensors(rng)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {"format": "np", "note": "ünï"})
    got, meta = read_safetensors(path)
    assert meta == {"format": "np", "note": "ünï"}
    assert set(got) == set(tensors)
    for k, a in tensors.items():
        _same(got[k], a)
        assert not got[k].flags.writeable
    assert os.listdir(tmp_path) == ["m.safetensors"]      # no temporary file left behind


def test_safetensors_package_reads_ours(tmp_path, rng):
    tensors = sample_tensors(rng)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {"k": "v"})
    # the Rust parser validates our header and layout; it hands back the raw bytes of each dtype
    parsed = dict(safetensors.deserialize(path.read_bytes()))
    assert set(parsed) == set(tensors)
    for k, a in tensors.items():
        info = parsed[k]
        assert info["dtype"] == {v: n for n, v in ALL_DTYPES.items()}[a.dtype.type]
        assert list(info["shape"]) == list(a.shape) and bytes(info["data"]) == a.tobytes()
    plain = {k: a for k, a in tensors.items() if a.dtype.type not in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                                                      ml_dtypes.float8_e5m2)}
    plain_path = tmp_path / "plain.safetensors"      # safetensors.numpy knows no bf16/f8 dtype
    save_safetensors(plain_path, plain)
    loaded = safetensors.numpy.load_file(str(plain_path))
    assert set(loaded) == set(plain)
    for k, a in plain.items():
        np.testing.assert_array_equal(loaded[k], a)
    # our layout keeps every tensor aligned to its item size
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    for k, a in tensors.items():
        begin = json.loads(path.read_bytes()[8:8 + n])[k]["data_offsets"][0]
        assert begin % a.dtype.itemsize == 0


def test_we_read_safetensors_package_files(tmp_path, rng):
    tensors = sample_tensors(rng)
    plain = {k: a for k, a in tensors.items() if a.dtype.type not in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                                                      ml_dtypes.float8_e5m2)}
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(plain, str(path), metadata={"a": "b"})
    got, meta = read_safetensors(path)
    assert meta == {"a": "b"}
    for k, a in plain.items():
        _same(got[k], a)
    specs = {k: safetensors.TensorSpec(dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
             for k, a in tensors.items() if k not in plain}
    path2 = tmp_path / "low.safetensors"
    path2.write_bytes(bytes(safetensors.serialize(specs)))
    got, meta = read_safetensors(path2)
    assert meta == {}
    for k in specs:
        _same(got[k], tensors[k])


def test_writer_normalizes_and_validates(tmp_path):
    path = tmp_path / "m.safetensors"
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    save_safetensors(path, {"big": big, "strided": strided})
    got, _ = read_safetensors(path)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["strided"], strided)
    os.chmod(path, 0o640)
    save_safetensors(path, {"x": np.zeros(2, np.float32)})      # replaces the file, keeps its mode
    assert os.stat(path).st_mode & 0o777 == 0o640 and list(read_safetensors(path)[0]) == ["x"]
    with pytest.raises(ValueError, match="unsupported dtype"):
        save_safetensors(path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="numpy array"):
        save_safetensors(path, {"l": [1, 2]})
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors(path, {}, {"k": 1})
    with pytest.raises(ValueError, match="tensor name"):
        save_safetensors(path, {"__metadata__": np.zeros(1)})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_views_are_mapped_not_copied(tmp_path):
    """A 100 MB file opens without reading its data (sparse file, peak traced memory < 1 MiB)."""
    n = 25 * 2**20
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    tracemalloc.start()
    try:
        tensors, _ = read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and tensors["w"].shape == (n,) and tensors["w"][-1] == 0


# ---- malformed files ---------------------------------------------------------------------------

def st(header, data=b"", pad=True) -> bytes:
    """A safetensors file from a header (dict, or raw str/bytes used as is) and data bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    h = header.encode() if isinstance(header, str) else header
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def e(dtype="F32", shape=(2,), offs=(0, 8), **extra):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs), **extra}


def safetensors_corpus():
    """(label, file bytes, text the error's field must contain)."""
    return [
        ("empty file", b"", "header_length"),
        ("5 bytes", b"\x05\0\0\0\0", "header_length"),
        ("header length past end", struct.pack("<Q", 100) + b"{}", "header_length"),
        ("header length 2^64-1", struct.pack("<Q", 2**64 - 1) + b"{}", "header_length"),
        ("header length over the cap", struct.pack("<Q", 200 * 2**20) + b"{}", "header_length"),
        ("header invalid UTF-8", st(b'{"a\xff":1}'), "header"),
        ("header not an object", st("[1, 2]"), "header"),
        ("header with BOM", st("\ufeff{}".encode()), "header"),
        ("header truncated JSON", st('{"w": {"dtype": "F32"'), "header"),
        ("duplicate tensor name", st(f'{{"w": {json.dumps(e())}, "w": {json.dumps(e())}}}', bytes(8)), "header"),
        ("duplicate key in entry", st('{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}',
                                      bytes(8)), "header"),
        ("NaN in header", st('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', bytes(8)), "header"),
        ("Infinity in metadata", st('{"__metadata__": {"a": -Infinity}}'), "header"),
        ("nested 100000 deep", st('{"__metadata__": ' + "[" * 100000 + "]" * 100000 + "}"), "header"),
        ("5000-digit integer", st('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}'),
         "header"),
        ("metadata a list", st({"__metadata__": ["a"]}), "header['__metadata__']"),
        ("metadata value an int", st({"__metadata__": {"a": 1}}), "header['__metadata__']['a']"),
        ("entry a list", st({"w": [1, 2]}), "header['w']"),
        ("entry missing data_offsets", st({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "header['w']"),
        ("entry with extra key", st({"w": e(extra=1)}, bytes(8)), "header['w']"),
        ("unknown dtype", st({"w": e(dtype="F128")}, bytes(8)), "header['w'].dtype"),
        ("dtype not a string", st({"w": e(dtype=4)}, bytes(8)), "header['w'].dtype"),
        ("shape negative", st({"w": e(shape=(-2,))}, bytes(8)), "header['w'].shape[0]"),
        ("shape float", st({"w": e(shape=(2.0,))}, bytes(8)), "header['w'].shape[0]"),
        ("shape bool", st({"w": e(shape=(True, 2))}, bytes(8)), "header['w'].shape[0]"),
        ("shape string", st({"w": e(shape=("2",))}, bytes(8)), "header['w'].shape[0]"),
        ("shape not a list", st({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8)),
         "header['w'].shape"),
        ("shape 40 dims", st({"w": e(shape=(1,) * 39 + (2,))}, bytes(8)), "header['w'].shape"),
        ("shape product 2^124", st({"w": e(shape=(2**62, 2**62))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets past end", st({"w": e(offs=(0, 16), shape=(4,))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets 2^64", st({"w": e(offs=(2**64, 2**64 + 8))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets reversed", st({"w": e(offs=(8, 0))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets negative", st({"w": e(offs=(-8, 0))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets three numbers", st({"w": e(offs=(0, 4, 8))}, bytes(8)), "header['w'].data_offsets"),
        ("offsets floats", st({"w": e(offs=(0.0, 8.0))}, bytes(8)), "header['w'].data_offsets"),
        ("wrong byte count", st({"w": e(shape=(3,))}, bytes(8)), "header['w'].data_offsets"),
        ("overlapping tensors", st({"a": e(), "b": e(offs=(4, 12))}, bytes(12)), "header['b'].data_offsets"),
        ("same range twice", st({"a": e(), "b": e()}, bytes(8)), "data_offsets"),
        ("gap between tensors", st({"a": e(), "b": e(offs=(12, 20))}, bytes(20)), "header['b'].data_offsets"),
        ("gap at the start", st({"a": e(offs=(8, 16))}, bytes(16)), "header['a'].data_offsets"),
        ("trailing bytes", st({"a": e()}, bytes(9)), "data"),
        ("data but no tensors", st({}, bytes(4)), "data"),
        ("BOOL byte 2", st({"m": e(dtype="BOOL", shape=(4,), offs=(0, 4))}, b"\0\1\2\0"), "data['m'][2]"),
    ]


CORPUS = safetensors_corpus()


@pytest.mark.parametrize("label,raw,field", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_rejected(tmp_path, label, raw, field):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as info:
            read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = info.value
    assert field in err.field, (label, str(err))
    assert str(err).startswith(f"{path}: {err.field}")
    assert peak < 2**20 + len(raw), (label, peak)


def test_corpus_size_and_valid_twins(tmp_path):
    """The corpus is large enough, and the files it breaks are valid when built correctly."""
    assert len(CORPUS) >= 20
    path = tmp_path / "ok.safetensors"
    for header, data in [({"a": e(), "b": e(offs=(8, 16))}, bytes(16)), ({"w": e()}, bytes(8)),
                         ({"z": e(shape=(0, 5), offs=(8, 8)), "a": e()}, bytes(8)), ({}, b""),
                         ({"__metadata__": {"a": "b"}}, b"")]:
        path.write_bytes(st(header, data, pad=False))
        tensors, _ = read_safetensors(path)
        assert set(tensors) == set(header) - {"__metadata__"}


def test_offsets_point_at_the_problem(tmp_path):
    path = tmp_path / "bad.safetensors"
    raw = st({"a": e(), "b": e(offs=(12, 20))}, bytes(20))
    path.write_bytes(raw)
    with pytest.raises(ModelFileError, match="gap of 4 bytes") as info:
        read_safetensors(path)
    n = struct.unpack("<Q", raw[:8])[0]
    assert info.value.offset == 8 + n + 8        # where the uncovered bytes begin


def test_every_prefix_rejected(tmp_path, rng):
    """Any truncation breaks the exact-coverage rule or the header; none is accepted."""
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int16)}, {"k": "v"})
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    with open(cut, "w+b") as f:
        for n in range(len(raw)):
            f.seek(0)
            f.write(raw[:n])
            f.truncate()
            f.flush()
            with pytest.raises(ModelFileError):
                read_safetensors(cut)


def test_random_mutations_never_crash(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": np.ones((3, 4), np.float32), "m": np.array([True, False]),
                            "b": np.arange(5, dtype=np.int16)}, {"k": "v"})
    raw = path.read_bytes()
    outcomes = {"ok": 0, "rejected": 0}
    fuzz = tmp_path / "fuzz.safetensors"
    with open(fuzz, "w+b") as f:
        for i in range(1500):
            b = bytearray(raw)
            for _ in range(int(rng.integers(1, 3))):
                b[int(rng.integers(0, len(b)))] = int(rng.choice([0, 1, 0x20, 0x22, 0x2C, 0x5B, 0x7B, 0x7D,
                                                                  ord("9"), int(rng.integers(0, 256))]))
            f.seek(0)
            f.write(bytes(b))
            f.truncate()
            f.flush()
            try:
                tensors, _ = read_safetensors(fuzz)
            except ModelFileError:
                outcomes["rejected"] += 1
                continue
            for t in tensors.values():
                t.tobytes()
            outcomes["ok"] += 1
    assert outcomes["rejected"] > 300 and outcomes["ok"] > 100, outcomes
