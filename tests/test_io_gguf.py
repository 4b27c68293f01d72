"""GGUF reader: exact round trips of files written by gguf.GGUFWriter, and a corpus of malformed
files that must each be rejected with ModelFileError naming the field, without allocating more than
the file's size and without reading the weights into memory."""
import gc
import mmap
import pickle
import struct
import time
import tracemalloc

import gguf
import ml_dtypes
import numpy as np
import pytest
import quanta
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from quanta.io import GGUFFile, ModelFileError, read_gguf

U64_MAX = 2**64 - 1


# ---- valid files written by the gguf package ---------------------------------------------------

def _metadata(w: gguf.GGUFWriter) -> dict:
    """Adds one value of every type; returns what read_gguf must give back."""
    expect = {"general.architecture": "llama"}
    scalars = [("u8", V.UINT8, 200), ("i8", V.INT8, -100), ("u16", V.UINT16, 60000), ("i16", V.INT16, -30000),
               ("u32", V.UINT32, 4_000_000_000), ("i32", V.INT32, -2_000_000_000), ("u64", V.UINT64, U64_MAX),
               ("i64", V.INT64, -(2**63)), ("f32", V.FLOAT32, 0.1), ("f64", V.FLOAT64, 0.1),
               ("yes", V.BOOL, True), ("no", V.BOOL, False)]
    for key, vtype, val in scalars:
        w.add_key_value("test." + key, val, vtype)
        expect["test." + key] = float(np.float32(val)) if vtype == V.FLOAT32 else val
    w.add_string("test.unicode.ключ", "värde ✓ 中文")
    expect["test.unicode.ключ"] = "värde ✓ 中文"
    w.add_array("test.tokens", ["<s>", "</s>", "hé", "▁the", " "])
    expect["test.tokens"] = ["<s>", "</s>", "hé", "▁the", " "]
    w.add_array("test.ints", [1, -2, 3])
    expect["test.ints"] = np.array([1, -2, 3], np.int32)
    w.add_array("test.scores", [0.5, -1.25])
    expect["test.scores"] = np.array([0.5, -1.25], np.float32)
    w.add_key_value("test.u64s", [1, U64_MAX], V.ARRAY, sub_type=V.UINT64)
    expect["test.u64s"] = np.array([1, U64_MAX], np.uint64)
    w.add_array("test.flags", [True, False, True])
    expect["test.flags"] = np.array([True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    expect["test.nested"] = [np.array([1, 2], np.int32), np.array([3], np.int32)]
    w.add_array("test.merges", ["a b", "ab c"])
    expect["test.merges"] = ["a b", "ab c"]
    return expect


def _tensors(rng) -> dict:
    """name -> (array given to GGUFWriter, raw_dtype or None, NumPy-order shape)."""
    w = rng.standard_normal((8, 256)).astype(np.float32)
    q4k = quanta.quantize(w, "q4_k").to_gguf()[1]      # the gguf package has no Q4_K quantizer
    return {
        "f32.3d": (rng.standard_normal((2, 3, 5)).astype(np.float32), None, (2, 3, 5)),
        "f32.1d": (rng.standard_normal(7).astype(np.float32), None, (7,)),
        "f16": (rng.standard_normal((3, 64)).astype(np.float16), None, (3, 64)),
        "bf16": (gguf.quants.quantize(w[:3, :64], T.BF16), T.BF16, (3, 64)),
        "i32": (np.arange(-6, 6, dtype=np.int32).reshape(3, 4), None, (3, 4)),
        "q4_0": (gguf.quants.quantize(w, T.Q4_0), T.Q4_0, (8, 256)),
        "q8_0": (gguf.quants.quantize(w[:5, :96], T.Q8_0), T.Q8_0, (5, 96)),
        "q4_k": (q4k, T.Q4_K, (8, 256)),
    }


def write_valid(path, rng, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    expect = _metadata(w)
    if alignment is not None:
        w.add_custom_alignment(alignment)
        expect["general.alignment"] = alignment
    tensors = _tensors(rng)
    for name, (arr, raw, _) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect, tensors


def _assert_value_equal(got, want, key):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), key
        for g, x in zip(got, want):
            _assert_value_equal(g, x, key)
    else:
        assert type(got) is type(want) and got == want, key


@pytest.mark.parametrize("alignment", [None, 64])
def test_round_trip(tmp_path, rng, alignment):
    path = tmp_path / "m.gguf"
    expect, tensors = write_valid(path, rng, alignment)
    g = read_gguf(path)
    assert isinstance(g, GGUFFile) and g.version == 3 and g.alignment == (alignment or 32)
    assert list(g.metadata) == list(expect)
    for key, want in expect.items():
        _assert_value_equal(g.metadata[key], want, key)
    assert list(g.tensors) == list(tensors)
    plain = {T.F32: np.float32, T.F16: np.float16, T.BF16: ml_dtypes.bfloat16, T.I32: np.int32}
    for name, (arr, raw, shape) in tensors.items():
        t = g.tensors[name]
        assert t.shape == shape and t.offset % g.alignment == 0 and t.offset >= g.data_offset
        assert not t.data.flags.writeable
        if t.ggml_type in plain:
            assert t.data.dtype == plain[t.ggml_type] and t.data.shape == shape
        else:
            assert t.data.dtype == np.uint8 and t.data.shape == arr.shape
        assert t.data.tobytes() == np.ascontiguousarray(arr).tobytes()


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_k"])
def test_block_quantized_dequantize_like_gguf(tmp_path, rng, name):
    path = tmp_path / "m.gguf"
    _, tensors = write_valid(path, rng)
    t = read_gguf(path).tensors[name]
    qt = quanta.QuantizedTensor.from_gguf(t.data, t.ggml_type, t.shape)
    want = gguf.quants.dequantize(tensors[name][0], tensors[name][1])
    np.testing.assert_array_equal(qt.dequantize().view(np.uint32), want.view(np.uint32))


def test_version_2_reads_like_version_3(tmp_path, rng):
    path = tmp_path / "m.gguf"
    expect, tensors = write_valid(path, rng)
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)       # v2 and v3 little-endian files share one layout
    path.write_bytes(bytes(raw))
    g = read_gguf(path)
    assert g.version == 2 and list(g.tensors) == list(tensors) and g.metadata["test.tokens"] == expect["test.tokens"]


def test_views_keep_the_mapping_alive(tmp_path, rng):
    path = tmp_path / "m.gguf"
    _, tensors = write_valid(path, rng)
    data = read_gguf(path).tensors["f32.3d"].data     # the GGUFFile itself is dropped at once
    gc.collect()
    np.testing.assert_array_equal(data, tensors["f32.3d"][0])
    assert isinstance(_buffer_owner(data), mmap.mmap)


def _buffer_owner(a):
    """The object at the end of an array's .base chain (a memoryview stands for the object it views)."""
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.obj if isinstance(a, memoryview) else a.base
    return a


def test_large_file_is_mapped_not_read(tmp_path):
    """A 100 MB tensor costs no memory to open: the data stay in the (sparse) file."""
    n = 5000
    header = build(tensors=[("big", [n, n], T.F32, 0)], data=b"")
    path = tmp_path / "big.gguf"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n * n * 4)
        f.seek(len(header) + n * n * 4 - 4)
        f.write(struct.pack("<f", 1.5))
    tracemalloc.start()
    try:
        g = read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    t = g.tensors["big"]
    assert peak < 2**20, peak
    assert t.shape == (n, n) and t.data[0, 0] == 0 and t.data[-1, -1] == 1.5


