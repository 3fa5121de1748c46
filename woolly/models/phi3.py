"""Phi-3 / Phi-4-mini: the llama layer with fused projections as the file stores them
(`attn_qkv`: q, k, v rows; `ffn_up`: gate then up rows), RoPE on halves, LongRoPE's short
factors (llama.cpp's phi3 graph).

LongRoPE files (`rope_factors_long/short.weight`) run within their original context: the
short factors apply there, as llama.cpp picks them when the context fits. Like llama.cpp,
the sliding window some files declare is not applied."""
from __future__ import annotations

from woolly.arch import ModelConfig, common_config, meta_value
from woolly.errors import ModelLoadFailed
from woolly.models import llama
from woolly.models.base import Architecture

LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wqkv": "attn_qkv.weight", "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight", "w_gate_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    c = common_config("phi3", meta, vocab_size, tied)
    extra = {}
    short = tensor("rope_factors_short.weight")
    if short is not None:
        if short.shape != (c["head_dim"] // 2,):
            raise ModelLoadFailed(f"tensor 'rope_factors_short.weight' has shape {list(short.shape)}, "
                                  f"expected [{c['head_dim'] // 2}]")
        extra["rope_freq_factors"] = tuple(float(f) for f in short)
        original = meta_value(meta, "phi3.rope.scaling.original_context_length", default=c["context_length"])
        c["context_length"] = min(c["context_length"], original)   # the short factors' reach
    return ModelConfig(**c, rope_neox=True, **extra)


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = {k: v for k, v in llama.tensors(c).items()
         if not k.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight"))}
    for i in range(c.n_layers):
        t.update({f"blk.{i}.attn_qkv.weight": (c.d_model, c.q_dim + 2 * c.kv_dim),
                  f"blk.{i}.ffn_up.weight": (c.d_model, 2 * c.ffn_dim)})
    return t


# the llama layer: the fused wqkv / w_gate_up parameters are split inside base's attention and MLP
PHI3 = Architecture("phi3", config, tensors, LAYER_TENSORS, llama.block)
