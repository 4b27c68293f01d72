"""Assembles a Decoder from canonical tensors and a ModelConfig."""
from __future__ import annotations

import warnings
from typing import Dict

import numpy as np

from .config import ModelConfig
from .decoder import Attention, Block, Decoder, DenseMLP, MoEBlock
from .layers import Embedding, Linear
from .weights import prepare_matrix, prepare_vector, quant_rule


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        return None
    return tqdm(total=total, desc="quantizing", unit="tensor", leave=False)


def build_decoder(cfg: ModelConfig, tensors: Dict[str, object], quant=None, progress: bool = True) -> Decoder:
    rule = quant_rule(quant)
    used = set()
    bar = _progress(len(tensors), progress and quant is not None)

    def raw(name, required=True):
        w = tensors.get(name)
        if w is None and required:
            raise ValueError(f"model file has no tensor for {name!r} (architecture {cfg.arch})")
        if w is not None:
            used.add(name)
        return w

    def mat(name, required=True):
        w = raw(name, required)
        if w is None:
            return None
        out = prepare_matrix(name, w, rule(name))
        if bar is not None:
            bar.update(1)
        return out

    def vec(name, required=True, size=None):
        w = raw(name, required)
        if w is None:
            return None
        v = prepare_vector(name, w)
        if size is not None and v.size != size:
            raise ValueError(f"{name} has {v.size} values, expected {size}")
        return v

    D = cfg.hidden_size
    blocks = []
    for i in range(cfg.n_layers):
        p = f"{i}."
        attn = Attention(cfg, i, mat(p + "q"), mat(p + "k"), mat(p + "v"), mat(p + "o"),
                         vec(p + "q_bias", cfg.qkv_bias), vec(p + "k_bias", cfg.qkv_bias),
                         vec(p + "v_bias", cfg.qkv_bias),
                         vec(p + "q_norm", cfg.qk_norm is not None), vec(p + "k_norm", cfg.qk_norm is not None),
                         bo=vec(p + "o_bias", False))
        if cfg.moe_layers[i]:
            E = cfg.n_experts
            gates = [mat(f"{p}experts.{e}.gate") for e in range(E)]
            ups = [mat(f"{p}experts.{e}.up") for e in range(E)]
            downs = [mat(f"{p}experts.{e}.down") for e in range(E)]
            shared = None
            if cfg.shared_expert_intermediate_size or (p + "shared.gate") in tensors:
                shared = (mat(p + "shared.gate"), mat(p + "shared.up"), mat(p + "shared.down"))
            sg = vec(p + "shared_gate", False, size=D)
            mlp = MoEBlock(cfg, i, vec(p + "router").reshape(cfg.n_experts, D), gates, ups, downs, shared, sg)
        else:
            mlp = DenseMLP(cfg, i, mat(p + "gate"), mat(p + "up"), mat(p + "down"),
                           *(vec(p + n, False) for n in ("gate_bias", "up_bias", "down_bias")))
        post = [vec(p + n, size=D) for n in ("post_attn_norm", "post_ffn_norm")] if cfg.post_norms else []
        blocks.append(Block(vec(p + "attn_norm", size=D), attn, vec(p + "ffn_norm", size=D), mlp, *post))
    embed_raw = raw("embed")
    head_raw = tensors.get("lm_head")
    tied = head_raw is None
    if tied and not cfg.tie_embeddings and "lm_head" not in tensors:
        cfg.tie_embeddings = True  # GGUF files omit output.weight when the head is tied
    if tied:
        head = prepare_matrix("lm_head", embed_raw, rule("lm_head"))
        embed = head if rule("embed") is None or rule("embed") == rule("lm_head") else \
            prepare_matrix("embed", embed_raw, rule("embed"))
        if bar is not None:
            bar.update(1)
    else:
        used.add("lm_head")
        head = prepare_matrix("lm_head", head_raw, rule("lm_head"))
        embed = prepare_matrix("embed", embed_raw, rule("embed"))
        if bar is not None:
            bar.update(2)
    if tuple(embed.shape) != (cfg.vocab_size, D):
        if embed.shape[1] != D or embed.shape[0] < cfg.vocab_size:
            raise ValueError(f"embedding has shape {tuple(embed.shape)}, the config implies {(cfg.vocab_size, D)}")
        cfg.vocab_size = int(embed.shape[0])
    norm = vec("norm", size=D)
    if bar is not None:
        bar.close()
    unused = sorted(set(tensors) - used)
    if unused:  # e.g. expert weights in a layer the configuration makes dense
        warnings.warn(f"{len(unused)} tensors of the model file are not used by the {cfg.arch} "
                      f"configuration, e.g. {unused[:3]}")
    return Decoder(cfg, Embedding(embed, cfg.embed_scale), blocks, norm, Linear(head))