def test_error_carries_path_field_offset(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 7) + bytes(16))
    with pytest.raises(ModelFileError) as info:
        read_gguf(path)
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.path, e.field, e.offset) == (str(path), "header.version", 4)
    assert str(e) == f"{path}: header.version at byte 4: unsupported GGUF version 7 (supported: 2, 3)"
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.field == e.field


# ---- hand-built files for the malformed corpus ------------------------------------------------

def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name, dims, ttype, offset) -> bytes:
    return (s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ttype, offset))


def build(kvs=(), tensors=(), data=None, version=3, n_kv=None, n_tensors=None, align=32,
          magic=b"GGUF") -> bytes:
    """A GGUF file from raw parts; `tensors` as (name, ggml dims, type, offset). Without `data`, the
    data section is zeros sized to fit every tensor."""
    kvs = list(kvs)
    infos = [t if isinstance(t, bytes) else ti(*t) for t in tensors]
    head = (magic + struct.pack("<I", version)
            + struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(infos))
    if not tensors:
        return head + (data or b"")
    head += bytes(-len(head) % align)
    if data is None:
        end = 0
        for t in tensors:
            if not isinstance(t, bytes):
                _, dims, ttype, off = t
                blk, size = gguf.GGML_QUANT_SIZES[T(ttype)]
                end = max(end, off + int(np.prod(dims, dtype=object)) // blk * size)
        data = bytes(end)
    return head + data


U32 = lambda v: struct.pack("<I", v)
U64 = lambda v: struct.pack("<Q", v)
OK_KV = kv("general.architecture", V.STRING, s("llama"))
OK_T = ("w", [32, 2], T.F32, 0)


def gguf_corpus():
    """(label, file bytes, text the error's field must contain)."""
    c = [
        ("empty file", b"", "magic"),
        ("3 bytes", b"GGU", "magic"),
        ("bad magic", b"GGML" + bytes(20), "magic"),
        ("safetensors given as gguf", U64(2) + b"{}", "magic"),
        ("version 1", build(version=1), "header.version"),
        ("version 4", build(version=4), "header.version"),
        ("version 0", build(version=0), "header.version"),
        ("big-endian v3", build()[:4] + struct.pack(">I", 3) + bytes(16), "header.version"),
        ("truncated version", b"GGUF\x03\x00", "header.version"),
        ("truncated n_tensors", build()[:12], "header.n_tensors"),
        ("truncated n_kv", build()[:20], "header.n_kv"),
        ("n_kv 2^64-1", build(n_kv=U64_MAX), "header.n_kv"),
        ("n_kv 2^32", build([OK_KV], n_kv=2**32), "header.n_kv"),
        ("n_kv one past the data", build(n_kv=1), "header.n_kv"),
        ("n_tensors 2^64-1", build(n_tensors=U64_MAX), "header.n_tensors"),
        ("n_tensors 2^40", build([OK_KV], n_tensors=2**40), "header.n_tensors"),
        ("n_tensors one too many", build([OK_KV], [OK_T], n_tensors=2), "tensor_info[1]"),
        ("key length 2^64-1", build([U64(U64_MAX) + b"abc" + U32(V.UINT8) + b"\0" * 8]), "metadata[0].key.length"),
        ("key length past end", build([U64(40) + b"abc" + U32(V.UINT8) + b"\0" * 8]), "metadata[0].key.length"),
        ("key length over 65535", build([U64(70000) + b"k" * 70000 + U32(V.UINT8) + b"\0"]), "metadata[0].key.length"),
        ("key invalid UTF-8", build([kv(b"bad\xff\xfekey", V.UINT8, b"\1")]), "metadata[0].key"),
        ("key empty", build([kv("", V.UINT32, U32(1))]), "metadata[0].key"),
        ("duplicate key", build([kv("a.b", V.UINT8, b"\1"), kv("a.b", V.UINT8, b"\2")]), "metadata['a.b']"),
        ("unknown value type 13", build([kv("a", 13, b"\0" * 8)]), "metadata['a'].type"),
        ("unknown value type 2^32-1", build([kv("a", 2**32 - 1, b"\0" * 8)]), "metadata['a'].type"),
        ("truncated u64 value", build([kv("a", V.UINT64, b"\0\0\0")]), "metadata['a']"),
        ("truncated value type", build([s("abcdef") + b"\0\0"]), "metadata['abcdef'].type"),
        ("bool value 2", build([kv("a", V.BOOL, b"\2")]), "metadata['a']"),
        ("string length 2^64-1", build([kv("a", V.STRING, U64(U64_MAX) + b"xy")]), "metadata['a'].length"),
        ("string length past end", build([kv("a", V.STRING, U64(3) + b"xy")]), "metadata['a'].length"),
        ("string invalid UTF-8", build([kv("a", V.STRING, s(b"ok\xc3("))]), "metadata['a']"),
        ("array count 2^64-1", build([kv("a", V.ARRAY, U32(V.UINT8) + U64(U64_MAX) + b"\0" * 8)]), "metadata['a'].count"),
        ("string array count 2^40", build([kv("a", V.ARRAY, U32(V.STRING) + U64(2**40) + s("x"))]), "metadata['a'].count"),
        ("u64 array one element short", build([kv("a", V.ARRAY, U32(V.UINT64) + U64(3) + bytes(23))]), "metadata['a'].count"),
        ("array of arrays count 2^50", build([kv("a", V.ARRAY, U32(V.ARRAY) + U64(2**50) + bytes(24))]), "metadata['a'].count"),
        ("array element type 99", build([kv("a", V.ARRAY, U32(99) + U64(1) + b"\0")]), "metadata['a'].element_type"),
        ("arrays nested 5 deep", build([kv("a", V.ARRAY, (U32(V.ARRAY) + U64(1)) * 5 + U32(V.UINT8) + U64(0))]),
         "element_type"),
        ("huge string inside array", build([kv("a", V.ARRAY, U32(V.STRING) + U64(2) + s("ok") + U64(2**62) + b"xx")]),
         "metadata['a'][1].length"),
        ("invalid UTF-8 inside array", build([kv("a", V.ARRAY, U32(V.STRING) + U64(2) + s("ok") + s(b"\xff"))]),
         "metadata['a'][1]"),
        ("bool array value 5", build([kv("a", V.ARRAY, U32(V.BOOL) + U64(3) + b"\1\0\5")]), "metadata['a'][2]"),
        ("alignment 0", build([kv("general.alignment", V.UINT32, U32(0))]), "general.alignment"),
        ("alignment 48", build([kv("general.alignment", V.UINT32, U32(48))]), "general.alignment"),
        ("alignment as string", build([kv("general.alignment", V.STRING, s("32"))]), "general.alignment"),
        ("tensor name length 2^64-1", build([OK_KV], [U64(U64_MAX) + b"w" * 40]), "tensor_info[0].name.length"),
        ("tensor name empty", build([OK_KV], [("", [32], T.F32, 0)]), "tensor_info[0].name"),
        ("tensor name invalid UTF-8", build([OK_KV], [(b"w\xe2\x82", [32], T.F32, 0)]), "tensor_info[0].name"),
        ("duplicate tensor name", build([OK_KV], [("w", [32], T.F32, 0), ("w", [32], T.F32, 128)]), "tensor_info[1].name"),
        ("n_dims 0", build([OK_KV], [s("w") + U32(0) + U32(0) + U64(0) + bytes(16)]),
         "tensors['w'].n_dims"),
        ("n_dims 5", build([OK_KV], [("w", [1, 1, 1, 1, 1], T.F32, 0)]), "tensors['w'].n_dims"),
        ("n_dims 2^32-1", build([OK_KV], [s("w") + U32(2**32 - 1) + bytes(40)]), "tensors['w'].n_dims"),
        ("dims truncated", build([OK_KV], [s("w") + U32(4) + U64(32)]), "tensors['w'].dims"),
        ("dim 0", build([OK_KV], [("w", [32, 0], T.F32, 0)]), "tensors['w'].dims[1]"),
        ("dims product 2^64", build([OK_KV], [("w", [2**32, 2**32], T.F32, 0)], data=bytes(64)), "tensors['w'].dims"),
        ("dims product overflows int64", build([OK_KV], [("w", [2**62, 4], T.I8, 0)], data=bytes(64)),
         "tensors['w'].dims"),
        ("dims x type size past end", build([OK_KV], [("w", [2**30, 2**30], T.F64, 0)], data=bytes(64)),
         "tensors['w'].offset"),
        ("unknown tensor type 99", build([OK_KV], [s("w") + U32(1) + U64(32) + U32(99) + U64(0)], data=bytes(128)),
         "tensors['w'].type"),
        ("removed tensor type Q4_2", build([OK_KV], [s("w") + U32(1) + U64(32) + U32(4) + U64(0)], data=bytes(128)),
         "tensors['w'].type"),
        ("Q4_0 row not a block multiple", build([OK_KV], [("w", [33, 2], T.Q4_0, 0)], data=bytes(64)),
         "tensors['w'].dims[0]"),
        ("Q4_K row 128", build([OK_KV], [("w", [128], T.Q4_K, 0)], data=bytes(256)), "tensors['w'].dims[0]"),
        ("misaligned offset", build([OK_KV], [("w", [32], T.F32, 4)]), "tensors['w'].offset"),
        ("offset near 2^64", build([OK_KV], [("w", [32], T.F32, 2**64 - 32)], data=bytes(128)), "tensors['w'].offset"),
        ("offset past end", build([OK_KV], [("w", [32], T.F32, 4096)], data=bytes(128)), "tensors['w'].offset"),
        ("data one byte short", build([OK_KV], [OK_T])[:-1], "tensors['w'].offset"),
        ("tensors overlap fully", build([OK_KV], [("a", [32], T.F32, 0), ("b", [32], T.F32, 0)]), "tensors['b'].offset"),
        ("tensors overlap partly", build([OK_KV], [("a", [64], T.F32, 0), ("b", [32], T.F32, 128)]),
         "tensors['b'].offset"),
        ("data section starts past end", build([OK_KV], [OK_T])[:-(256 + 1)], "data"),
        ("custom alignment misaligned offset", build([kv("general.alignment", V.UINT32, U32(64)), OK_KV],
                                                     [("w", [32], T.F32, 32)], align=64), "tensors['w'].offset"),
    ]
    return c


CORPUS = gguf_corpus()


def test_corpus_is_large_and_valid_base_parses(tmp_path):
    assert len(CORPUS) >= 40
    path = tmp_path / "ok.gguf"
    path.write_bytes(build([OK_KV], [OK_T, ("v", [64], T.Q8_0, 256)]))
    g = read_gguf(path)
    assert g.tensors["w"].shape == (2, 32) and g.tensors["v"].data.shape == (1, 68)


@pytest.mark.parametrize("label,raw,field", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_rejected(tmp_path, label, raw, field):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as info:
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    e = info.value
    assert field in e.field, (label, str(e))
    assert e.offset is not None and 0 <= e.offset <= max(len(raw), 1) + 64, (label, str(e))
    assert str(e).startswith(f"{path}: {e.field} at byte {e.offset}: ")
    assert peak < 2**20 + len(raw), (label, peak)


def test_known_messages(tmp_path):
    cases = {"version 1": "version 1", "big-endian v3": "big-endian", "dims product overflows int64": "int64",
             "tensors overlap fully": "overlaps tensor 'a'", "duplicate key": "duplicate key"}
    by_label = {c[0]: c[1] for c in CORPUS}
    for label, text in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(by_label[label])
        with pytest.raises(ModelFileError, match=text):
            read_gguf(path)


def _small_valid(tmp_path) -> bytes:
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", 128)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ç"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    w.add_tensor("a", np.ones((2, 8), np.float32))
    w.add_tensor("b", gguf.quants.quantize(np.ones((1, 32), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class Rewriter:
    """One file rewritten in place: much faster than re-creating it with write_bytes, which on some
    file systems flushes the old contents to disk on every truncating open."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, "w+b")  # noqa: SIM115 (closed by close())

    def __call__(self, raw: bytes):
        self.f.seek(0)
        self.f.write(raw)
        self.f.truncate()
        self.f.flush()
        return self.path

    def close(self):
        self.f.close()


def test_every_prefix_rejected(tmp_path):
    """Every truncation before the end of the last tensor's data is rejected; cutting only the
    final padding leaves a complete, identical file."""
    raw = _small_valid(tmp_path)
    full = read_gguf(tmp_path / "small.gguf")
    t = full.tensors["b"]
    data_end = t.offset + t.data.nbytes
    rewrite = Rewriter(tmp_path / "cut.gguf")
    for n in range(len(raw)):
        path = rewrite(raw[:n])
        if n < data_end:
            with pytest.raises(ModelFileError):
                read_gguf(path)
        else:
            assert read_gguf(path).tensors["b"].data.tobytes() == t.data.tobytes()
    rewrite.close()


def test_random_mutations_never_crash(tmp_path):
    """Byte flips, overwritten counts and cut/spliced files: each parses or raises ModelFileError,
    and every tensor of a file that parses can be read in full."""
    raw = _small_valid(tmp_path)
    rng = np.random.default_rng(5)
    rewrite = Rewriter(tmp_path / "fuzz.gguf")
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(2000):
        b = bytearray(raw)
        kind = i % 4
        pos = int(rng.integers(0, len(b) - 8))
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        elif kind == 1:
            values = [0, 1, 2**31, 2**32, 2**63, U64_MAX, int(rng.integers(0, 2**20))]
            b[pos:pos + 8] = struct.pack("<Q", values[int(rng.integers(0, len(values)))])
        elif kind == 2:
            b[pos:pos + 4] = struct.pack("<I", int(rng.integers(0, 2**32)))
        else:
            del b[pos:pos + int(rng.integers(1, 16))]
        try:
            g = read_gguf(rewrite(bytes(b)))
        except ModelFileError:
            outcomes["rejected"] += 1
            continue
        for t in g.tensors.values():
            t.data.tobytes()
        outcomes["ok"] += 1
    rewrite.close()
    assert outcomes["rejected"] > 500 and outcomes["ok"] > 100, outcomes


def hostile_gguf_files():
    """200+ tiny files declaring huge sizes, counts or offsets."""
    out = [c[1] for c in CORPUS]
    for k in range(20, 64):
        n = 2**k + 3
        out += [build(n_kv=n), build([OK_KV], n_tensors=n),
                build([kv("a", V.STRING, U64(n) + b"x")]),
                build([kv("a", V.ARRAY, U32(V.INT64) + U64(n) + bytes(8))]),
                build([OK_KV], [("w", [n, 2**(64 - k)], T.F32, 0)], data=bytes(64))]
    return out


def test_hostile_files_rejected_fast(tmp_path):
    files = hostile_gguf_files()
    assert len(files) >= 200
    worst = 0.0
    for i, raw in enumerate(files):
        path = tmp_path / f"h{i}.gguf"
        path.write_bytes(raw)
        best = float("inf")
        for _ in range(3):      # best of 3: a shared machine can stall any single run
            t0 = time.perf_counter()
            with pytest.raises(ModelFileError):
                read_gguf(path)
            best = min(best, time.perf_counter() - t0)
        worst = max(worst, best)
    assert worst < 0.010, worst
