"""Tensor names of Hugging Face checkpoints and GGUF files -> one canonical naming, and the
conversion of each stored tensor into what the decoder runs (kept exact by default,
re-quantized or dequantized on request).

Canonical names: embed, norm, lm_head; per layer i: i.attn_norm, i.ffn_norm, i.q, i.k, i.v,
i.o, i.q_bias, i.k_bias, i.v_bias, i.o_bias, i.q_norm, i.k_norm, i.gate, i.up, i.down,
i.gate_bias, i.up_bias, i.down_bias, i.router,
i.experts.E.gate / .up / .down, i.shared.gate / .up / .down, i.shared_gate,
i.post_attn_norm, i.post_ffn_norm (sandwich norms, Gemma).
Canonical RMSNorm weights multiply the normalized vector: Gemma checkpoints store w of
x * (1 + w), so their norms are read as 1 + w (GGUF files hold 1 + w already).
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Union

import numpy as np

from .. import formats
from ..formats import QuantizedTensor
from .layers import is_float_array

FLOAT_NAMES = {"float32": np.float32, "f32": np.float32, "fp32": np.float32, "float16": np.float16,
               "f16": np.float16, "fp16": np.float16, "bfloat16": "bfloat16", "bf16": "bfloat16"}


class GGUFBlocks(NamedTuple):
    """A block-quantized GGUF tensor: raw bytes [rows, row_bytes], its type, its [N, K] shape."""
    data: np.ndarray
    qtype: int
    shape: tuple

    @property
    def ndim(self):
        return len(self.shape)


class FP8Blocks(NamedTuple):
    """An FP8 checkpoint weight: float8 data [N, K] and float32 scale_inv [ceil(N / bn),
    ceil(K / bk)] (W = data * scale_inv of its block), block (bn, bk); a weight without a
    scale has scale_inv [[1]] and block (N, K)."""
    data: np.ndarray
    scale_inv: np.ndarray
    block: tuple

    @property
    def shape(self):
        return self.data.shape

    def row_scales(self) -> np.ndarray:
        """float32 [N, ceil(K / bk)]: each row's scale per block of bk inputs."""
        bn = self.block[0]
        return np.repeat(np.asarray(self.scale_inv, np.float32), bn, axis=0)[:self.data.shape[0]]

    def dequantize(self) -> np.ndarray:
        bk = self.block[1]
        s = np.repeat(self.row_scales(), bk, axis=1)[:, :self.data.shape[1]]
        return self.data.astype(np.float32) * s


def _fp8_blocks(name, w, scale_inv, block):
    if w.ndim != 2:
        raise ValueError(f"{name}: an FP8 weight must be 2-D, got shape {w.shape}")
    N, K = w.shape
    if scale_inv is None:
        return FP8Blocks(w, np.ones((1, 1), np.float32), (N, K))
    bn, bk = block
    want = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, blocks of {block} over "
                         f"{(N, K)} need {want}")
    return FP8Blocks(w, np.asarray(scale_inv, np.float32), (bn, bk))


# ---- Hugging Face names ----------------------------------------------------------------------

