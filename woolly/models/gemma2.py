"""Gemma 2: norms before and after attention and MLP, GELU-tanh MLP, embeddings scaled by
sqrt(D), soft-capped attention scores and output logits, every other layer sliding (from
layer 0), one RoPE base (llama.cpp's gemma2 graph)."""
from __future__ import annotations

import math

from woolly.arch import ModelConfig, common_config, meta_value
from woolly.models import gemma3, llama
from woolly.models.base import Architecture, gated_mlp, self_attention
from woolly.ops.norms import rms_norm

LAYER_TENSORS = {**llama.LAYER_TENSORS, "post_attn_norm": "post_attention_norm.weight",
                 "post_ffn_norm": "post_ffw_norm.weight"}


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    c = common_config("gemma2", meta, vocab_size, tied)
    # llama.cpp: query scale 1/sqrt(n_embd / n_head) for the 46-layer 27B, else 1/sqrt(head_dim).
    scale = c["d_model"] / c["n_heads"] if c["n_layers"] == 46 else c["head_dim"]
    return ModelConfig(**c, rope_neox=True,
                       sliding_window=meta_value(meta, "gemma2.attention.sliding_window", default=4096),
                       sliding_window_pattern=2, embed_scale=math.sqrt(c["d_model"]),
                       attn_scale=1.0 / math.sqrt(scale),
                       attn_softcap=meta_value(meta, "gemma2.attn_logit_softcapping", float, 50.0),
                       final_softcap=meta_value(meta, "gemma2.final_logit_softcapping", float, 30.0))


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = llama.tensors(c)
    for i in range(c.n_layers):
        t.update({f"blk.{i}.post_attention_norm.weight": (c.d_model,), f"blk.{i}.post_ffw_norm.weight": (c.d_model,)})
    return t


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One gemma2 decoder layer on x [B, T, D]; even layers slide."""
    attn, k_cache, v_cache = self_attention(
        lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions, k_cache, v_cache, cfg,
        rope_base=cfg.rope_base, window=cfg.sliding_window if cfg.is_sliding(layer) else 0)
    x = x + rms_norm(attn, lp["post_attn_norm"], cfg.rms_eps)
    mlp = gated_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), gemma3.gelu_tanh)
    x = x + rms_norm(mlp, lp["post_ffn_norm"], cfg.rms_eps)
    return x, k_cache, v_cache


GEMMA2 = Architecture("gemma2", config, tensors, LAYER_TENSORS, block)
