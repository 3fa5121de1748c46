"""Gemma 3: QK norms, norms before and after attention and MLP, GELU-tanh MLP, embeddings
scaled by sqrt(D), sliding-window layers with their own RoPE base (llama.cpp's gemma3 graph)."""
from __future__ import annotations

import math
from functools import partial

import jax

from woolly.arch import ModelConfig, common_config, meta_value
from woolly.models import llama
from woolly.models.base import Architecture, gated_mlp, self_attention
from woolly.ops.norms import rms_norm

LAYER_TENSORS = {
    **llama.LAYER_TENSORS,
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "post_ffn_norm": "post_ffw_norm.weight",
}

gelu_tanh = partial(jax.nn.gelu, approximate=True)


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    c = common_config("gemma3", meta, vocab_size, tied)
    # llama.cpp's gemma3 constants: every 6th layer global, local RoPE base 10k.
    return ModelConfig(**c, rope_neox=True, rope_base_local=10000.0,
                       sliding_window=meta_value(meta, "gemma3.attention.sliding_window", default=4096),
                       sliding_window_pattern=6, embed_scale=math.sqrt(c["d_model"]),
                       attn_scale=1.0 / math.sqrt(c["head_dim"]))


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = llama.tensors(c)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({
            b + "attn_q_norm.weight": (c.head_dim,),
            b + "attn_k_norm.weight": (c.head_dim,),
            b + "post_attention_norm.weight": (c.d_model,),
            b + "post_ffw_norm.weight": (c.d_model,),
        })
    return t


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One gemma3 decoder layer on x [B, T, D]; `layer` decides sliding vs global attention."""
    sliding = cfg.is_sliding(layer)
    attn, k_cache, v_cache = self_attention(
        lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions, k_cache, v_cache, cfg,
        rope_base=cfg.rope_base_local if sliding else cfg.rope_base,
        window=cfg.sliding_window if sliding else 0, qk_norm=True)
    x = x + rms_norm(attn, lp["post_attn_norm"], cfg.rms_eps)
    mlp = gated_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), gelu_tanh)
    x = x + rms_norm(mlp, lp["post_ffn_norm"], cfg.rms_eps)
    return x, k_cache, v_cache


GEMMA3 = Architecture("gemma3", config, tensors, LAYER_TENSORS, block)