_HF_LAYER = [
    (r"input_layernorm\.weight", "attn_norm"), (r"post_attention_layernorm\.weight", "ffn_norm"),
    (r"self_attn\.([qkvo])_proj\.weight", r"\1"), (r"self_attn\.([qkvo])_proj\.bias", r"\1_bias"),
    (r"self_attn\.([qk])_norm\.weight", r"\1_norm"),
    (r"mlp\.(gate|up|down)_proj\.weight", r"\1"), (r"mlp\.(gate|up|down)_proj\.bias", r"\1_bias"),
    (r"(?:block_sparse_moe|mlp)\.gate\.weight", "router"),
    (r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.gate"),
    (r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.up"),
    (r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.down"),
    (r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"experts.\1.\2"),
    (r"(?:block_sparse_moe|mlp)\.experts\.gate_up_proj", "experts.gate_up"),   # stacked [E, 2I, D]
    (r"(?:block_sparse_moe|mlp)\.experts\.down_proj", "experts.down"),         # stacked [E, D, I]
    (r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"shared.\1"),
    (r"mlp\.shared_expert_gate\.weight", "shared_gate"),
]
_HF_LAYER = [(re.compile(p + "$"), r) for p, r in _HF_LAYER]
# Gemma's four norms per layer: post_attention_layernorm is the attention output's norm there
_HF_SANDWICH = [(r"post_attention_layernorm\.weight", "post_attn_norm"),
                (r"pre_feedforward_layernorm\.weight", "ffn_norm"),
                (r"post_feedforward_layernorm\.weight", "post_ffn_norm")]
_HF_SANDWICH = [(re.compile(p + "$"), r) for p, r in _HF_SANDWICH]
_HF_LAYER_PREFIX = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.*)$")
_HF_GLOBAL = {"model.embed_tokens.weight": "embed", "embed_tokens.weight": "embed", "model.norm.weight": "norm",
              "norm.weight": "norm", "lm_head.weight": "lm_head"}
_HF_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.weight_scale_inv|\.input_scale)$")
# the language model inside a multimodal checkpoint (Gemma 3): its prefixes, and the image
# encoder's tensors, which a text decoder does not read
_HF_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.", ""))
_HF_VISION = re.compile(r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
_ZERO_CENTERED_NORMS = ("gemma3",)  # HF architectures whose RMSNorm computes x * (1 + w)

# ---- GGUF names ------------------------------------------------------------------------------

_GGUF_LAYER = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm", "attn_q.weight": "q",
               "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o", "attn_q.bias": "q_bias",
               "attn_k.bias": "k_bias", "attn_v.bias": "v_bias", "attn_output.bias": "o_bias",
               "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm", "ffn_gate.weight": "gate",
               "ffn_up.weight": "up", "ffn_down.weight": "down", "ffn_gate.bias": "gate_bias",
               "ffn_up.bias": "up_bias", "ffn_down.bias": "down_bias", "ffn_gate_inp.weight": "router",
               "ffn_gate_exps.weight": "experts.gate", "ffn_up_exps.weight": "experts.up",
               "ffn_down_exps.weight": "experts.down", "ffn_gate_shexp.weight": "shared.gate",
               "ffn_up_shexp.weight": "shared.up", "ffn_down_shexp.weight": "shared.down",
               "ffn_gate_inp_shexp.weight": "shared_gate", "post_attention_norm.weight": "post_attn_norm",
               "post_ffw_norm.weight": "post_ffn_norm"}
_GGUF_GLOBAL = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
_GGUF_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd)$")


def canonical_hf(tensors: Dict[str, np.ndarray], fp8_block=(128, 128),
                 arch: Optional[str] = None) -> Dict[str, object]:
    """HF tensor names -> canonical ones. FP8 weights (float8_e4m3fn / e5m2) are paired with
    their `weight_scale_inv` block scales (block size fp8_block, from the config's
    quantization_config.weight_block_size). arch (ModelConfig.arch) selects Gemma's norm names
    and turns its zero-centered norm weights w into the multiplier 1 + w (float32, as
    transformers computes it)."""
    out, unknown = {}, []
    layer_rules = (_HF_SANDWICH + _HF_LAYER) if arch in _ZERO_CENTERED_NORMS else _HF_LAYER
    for name, arr in tensors.items():
        if arr.dtype.name.startswith("float8") and name.endswith(".weight"):
            arr = _fp8_blocks(name, arr, tensors.get(name[:-len("weight")] + "weight_scale_inv"), fp8_block)
        if _HF_VISION.match(name):
            continue
        key = name
        for old, new in _HF_TEXT_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        c = _HF_GLOBAL.get(key)
        if c is None:
            m = _HF_LAYER_PREFIX.match(key)
            if m:
                rest = m.group(2)
                for pat, rep in layer_rules:
                    if pat.match(rest):
                        c = f"{m.group(1)}.{pat.sub(rep, rest)}"
                        break
        if c is None:
            if not _HF_IGNORED.search(name):
                unknown.append(name)
            continue
        if arch in _ZERO_CENTERED_NORMS and c.split(".")[-1].endswith("norm"):
            arr = np.asarray(arr, dtype=np.float32) + np.float32(1.0)
        out[c] = arr
    _split_stacked_experts(out)
    if unknown:
        warnings.warn(f"ignored {len(unknown)} tensors the architecture does not use, e.g. {unknown[:3]}")
    return out


