"""Formats: presets, make(), quantize/dequantize, the panel layout, GGUF byte exactness."""
import pickle

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import quanta
from quanta import formats as F
from quanta import reference as R

GGUF = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}


def weights(rng, N, K):
    # rows of very different magnitude, some zero groups, some outliers
    w = (rng.standard_normal((N, K)) * np.exp(rng.standard_normal((N, 1)))).astype(np.float32)
    w[0, : min(K, 64)] = 0.0
    if N > 2:
        w[2, 5 % K] = 40.0
    return w


def check_dequant(qt):
    """C dequantize (one float32 rounding of s*q + m) against the float64 decoding: sums
    s*q + m may cancel, so the bound is float32 resolution at the tensor's magnitude."""
    ref = R.dequantize(qt)
    np.testing.assert_allclose(qt.dequantize(), ref, rtol=2e-7, atol=2e-7 * max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("name", list(F.PRESETS))
def test_preset_roundtrip_and_reference(rng, name):
    fmt = F.PRESETS[name]
    N, K = 37, 768
    w = weights(rng, N, K)
    qt = quanta.quantize(w, name)
    assert qt.shape == (N, K) and qt.format == fmt
    dq = qt.dequantize()
    assert dq.dtype == np.float32 and dq.shape == (N, K)
    # the C dequantizer equals the independent float64 decoding of the layout
    check_dequant(qt)
    # the C unpacker equals the reference decoding of the layout
    np.testing.assert_array_equal(qt.unpacked_codes(), R.unpack_codes(qt))
    # quantization error is what the bits allow
    rel = np.linalg.norm(dq - w) / np.linalg.norm(w)
    limit = {8: 0.012, 6: 0.03, 5: 0.05}.get(fmt.bits, 0.13)
    if name == "fp8_e5m2":
        limit = 0.07
    if name == "fp8_e4m3":
        limit = 0.04
    assert rel < limit, f"{name}: relative error {rel:.4f}"
    # zero groups stay exactly zero
    assert np.all(dq[0, :64] == 0)


@pytest.mark.parametrize("name", list(GGUF))
def test_gguf_exact(rng, name):
    N, K = 9, 512
    w = weights(rng, N, K)
    qt = quanta.quantize(w, name)
    qtype, raw = qt.to_gguf()
    assert qtype == GGUF[name]
    assert raw.shape == (N, K // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    # our dequantization is bit-for-bit GGUF's
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, qtype).view(np.uint32), qt.dequantize().view(np.uint32))
    back = quanta.QuantizedTensor.from_gguf(raw, qtype, (N, K))
    for a, b in zip(back.arrays, qt.arrays):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_gguf_quantizer_bytes(rng, name):
    """Where the gguf package has a quantizer, identical floats give identical bytes."""
    w = weights(rng, 23, 1024)
    _, raw = quanta.quantize(w, name).to_gguf()
    np.testing.assert_array_equal(gguf.quants.quantize(w, GGUF[name]), raw)


@pytest.mark.parametrize("name", list(GGUF))
def test_gguf_import_of_gguf_bytes(rng, name):
    """Bytes written by the gguf package (or by us, for K-quants) load and dequantize identically."""
    w = weights(rng, 5, 256)
    qtype = GGUF[name]
    try:
        raw = gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        _, raw = quanta.quantize(w, name).to_gguf()
    qt = quanta.QuantizedTensor.from_gguf(raw, qtype, (5, 256))
    np.testing.assert_array_equal(qt.dequantize().view(np.uint32),
                                  gguf.quants.dequantize(raw, qtype).view(np.uint32))


