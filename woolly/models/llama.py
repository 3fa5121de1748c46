"""The llama family (llama, mistral-style; SmolLM2, TinyLlama): pre-norm, SwiGLU MLP."""
from __future__ import annotations

import jax

from woolly.models.base import Architecture, gated_mlp, self_attention
from woolly.ops.norms import rms_norm

LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One llama decoder layer on x [B, T, D]."""
    attn, k_cache, v_cache = self_attention(lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions,
                                            k_cache, v_cache, cfg, cfg.rope_base)
    x = x + attn
    x = x + gated_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), jax.nn.silu)
    return x, k_cache, v_cache


LLAMA = Architecture("llama", LAYER_TENSORS, block)
