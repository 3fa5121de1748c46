"""The llama family (Llama 1-3.x, Mistral, SmolLM2, TinyLlama): pre-norm, SwiGLU MLP, RoPE on
adjacent pairs; Llama 3.1+ frequency factors (`rope_freqs.weight`) and linear RoPE scaling.

Mistral GGUF files say "llama"; like llama.cpp's llama graph, every layer attends globally
(the converter writes no sliding window for it)."""
from __future__ import annotations

import jax

from woolly.arch import ModelConfig, common_config, meta_value
from woolly.errors import ModelLoadFailed
from woolly.models.base import Architecture, gated_mlp, self_attention
from woolly.ops.norms import rms_norm

LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def rope_scaling(arch: str, meta, tensor, head_dim: int) -> dict:
    """Linear RoPE scaling (`rope.scaling.type` linear) and per-frequency factors (`rope_freqs.weight`)."""
    out = {}
    kind = meta(f"{arch}.rope.scaling.type")
    if kind == "linear":
        out["rope_freq_scale"] = 1.0 / meta_value(meta, f"{arch}.rope.scaling.factor", float, 1.0)
    elif kind not in (None, "none"):
        raise ModelLoadFailed(f"RoPE scaling {kind!r} is not supported (supported: linear)")
    factors = tensor("rope_freqs.weight")
    if factors is not None:
        if factors.shape != (head_dim // 2,):
            raise ModelLoadFailed(f"tensor 'rope_freqs.weight' has shape {list(factors.shape)}, expected [{head_dim // 2}]")
        out["rope_freq_factors"] = tuple(float(f) for f in factors)
    return out


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    c = common_config("llama", meta, vocab_size, tied)
    return ModelConfig(**c, rope_neox=False, **rope_scaling("llama", meta, tensor, c["head_dim"]))


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The llama tensor table (name -> GGUF dims, innermost first), which most families extend."""
    t = {"token_embd.weight": (c.d_model, c.vocab_size), "output_norm.weight": (c.d_model,)}
    if not c.tied_output:
        t["output.weight"] = (c.d_model, c.vocab_size)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({
            b + "attn_norm.weight": (c.d_model,),
            b + "attn_q.weight": (c.d_model, c.q_dim),
            b + "attn_k.weight": (c.d_model, c.kv_dim),
            b + "attn_v.weight": (c.d_model, c.kv_dim),
            b + "attn_output.weight": (c.q_dim, c.d_model),
            b + "ffn_norm.weight": (c.d_model,),
            b + "ffn_gate.weight": (c.d_model, c.ffn_dim),
            b + "ffn_up.weight": (c.d_model, c.ffn_dim),
            b + "ffn_down.weight": (c.ffn_dim, c.d_model),
        })
    return t


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One llama decoder layer on x [B, T, D]."""
    attn, k_cache, v_cache = self_attention(lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions,
                                            k_cache, v_cache, cfg, cfg.rope_base)
    x = x + attn
    x = x + gated_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), jax.nn.silu)
    return x, k_cache, v_cache


LLAMA = Architecture("llama", config, tensors, LAYER_TENSORS, block)
