"""ModelConfig: one description of a decoder-only transformer, read from a Hugging Face
config.json or from GGUF metadata.

Architectures: Llama 2/3 (llama3 rope scaling), Mistral (sliding window), Qwen2/2.5 (qkv
bias), Qwen3 (q/k norm), Mixtral, Qwen2-MoE (shared expert with a sigmoid gate), Qwen3-MoE,
OLMoE (q/k norm over the whole projection), Gemma 3 text (GeGLU, sandwich norms, scaled
embeddings, local / global layers with their own rope theta). Both layouts of rope parameters
are read: top-level ``rope_theta`` / ``rope_scaling`` and the newer ``rope_parameters``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

# Hugging Face model_type / GGUF general.architecture -> our architecture name
_HF_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
             "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe", "gemma3_text": "gemma3",
             "gemma3": "gemma3"}
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "gemma3": "gemma3"}
ARCHITECTURES = tuple(sorted(set(_HF_TYPES.values())))
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
MLP_ACTS = ("silu", "gelu_tanh")

# Gemma3TextConfig's defaults: the text_config of multimodal Gemma 3 checkpoints states only
# what differs from them.
_GEMMA3_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1)
# GELU in its tanh form under Hugging Face's names (gelu_new and gelu_fast are the same formula)
_GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_GEMMA3_PATTERN = 6  # every 6th layer global when no layer types are listed (HF's and llama.cpp's default)


class ConfigError(ValueError):
    """A model configuration is missing a field or holds an impossible value."""


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_style: str = "neox"            # "neox" (HF layout) or "interleaved" (GGUF llama layout)
    rotary_dim: Optional[int] = None
    max_position: int = 4096
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None
    layer_windows: List[Optional[int]] = field(default_factory=list)   # per layer: window or None
    qkv_bias: bool = False
    qk_norm: Optional[str] = None       # None, "head" (Qwen3: per head over D) or "full" (OLMoE: over H*D)
    # Mixture of experts
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    routed_scaling: float = 1.0         # factor on the routed experts' weights
    shared_expert_intermediate_size: int = 0
    moe_layers: List[bool] = field(default_factory=list)               # per layer: MoE block or dense MLP
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    # Gemma 3
    mlp_act: str = "silu"               # dense MLP gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    post_norms: bool = False            # sandwich norms: sublayer outputs RMS-normed before the residual add
    embed_scale: float = 1.0            # token embeddings times this (Gemma: sqrt(hidden_size))
    attn_scale: Optional[float] = None  # softmax scale of q.k; None: 1 / sqrt(head_dim)
    rope_local_theta: Optional[float] = None  # theta of the sliding-window layers, unscaled; None: as global
    final_softcap: Optional[float] = None     # logits -> c * tanh(logits / c)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 24:
                if not (name == "intermediate_size" and v == 0 and self.arch in MOE_ARCHS):
                    raise ConfigError(f"config: {name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: num_attention_heads {self.n_heads} is not a multiple of "
                              f"num_key_value_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even, got {self.head_dim}")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"config: rotary dim {self.rotary_dim} must be even and in (0, {self.head_dim}]")
        if not (self.rms_eps > 0 and math.isfinite(self.rms_eps)):
            raise ConfigError(f"config: rms_norm_eps must be > 0, got {self.rms_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config: rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_style not in ("neox", "interleaved"):
            raise ConfigError(f"config: rope_style must be neox or interleaved, got {self.rope_style!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"config: sliding_window must be a positive int or null, got {self.sliding_window!r}")
        if not self.layer_windows:
            self.layer_windows = [self.sliding_window] * self.n_layers
        if len(self.layer_windows) != self.n_layers:
            raise ConfigError(f"config: {len(self.layer_windows)} layer windows for {self.n_layers} layers")
        if self.arch in MOE_ARCHS:
            if not (0 < self.top_k <= self.n_experts <= 4096):
                raise ConfigError(f"config: need 0 < num_experts_per_tok <= num_experts, got {self.top_k} "
                                  f"and {self.n_experts}")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"config: moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
            if not self.moe_layers:
                self.moe_layers = [True] * self.n_layers
            if not (self.routed_scaling > 0 and math.isfinite(self.routed_scaling)):
                raise ConfigError(f"config: routed_scaling must be > 0, got {self.routed_scaling!r}")
        else:
            self.moe_layers = [False] * self.n_layers
        if len(self.moe_layers) != self.n_layers:
            raise ConfigError(f"config: {len(self.moe_layers)} MoE layer flags for {self.n_layers} layers")
        if any(not m for m in self.moe_layers) and self.intermediate_size <= 0:
            raise ConfigError("config: dense layers need intermediate_size > 0")
        if self.mlp_act not in MLP_ACTS:
            raise ConfigError(f"config: mlp_act must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        if self.mlp_act != "silu" and self.is_moe:
            raise ConfigError(f"config: MoE layers run SwiGLU experts; mlp_act {self.mlp_act!r} needs dense "
                              "layers")
        if not (self.embed_scale > 0 and math.isfinite(self.embed_scale)):
            raise ConfigError(f"config: embed_scale must be > 0, got {self.embed_scale!r}")
        for name in ("attn_scale", "rope_local_theta", "final_softcap"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"config: {name} must be > 0 or null, got {v!r}")

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def llama_block(self) -> bool:
        """Every block is the Llama-style one the fused C decode step runs: pre-norm only, SiLU
        MLP, one rope for all layers, no logit softcap."""
        return (self.mlp_act == "silu" and not self.post_norms and self.final_softcap is None
                and (self.rope_local_theta is None or all(w is None for w in self.layer_windows)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _get(cfg: dict, *names, default=None, required=True):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if required and default is None:
        raise ConfigError(f"config.json: missing {names[0]!r}")
    return default


def _int(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config: {name} must be an int, got {v!r}")
    return v


def _num(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config: {name} must be a number, got {v!r}")
    return float(v)


def _rope_from_hf(cfg: dict):
    """(theta, scaling dict or None) from either rope layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else dict(params, rope_type=kind)
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(f"config: rope_scaling must be an object or null, got {scaling!r}")
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
    if scaling is not None:
        scaling.pop("rope_theta", None)
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if scaling["rope_type"] not in ("linear", "llama3", "yarn"):
            raise ConfigError(f"config: unsupported rope scaling {scaling['rope_type']!r} (linear, llama3, yarn)")
    return _num(theta, "rope_theta"), scaling