def test_gguf_import_errors():
    with pytest.raises(ValueError, match="needs 36 bytes"):
        quanta.QuantizedTensor.from_gguf(np.zeros(35, np.uint8), T.Q4_0, (2, 32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quanta.QuantizedTensor.from_gguf(np.zeros(144, np.uint8), T.Q4_K, (1, 128))
    with pytest.raises(ValueError, match="unsupported GGUF type"):
        quanta.QuantizedTensor.from_gguf(np.zeros(64, np.uint8), T.IQ2_XXS, (1, 256))
    with pytest.raises(ValueError, match="no GGUF block type"):
        quanta.quantize(np.ones((2, 128), np.float32), "int4_g128").to_gguf()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("kind,offset", [("sym", None), ("asym", "min"), ("asym", "zero")])
@pytest.mark.parametrize("group", [16, 64, None])
@pytest.mark.parametrize("scale", ["fp16", "bf16", "fp32"])
def test_make_any_point(rng, bits, kind, offset, group, scale):
    fmt = F.make(bits=bits, group=group, kind=kind, offset=offset, scale=scale)
    N, K = 21, 320 if group != 64 else 256
    w = weights(rng, N, K)
    qt = quanta.quantize(w, fmt)
    np.testing.assert_array_equal(qt.unpacked_codes(), R.unpack_codes(qt))
    assert int(qt.unpacked_codes().max()) < 2 ** bits
    check_dequant(qt)
    rel = np.linalg.norm(qt.dequantize() - w) / np.linalg.norm(w)
    assert rel < 2.0 ** (1 - bits) * (1.5 if group is None else 1.0) + 0.01, rel


@pytest.mark.parametrize("lut", ["nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "custom3", "custom5", "custom6", "custom8"])
def test_lut_formats(rng, lut):
    if lut.startswith("custom"):
        bits = int(lut[6:])
        table = np.sort(rng.standard_normal(2 ** bits)).astype(np.float32)
        fmt = F.make(bits=bits, group=32, kind="lut", lut=table)
    else:
        bits = 8 if lut.startswith("fp8") else 4
        fmt = F.make(bits=bits, group=None if bits == 8 else 64, kind="lut", lut=lut, scale="fp32")
    w = weights(rng, 19, 512)
    qt = quanta.quantize(w, fmt)
    check_dequant(qt)
    # each code is the nearest table entry to w / s
    s = np.repeat(R._per_row(qt.scales, 19).astype(np.float64), fmt.group or 512, axis=1)[:, :512]
    table = np.asarray(fmt.lut, np.float64)
    t = np.where(s != 0, w / np.where(s == 0, 1, s), 0)
    best = np.abs(t[..., None] - table).min(axis=-1)
    got = np.abs(t - table[qt.unpacked_codes()])
    assert np.all(got <= best + 1e-6 * np.abs(t) + 1e-12)


def test_fp8_codes_are_real_fp8(rng):
    """fp8 codes are the bytes ml_dtypes would produce: the values they decode to match."""
    w = weights(rng, 16, 256)
    for name, dt in [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)]:
        qt = quanta.quantize(w, name)
        codes = qt.unpacked_codes()
        vals = codes.view(dt).astype(np.float32)
        assert np.all(np.isfinite(vals))
        s = R._per_row(qt.scales, 16)[:, :1]
        np.testing.assert_array_equal(qt.dequantize(), (s * vals).astype(np.float32))


def test_bits_per_weight():
    assert F.PRESETS["q4_0"].bits_per_weight() == pytest.approx(4.5)
    assert F.PRESETS["q8_0"].bits_per_weight() == pytest.approx(8.5)
    assert F.PRESETS["q6_k"].bits_per_weight() == pytest.approx(6.5625)
    assert F.PRESETS["q4_k"].bits_per_weight() == pytest.approx(4.625)
    assert F.PRESETS["int4_g128"].bits_per_weight() == pytest.approx(4.125)
    assert F.PRESETS["nf4"].bits_per_weight() == pytest.approx(4.5)
    assert F.PRESETS["int8"].bits_per_weight(4096) == pytest.approx(8 + 32 / 4096)


def test_quantized_tensor_api(rng):
    w = weights(rng, 32, 256)
    qt = quanta.quantize(w, "q4_k")
    assert "q4_k" in repr(qt) and "(32, 256)" in repr(qt)
    assert "<table>" in qt._repr_html_()
    assert qt.nbytes == sum(a.nbytes for a in qt.arrays if a is not None)
    assert qt.bits_per_weight == pytest.approx(8 * qt.nbytes / (32 * 256))
    with pytest.raises(AttributeError):
        qt.shape = (1, 1)
    back = pickle.loads(pickle.dumps(qt))
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())


def test_quantize_inputs_unchanged_and_dtypes(rng):
    w = weights(rng, 8, 64)
    before = w.copy()
    q32 = quanta.quantize(w, "q8_0")
    np.testing.assert_array_equal(w, before)
    q16 = quanta.quantize(w.astype(np.float16), "q8_0")
    np.testing.assert_array_equal(q16.dequantize(), quanta.quantize(w.astype(np.float16).astype(np.float32), "q8_0").dequantize())
    qs = quanta.quantize(np.asfortranarray(w), "q8_0")  # non-contiguous input is converted
    np.testing.assert_array_equal(qs.dequantize(), q32.dequantize())
    qb = quanta.quantize(w.astype(ml_dtypes.bfloat16), "q8_0")
    assert qb.shape == (8, 64)


def test_format_errors():
    with pytest.raises(ValueError, match="bits"):
        F.make(bits=7)
    with pytest.raises(ValueError, match="group"):
        F.make(bits=4, group=48)
    with pytest.raises(ValueError, match="kind"):
        F.make(bits=4, kind="fancy")
    with pytest.raises(ValueError, match="needs lut"):
        F.make(bits=4, kind="lut")
    with pytest.raises(ValueError, match="16 table entries"):
        F.make(bits=4, kind="lut", lut=[0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        F.make(bits=2, kind="lut", lut=[0.0, 1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="unknown format"):
        quanta.quantize(np.ones((2, 32), np.float32), "q3_xyz")
    with pytest.raises(TypeError, match="preset name"):
        quanta.quantize(np.ones((2, 32), np.float32), 4)


@pytest.mark.parametrize("name,K", [("q4_0", 48), ("q4_k", 128), ("q6_k", 576), ("int4_g128", 576),
                                    ("int4_g128_asym", 200), ("nf4", 96), ("q8_0", 40)])
def test_partial_last_group(name, K, rng):
    """K off the group size: the row is padded to whole groups (and super-blocks) with
    code 0 meeting zero activations; values and matmul equal the reference."""
    fmt = F.get(name)
    w = rng.standard_normal((20, K)).astype(np.float32)
    qt = quanta.quantize(w, fmt)
    assert qt.codes.shape[1] == fmt.kpad(K) // 32 * 32 * fmt.bits * 2
    assert fmt.kpad(K) % (256 if fmt.nested else max(32, fmt.group or 0)) == 0 and fmt.kpad(K) >= K
    deq = qt.dequantize()
    np.testing.assert_allclose(deq, R.dequantize(qt), rtol=1e-6, atol=1e-6)
    # the padding does not leak into the values of the last group
    assert np.max(np.abs(deq - w)) < 0.6 * np.max(np.abs(w))
    # the same K padded with zeros by hand gives the same values
    Kp = fmt.kpad(K)
    wp = np.zeros((20, Kp), np.float32)
    wp[:, :K] = w
    np.testing.assert_array_equal(quanta.quantize(wp, fmt).dequantize()[:, :K], deq)
    x = rng.standard_normal((3, K)).astype(np.float32)
    y = quanta.ops.qmatmul(x, qt)
    want = R.qmatmul(x, qt, act_quant=fmt.kind != "lut")
    assert np.max(np.abs(y - want)) <= 1e-4 * np.max(np.abs(want)) + 1e-4
    assert fmt.bits_per_weight(K) > fmt.bits_per_weight(Kp) or K == Kp


def test_quantize_errors():
    with pytest.raises(ValueError, match="empty"):
        quanta.quantize(np.ones((0, 32), np.float32), "q4_0")
    with pytest.raises(ValueError, match="2-D"):
        quanta.quantize(np.ones(32, np.float32), "q4_0")
    with pytest.raises(TypeError, match="float array"):
        quanta.quantize(np.ones((2, 32), np.int32), "q4_0")
    with pytest.raises(TypeError, match="numpy array"):
        quanta.quantize([[1.0] * 32], "q4_0")


def test_per_row_any_k(rng):
    """Per-row formats accept any K (padded internally to whole chunks)."""
    for K in (1, 7, 33, 100):
        w = weights(rng, 5, K)
        for name in ("int8", "fp8_e4m3"):
            qt = quanta.quantize(w, name)
            check_dequant(qt)


def test_quantized_tensor_validation(rng):
    qt = quanta.quantize(weights(rng, 16, 64), "q4_0")
    with pytest.raises(ValueError, match="codes must be uint8 with shape"):
        quanta.QuantizedTensor("q4_0", (16, 64), qt.codes[:, :-1].copy(), qt.scales)
    with pytest.raises(ValueError, match="has no offsets"):
        quanta.QuantizedTensor("q4_0", (16, 64), qt.codes, qt.scales, offsets=qt.scales)
    with pytest.raises(ValueError, match="scales must be float16"):
        quanta.QuantizedTensor("q4_0", (16, 64), qt.codes, qt.scales.astype(np.float32))
