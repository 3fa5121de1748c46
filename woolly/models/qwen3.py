"""Qwen 3 (dense): the llama layer with an RMS norm on each query and key head before RoPE,
RoPE on halves, head_dim from the file (llama.cpp's qwen3 graph)."""
from __future__ import annotations

import jax

from woolly.arch import ModelConfig, common_config
from woolly.models import llama
from woolly.models.base import Architecture, gated_mlp, self_attention
from woolly.ops.norms import rms_norm

LAYER_TENSORS = {**llama.LAYER_TENSORS, "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    return ModelConfig(**common_config("qwen3", meta, vocab_size, tied), rope_neox=True)


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = llama.tensors(c)
    for i in range(c.n_layers):
        t.update({f"blk.{i}.attn_q_norm.weight": (c.head_dim,), f"blk.{i}.attn_k_norm.weight": (c.head_dim,)})
    return t


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One qwen3 decoder layer on x [B, T, D]."""
    attn, k_cache, v_cache = self_attention(lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions,
                                            k_cache, v_cache, cfg, cfg.rope_base, qk_norm=True)
    x = x + attn
    x = x + gated_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), jax.nn.silu)
    return x, k_cache, v_cache


QWEN3 = Architecture("qwen3", config, tensors, LAYER_TENSORS, block)