def _gemma3_text_config(cfg: dict) -> dict:
    """The text decoder's config of a Gemma 3 checkpoint (gemma3_text, or the text_config of a
    multimodal gemma3 one, token ids taken from the outer config) over Gemma3TextConfig's
    defaults."""
    if cfg.get("model_type") == "gemma3":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json: a gemma3 config needs a text_config object")
        outer = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in cfg}
        cfg = dict(outer, **text)
    return dict(_GEMMA3_DEFAULTS, **cfg)


def _gemma3_local_theta(cfg: dict) -> float:
    """Rope theta of Gemma 3's sliding-window layers (never scaled)."""
    params = cfg.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict):
        kind = local.get("rope_type", local.get("type", "default"))
        if kind not in (None, "default"):
            raise ConfigError(f"config: unsupported rope scaling {kind!r} on the sliding-window layers")
        if local.get("rope_theta") is not None:
            return _num(local["rope_theta"], "rope_theta")
    return _num(cfg.get("rope_local_base_freq", 10000.0), "rope_local_base_freq")


def _gemma3_hf(cfg: dict, hidden: int) -> dict:
    """ModelConfig fields particular to Gemma 3, from its (defaulted) text config."""
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("config: use_bidirectional_attention is not supported (quanta runs causal "
                          "decoders)")
    if cfg.get("attn_logit_softcapping") is not None:
        raise ConfigError("config: attn_logit_softcapping is not supported for gemma3 (transformers' Gemma 3 "
                          "attention does not apply it)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in _GELU_TANH_NAMES:
        raise ConfigError(f"config: gemma3 hidden_activation {act!r} is not supported "
                          f"({', '.join(_GELU_TANH_NAMES)})")
    cap = cfg.get("final_logit_softcapping")
    return dict(mlp_act="gelu_tanh", post_norms=True, embed_scale=hidden ** 0.5,
                attn_scale=_num(cfg.get("query_pre_attn_scalar"), "query_pre_attn_scalar") ** -0.5,
                rope_local_theta=_gemma3_local_theta(cfg),
                final_softcap=None if cap is None else _num(cap, "final_logit_softcapping"))


def from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a parsed Hugging Face config.json."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold an object")
    mt = cfg.get("model_type")
    arch = _HF_TYPES.get(mt)
    if arch is None:
        raise ConfigError(f"config.json: unsupported model_type {mt!r}; supported: {', '.join(sorted(_HF_TYPES))}")
    if arch == "gemma3":
        cfg = _gemma3_text_config(cfg)
    hidden = _int(_get(cfg, "hidden_size"), "hidden_size")
    n_heads = _int(_get(cfg, "num_attention_heads"), "num_attention_heads")
    n_kv = _int(_get(cfg, "num_key_value_heads", default=n_heads), "num_key_value_heads")
    head_dim = cfg.get("head_dim") or (hidden // n_heads if n_heads else 0)
    theta, scaling = _rope_from_hf(cfg)
    n_layers = _int(_get(cfg, "num_hidden_layers"), "num_hidden_layers")
    swa_archs = ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma3")
    window = cfg.get("sliding_window") if arch in swa_archs else None
    if arch.startswith("qwen") and not cfg.get("use_sliding_window", False):
        window = None
    layer_windows = [window] * n_layers
    if window is not None and arch.startswith("qwen"):
        # Qwen applies the window from layer max_window_layers on
        mwl = _int(cfg.get("max_window_layers", n_layers), "max_window_layers")
        layer_windows = [window if i >= mwl else None for i in range(n_layers)]
    lt = cfg.get("layer_types")
    if isinstance(lt, list) and len(lt) == n_layers:
        layer_windows = [window if t == "sliding_attention" else None for t in lt]
    elif arch == "gemma3":  # configs before layer_types: every pattern-th layer global
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or _GEMMA3_PATTERN
        pattern = _int(pattern, "sliding_window_pattern")
        layer_windows = [window if (i + 1) % pattern else None for i in range(n_layers)]
    kw = dict(arch=arch, vocab_size=_int(_get(cfg, "vocab_size"), "vocab_size"), hidden_size=hidden,
              n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=_int(head_dim, "head_dim"),
              intermediate_size=_int(cfg.get("intermediate_size") or 0, "intermediate_size"),
              rms_eps=_num(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"), rope_theta=theta, rope_scaling=scaling,
              max_position=_int(cfg.get("max_position_embeddings", 4096), "max_position_embeddings"),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
              sliding_window=None if window is None else _int(window, "sliding_window"),
              layer_windows=[None if w is None else _int(w, "sliding_window") for w in layer_windows],
              qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))
              or bool(cfg.get("attention_bias", False)),
              qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "gemma3": "head"}.get(arch),
              bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
    if arch == "gemma3":
        kw.update(_gemma3_hf(cfg, hidden))
    prf = cfg.get("partial_rotary_factor")
    if prf is not None:
        kw["rotary_dim"] = int(kw["head_dim"] * _num(prf, "partial_rotary_factor")) // 2 * 2
    if arch in MOE_ARCHS:
        kw["n_experts"] = _int(_get(cfg, "num_local_experts", "num_experts"), "num_experts")
        kw["top_k"] = _int(_get(cfg, "num_experts_per_tok"), "num_experts_per_tok")
        kw["moe_intermediate_size"] = _int(cfg.get("moe_intermediate_size") or kw["intermediate_size"],
                                           "moe_intermediate_size")
        kw["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", arch == "mixtral"))
        if arch == "mixtral":
            kw["norm_topk_prob"] = True
        if arch == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = _int(cfg.get("shared_expert_intermediate_size", 0),
                                                         "shared_expert_intermediate_size")
        if arch in ("qwen2_moe", "qwen3_moe"):
            step = _int(cfg.get("decoder_sparse_step", 1), "decoder_sparse_step")
            only = cfg.get("mlp_only_layers") or []
            kw["moe_layers"] = [(i not in only) and step > 0 and (i + 1) % step == 0 for i in range(n_layers)]
    return ModelConfig(**kw)


