"""Qwen 3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): qwen3's attention, and in place of the MLP a
router choosing `n_experts_used` of `n_experts` SwiGLU experts per token (llama.cpp's qwen3moe
graph: softmax gating, top-k, the chosen weights renormalized to sum to 1, no shared expert).

Every expert runs on every token and the router's weights (zero for the unchosen) mix them:
exact, and simple to jit, but E/k times the arithmetic of a gathered dispatch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from woolly.arch import ModelConfig, common_config, meta_value
from woolly.errors import ModelLoadFailed
from woolly.models import qwen3
from woolly.models.base import Architecture, self_attention
from woolly.ops.norms import rms_norm
from woolly.ops.qmatmul import linear

LAYER_TENSORS = {**{k: v for k, v in qwen3.LAYER_TENSORS.items() if k not in ("w_gate", "w_up", "w_down")},
                 "router": "ffn_gate_inp.weight",        # [E, D]
                 "w_gate_exps": "ffn_gate_exps.weight",  # E x [F_e, D]
                 "w_up_exps": "ffn_up_exps.weight",      # E x [F_e, D]
                 "w_down_exps": "ffn_down_exps.weight"}  # E x [D, F_e]


def config(meta, vocab_size, tied, tensor) -> ModelConfig:
    p = "qwen3moe."
    n_experts = meta_value(meta, p + "expert_count")
    used = meta_value(meta, p + "expert_used_count")
    if used > n_experts:
        raise ModelLoadFailed(f"{used} experts used per token, but the file has {n_experts}")
    return ModelConfig(**common_config("qwen3moe", meta, vocab_size, tied), rope_neox=True, n_experts=n_experts,
                       n_experts_used=used, expert_ffn_dim=meta_value(meta, p + "expert_feed_forward_length"))


def tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """qwen3's table with the expert tensors (GGUF dims, innermost first) in place of the MLP's."""
    t = {k: v for k, v in qwen3.tensors(c).items()
         if not k.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))}
    D, F, E = c.d_model, c.expert_ffn_dim, c.n_experts
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({b + "ffn_gate_inp.weight": (D, E), b + "ffn_gate_exps.weight": (D, F, E),
                  b + "ffn_up_exps.weight": (D, F, E), b + "ffn_down_exps.weight": (F, D, E)})
    return t


def experts_mlp(lp: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x [B, T, D] -> the router-weighted sum of its top-k experts' SwiGLU outputs [B, T, D]."""
    probs = jax.nn.softmax(linear(x, lp["router"]).astype(jnp.float32), axis=-1)       # [B, T, E]
    top, chosen = jax.lax.top_k(probs, cfg.n_experts_used)                             # [B, T, k]
    top = top / top.sum(axis=-1, keepdims=True)
    mix = jnp.sum(jax.nn.one_hot(chosen, cfg.n_experts, dtype=jnp.float32) * top[..., None], axis=-2)  # [B, T, E]
    out = jnp.zeros_like(x)
    for e, (gate, up, down) in enumerate(zip(lp["w_gate_exps"], lp["w_up_exps"], lp["w_down_exps"])):
        h = jax.nn.silu(linear(x, gate)) * linear(x, up)                               # [B, T, F_e]
        out = out + linear(h, down) * mix[..., e:e + 1]
    return out


def block(lp, x, positions, k_cache, v_cache, cfg, layer):
    """One qwen3moe decoder layer on x [B, T, D]."""
    attn, k_cache, v_cache = self_attention(lp, rms_norm(x, lp["attn_norm"], cfg.rms_eps), positions,
                                            k_cache, v_cache, cfg, cfg.rope_base, qk_norm=True)
    x = x + attn
    x = x + experts_mlp(lp, rms_norm(x, lp["ffn_norm"], cfg.rms_eps), cfg)
    return x, k_cache, v_cache


QWEN3MOE = Architecture("qwen3moe", config, tensors, LAYER_TENSORS, block)
