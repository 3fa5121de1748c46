"""Qwen 2 / 2.5: the llama layer with biases on the q/k/v projections and RoPE on halves
(llama.cpp's qwen2 graph)."""
from __future__ import annotations

from woolly.arch import ModelConfig, common_config
from woolly.models import llama
from woolly.models.base import Architecture

LAYER_TENSORS = {**llama.LAYER_TENSORS, "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    return ModelConfig(**common_config("qwen2", meta, vocab_size, tied), rope_neox=True)


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = llama.tensors(c)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({b + "attn_q.bias": (c.q_dim,), b + "attn_k.bias": (c.kv_dim,), b + "attn_v.bias": (c.kv_dim,)})
    return t


QWEN2 = Architecture("qwen2", config, tensors, LAYER_TENSORS, llama.block)