def _split_stacked_experts(out: dict) -> None:
    """Stacked expert tensors [E, ...] (fused checkpoints) -> per-expert canonical names."""
    for key in [k for k in out if k.endswith(".experts.gate_up")]:
        i = key.split(".")[0]
        gu = out.pop(key)
        if gu.ndim != 3 or gu.shape[1] % 2:
            raise ValueError(f"layer {i}: stacked gate_up_proj has shape {gu.shape}, expected [E, 2*ffn, d]")
        half = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            out[f"{i}.experts.{e}.gate"] = gu[e, :half]
            out[f"{i}.experts.{e}.up"] = gu[e, half:]
    for key in [k for k in out if k.endswith(".experts.down") or k.endswith(".experts.gate")
                or k.endswith(".experts.up")]:
        i, _, proj = key.split(".")
        st = out.pop(key)
        if st.ndim != 3:
            raise ValueError(f"layer {i}: stacked expert tensor {proj} has shape {st.shape}, expected 3-D")
        for e in range(st.shape[0]):
            out[f"{i}.experts.{e}.{proj}"] = _expert_slice(st, e)


def _expert_slice(st, e):
    if isinstance(st, GGUFBlocks):
        E = st.shape[0]
        rows = st.data.shape[0] // E
        return GGUFBlocks(st.data[e * rows:(e + 1) * rows], st.qtype, tuple(st.shape[1:]))
    return st[e]


def canonical_gguf(tensors) -> Dict[str, object]:
    """GGUFFile.tensors -> canonical names; block-quantized data wrapped as GGUFBlocks."""
    from ..io.gguf import GGUFTensor  # noqa: F401  (type of the values)
    import gguf
    out, unknown = {}, []
    for name, t in tensors.items():
        c = _GGUF_GLOBAL.get(name)
        if c is None and name.startswith("blk."):
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[1].isdigit() and parts[2] in _GGUF_LAYER:
                c = f"{int(parts[1])}.{_GGUF_LAYER[parts[2]]}"
        if c is None:
            if not _GGUF_IGNORED.match(name):
                unknown.append(name)
            continue
        qt = gguf.GGMLQuantizationType(t.ggml_type)
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            out[c] = t.data
        elif t.data.dtype == np.uint8 and qt not in (gguf.GGMLQuantizationType.I8,):
            out[c] = GGUFBlocks(t.data, int(t.ggml_type), tuple(t.shape))
        else:
            raise ValueError(f"GGUF tensor {name}: type {qt.name} cannot hold model weights")
    _split_stacked_experts(out)
    if unknown:
        warnings.warn(f"ignored {len(unknown)} GGUF tensors the architecture does not use, e.g. {unknown[:3]}")
    return out


# ---- conversion -------------------------------------------------------------------------------

QuantSpec = Union[None, str, formats.Format, Dict[str, Union[str, formats.Format, None]]]


def quant_rule(quant: QuantSpec) -> Callable[[str], object]:
    """name -> target: None (keep as stored), a numpy float dtype, or a Format. A dict maps
    fnmatch patterns on canonical names (e.g. "*.down", "lm_head", "3.*") to targets; the
    first match wins; names matching nothing are kept as stored."""
    def target(spec):
        if spec is None:
            return None
        if isinstance(spec, str) and spec.lower() in FLOAT_NAMES:
            t = FLOAT_NAMES[spec.lower()]
            if t == "bfloat16":
                import ml_dtypes
                t = ml_dtypes.bfloat16
            return np.dtype(t)
        return formats.get(spec)

    if isinstance(quant, dict):
        rules = [(str(p), target(s)) for p, s in quant.items()]

        def rule(name):
            for pat, t in rules:
                if fnmatch.fnmatchcase(name, pat):
                    return t
            return None
        return rule
    t = target(quant)
    return lambda name: t