def _gemma3_gguf(md: dict, ga: str, kw: dict) -> dict:
    """ModelConfig fields particular to Gemma 3 from GGUF metadata, read as llama.cpp does:
    the sliding layers follow a pattern of 6 (every 6th layer global) unless the file lists
    them, their rope theta is 10000 unless rope.freq_base_swa says otherwise, and the softmax
    scale is 1 / sqrt(head_dim) except for the 27B model (62 layers), whose
    query_pre_attn_scalar is hidden_size / heads."""
    n, window = kw["n_layers"], kw["sliding_window"]
    pattern = md.get(f"{ga}.attention.sliding_window_pattern", _GEMMA3_PATTERN)
    if window is None:
        windows = [None] * n
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        windows = [window if (i + 1) % pattern else None for i in range(n)]
    elif not isinstance(pattern, (int, str)) and len(pattern) == n:
        windows = [window if bool(p) else None for p in pattern]
    else:
        raise ConfigError(f"GGUF: {ga}.attention.sliding_window_pattern must be a positive int or {n} flags, "
                          f"got {str(pattern)[:80]}")
    scalar = kw["hidden_size"] // kw["n_heads"] if n == 62 else kw["head_dim"]
    cap = md.get(f"{ga}.final_logit_softcapping")
    return dict(layer_windows=windows, mlp_act="gelu_tanh", post_norms=True,
                embed_scale=kw["hidden_size"] ** 0.5, attn_scale=scalar ** -0.5,
                rope_local_theta=_num(md.get(f"{ga}.rope.freq_base_swa", 10000.0), "rope.freq_base_swa"),
                final_softcap=None if not cap else _num(cap, "final_logit_softcapping"))


def from_gguf(md: dict) -> ModelConfig:
    """ModelConfig from GGUF metadata (a dict of key -> value)."""
    ga = md.get("general.architecture")
    arch = _GGUF_ARCHS.get(ga)
    if arch is None:
        raise ConfigError(f"GGUF: unsupported general.architecture {ga!r}; supported: {', '.join(sorted(_GGUF_ARCHS))}")

    def g(key, default=None, required=True):
        v = md.get(f"{ga}.{key}")
        if v is None:
            if required and default is None:
                raise ConfigError(f"GGUF: missing metadata {ga}.{key}")
            return default
        return v

    n_heads = _int(g("attention.head_count"), f"{ga}.attention.head_count")
    n_kv = g("attention.head_count_kv", n_heads)
    if not isinstance(n_kv, int):  # per-layer array: all equal or unsupported
        vals = set(int(v) for v in n_kv)
        if len(vals) != 1:
            raise ConfigError(f"GGUF: per-layer {ga}.attention.head_count_kv is not supported")
        n_kv = vals.pop()
    hidden = _int(g("embedding_length"), f"{ga}.embedding_length")
    head_dim = g("attention.key_length", hidden // n_heads)
    n_layers = _int(g("block_count"), f"{ga}.block_count")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size", len(tokens) if tokens is not None else None)
    scaling = None
    st = md.get(f"{ga}.rope.scaling.type")
    if st not in (None, "none"):
        factor = _num(g("rope.scaling.factor"), "rope.scaling.factor")
        orig = g("rope.scaling.original_context_length", g("context_length", 4096))
        if st == "linear":
            scaling = {"rope_type": "linear", "factor": factor}
        elif st == "yarn":
            scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        else:
            raise ConfigError(f"GGUF: unsupported {ga}.rope.scaling.type {st!r}")
    window = g("attention.sliding_window", required=False)
    kw = dict(arch=arch, vocab_size=_int(vocab, "vocab_size"), hidden_size=hidden, n_layers=n_layers,
              n_heads=n_heads, n_kv_heads=_int(n_kv, "head_count_kv"), head_dim=_int(head_dim, "key_length"),
              intermediate_size=_int(g("feed_forward_length", 0), "feed_forward_length"),
              rms_eps=_num(g("attention.layer_norm_rms_epsilon", 1e-6), "layer_norm_rms_epsilon"),
              rope_theta=_num(g("rope.freq_base", 10000.0), "rope.freq_base"), rope_scaling=scaling,
              rotary_dim=g("rope.dimension_count", None, required=False),
              # GGUF's converter permutes Llama-family q/k rows so that its rope pairs (2i, 2i+1)
              rope_style="interleaved" if arch in ("llama", "mistral", "mixtral") else "neox",
              max_position=_int(g("context_length", 4096), "context_length"),
              sliding_window=None if window in (None, 0) else _int(window, "sliding_window"),
              qkv_bias=arch in ("qwen2", "qwen2_moe"),
              qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "gemma3": "head"}.get(arch),
              bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"))
    if arch == "gemma3":
        kw.update(_gemma3_gguf(md, ga, kw))
    n_exp = g("expert_count", 0)
    if n_exp:
        if arch == "llama":
            kw["arch"] = arch = "mixtral"
        kw["n_experts"] = _int(n_exp, "expert_count")
        kw["top_k"] = _int(g("expert_used_count"), "expert_used_count")
        kw["moe_intermediate_size"] = _int(g("expert_feed_forward_length", kw["intermediate_size"]),
                                           "expert_feed_forward_length")
        kw["norm_topk_prob"] = bool(g("expert_weights_norm", arch in ("mixtral", "qwen3_moe"), required=False))
        if arch == "qwen2_moe":
            kw["norm_topk_prob"] = False
            kw["shared_expert_intermediate_size"] = _int(g("expert_shared_feed_forward_length", 0),
                                                         "expert_shared_feed_forward_length")
        if arch == "olmoe":
            kw["norm_topk_prob"] = False
    return ModelConfig(**kw)