def dequantize_any(w) -> np.ndarray:
    if isinstance(w, FP8Blocks):
        return w.dequantize()
    if isinstance(w, GGUFBlocks):
        qt = _exact_gguf(w)
        if qt is not None:
            return qt.dequantize()
        import gguf
        return np.asarray(gguf.quants.dequantize(np.asarray(w.data), gguf.GGMLQuantizationType(w.qtype)),
                          dtype=np.float32).reshape(w.shape)
    if isinstance(w, QuantizedTensor):
        return w.dequantize()
    return np.asarray(w, dtype=np.float32)


def _exact_gguf(w: GGUFBlocks) -> Optional[QuantizedTensor]:
    from .._gguf_blocks import _types
    if w.qtype in _types():
        return QuantizedTensor.from_gguf(np.asarray(w.data), w.qtype, w.shape)
    return None


def prepare_matrix(name: str, w, target, fallback: str = "q8_0"):
    """A 2-D weight as the decoder runs it: QuantizedTensor or float array."""
    if len(w.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if isinstance(w, QuantizedTensor) and (target is None or target == w.format):
        return w  # already in the wanted format (a quanta file): the same bytes, no copy
    if target is None and isinstance(w, FP8Blocks):
        return _fp8_exact(name, w)
    if target is None:
        if isinstance(w, GGUFBlocks):
            qt = _exact_gguf(w)
            if qt is not None:
                return qt
            target = formats.get(fallback)
            warnings.warn(f"{name}: GGUF type {w.qtype} has no exact quanta format; re-quantized to {fallback}")
        elif is_float_array(w):
            return w
        else:
            return np.asarray(w, dtype=np.float32)
    if isinstance(target, np.dtype):
        return np.ascontiguousarray(dequantize_any(w).astype(target, copy=False))
    fmt = target
    K = w.shape[1]
    try:
        fmt.check_k(K)
    except ValueError:
        alt = formats.get(fallback)
        try:
            alt.check_k(K)
        except ValueError:
            warnings.warn(f"{name}: K={K} fits neither {fmt} nor {fallback}; kept in float32")
            return np.ascontiguousarray(dequantize_any(w))
        warnings.warn(f"{name}: K={K} does not fit {fmt}; quantized to {fallback} instead")
        fmt = alt
    if isinstance(w, GGUFBlocks):
        qt = _exact_gguf(w)
        if qt is not None and qt.format == fmt:
            return qt
    return formats.quantize(dequantize_any(w), fmt)


def _fp8_exact(name: str, w: FP8Blocks):
    """An FP8 checkpoint weight as quanta's fp8 format with one fp32 scale per row and block
    of inputs: the same codes and scales, so the values are exactly the checkpoint's."""
    N, K = w.shape
    kind = "fp8_e4m3" if w.data.dtype.name == "float8_e4m3fn" else "fp8_e5m2" if \
        w.data.dtype.name == "float8_e5m2" else None
    if kind is None:
        raise ValueError(f"{name}: unsupported FP8 dtype {w.data.dtype}")
    bk = w.block[1]
    group = None if bk >= K else bk
    fmt = formats.make(8, group, "lut", scale="fp32", lut=kind, name=None)
    try:
        fmt.check_k(K)
    except ValueError:
        warnings.warn(f"{name}: FP8 blocks of {bk} inputs do not fit quanta's layout for K={K}; "
                      f"dequantized to float32")
        return np.ascontiguousarray(w.dequantize())
    codes = np.ascontiguousarray(np.asarray(w.data).view(np.uint8))
    from .. import _C
    from ..formats import _to_panels
    scales = w.row_scales()
    if group is None:
        scales = scales[:, :1]
    return QuantizedTensor(fmt, (N, K), codes=_C.pack_codes(codes, 8), scales=_to_panels(scales, np.float32))


def prepare_vector(name: str, w) -> np.ndarray:
    if isinstance(w, (GGUFBlocks, FP8Blocks)):
        return dequantize_any(w).reshape(-1)
    a = np.asarray(w)
    if not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
        raise ValueError(f"{name}: expected float values, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)
