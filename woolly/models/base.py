"""What every decoder family shares: the cache type, attention and MLP blocks, the layer loop.

A family module (llama.py, gemma3.py, ...) supplies an `Architecture`: how to read its config
from the metadata, which GGUF tensors the file must hold, which of them a layer's parameters
are, and its `block` function. `hidden_states` runs the rest.

Parameters are a plain pytree:
    {"embed": W [V, D], "output_norm": [D], "output": W [V, D] (absent when tied),
     "layers": [ {name: array or QuantizedWeight, ...} per layer ]}
A Python loop over unstacked per-layer weights (measured ~15% faster than lax.scan here).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from woolly.arch import ModelConfig
from woolly.ops.attention import attend, attention_mask, cached_attend, write_cache
from woolly.ops.norms import rms_norm
from woolly.ops.qmatmul import embed_rows, linear
from woolly.ops.rope import rope


class KVCache(NamedTuple):
    """Per-layer key and value buffers, each [B, K, S, H]; row s holds position s."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def length(self) -> int:  # S
        return self.k[0].shape[2]


# block(layer_params, x [B,T,D], positions [B,T], k [B,K,S,H], v [B,K,S,H], cfg, layer) -> (x, k, v)
BlockFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclass(frozen=True)
class Architecture:
    name: str                       # GGUF general.architecture
    config: Callable[..., ModelConfig]  # (meta(key), vocab_size, tied_output, tensor(name)) -> ModelConfig
    tensors: Callable[[ModelConfig], dict[str, tuple[int, ...]]]  # name -> GGUF dims the file must hold
    layer_tensors: dict[str, str]   # parameter name -> GGUF tensor name under "blk.{i}."
    block: BlockFn


def self_attention(lp: dict, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                   cfg: ModelConfig, rope_base: float, window: int = 0, qk_norm: bool = False):
    """Project x [B, T, D] to q/k/v, rotate, store k/v, attend over the cache -> ([B, T, D], k, v)."""
    B, T, _ = x.shape
    q, k, v = projections(lp, x, "wqkv", ("wq", "wk", "wv"),
                          (cfg.q_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim))
    if "bq" in lp:                                                                      # qwen2: q/k/v biases
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(B, T, cfg.n_heads, cfg.head_dim)                                      # [B, T, N, H]
    k = k.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)                                   # [B, T, K, H]
    v = v.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)                                   # [B, T, K, H]
    if qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_eps)
    rope_positions = jnp.maximum(positions, 0)                                          # padding rotates as 0
    q = rope(q, rope_positions, rope_base, cfg.rope_neox, cfg.rope_freq_scale, cfg.rope_freq_factors)
    k = rope(k, rope_positions, rope_base, cfg.rope_neox, cfg.rope_freq_scale, cfg.rope_freq_factors)
    k_cache = write_cache(k_cache, k, positions)                                        # [B, K, S, H]
    v_cache = write_cache(v_cache, v, positions)                                        # [B, K, S, H]
    if cfg.attn_softcap:  # gemma2: the kernel has no soft-capping, so the masked jnp attention
        mask = attention_mask(positions, k_cache.shape[2], window)                      # [B, T, S]
        out = attend(q, k_cache, v_cache, mask, cfg.query_scale, cfg.attn_softcap)      # [B, T, N, H]
    else:
        out = cached_attend(q, k_cache, v_cache, positions, cfg.query_scale, window)    # [B, T, N, H]
    return linear(out.reshape(B, T, cfg.q_dim), lp["wo"]), k_cache, v_cache             # [B, T, D]


def projections(lp: dict, x: jax.Array, fused: str, names: tuple[str, ...], widths: tuple[int, ...]):
    """x [B, T, D] through each of lp[names] -> one [B, T, width] per name; through lp[fused]
    (their rows in one matrix: runtime/params.fuse_layer) and a split where the params have it."""
    if fused not in lp:
        return tuple(linear(x, lp[n]) for n in names)
    y = linear(x, lp[fused])                                                            # [B, T, sum(widths)]
    return tuple(jnp.split(y, list(itertools.accumulate(widths[:-1])), axis=-1))


def gated_mlp(lp: dict, x: jax.Array, activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """down(activation(gate(x)) * up(x)): x [B, T, D] -> [B, T, D] through [B, T, F]."""
    F = lp["w_down"].shape[1]
    gate, up = projections(lp, x, "w_gate_up", ("w_gate", "w_up"), (F, F))
    return linear(activation(gate) * up, lp["w_down"])


def hidden_states(arch: Architecture, params: dict, tokens: jax.Array, positions: jax.Array,
                  cache: KVCache, cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens [B, T] at positions [B, T] (-1: padding) -> final-normed states [B, T, D], new cache."""
    # Padding and idle slots (position -1) keep an exactly zero hidden state, so the CPU matvec
    # kernel skips their rows (an 8-slot step with one live sequence costs about one row).
    live = (positions >= 0)[..., None].astype(jnp.float32)                              # [B, T, 1]
    x = embed_rows(params["embed"], tokens).astype(jnp.float32) * live                  # [B, T, D]
    if cfg.embed_scale != 1.0:
        x = x * jnp.float32(cfg.embed_scale)
    ks, vs = [], []
    for i, lp in enumerate(params["layers"]):
        x, k, v = arch.block(lp, x, positions, cache.k[i], cache.v[i], cfg, i)
        x = x * live
        ks.append(k)
        vs.append(v)
    return rms_norm(x, params["output_norm"], cfg.rms_eps), KVCache(tuple(ks), tuple(vs))


def output_logits(params: dict, h: jax.Array, cfg: ModelConfig | None = None) -> jax.Array:
    """Final states h [..., D] -> logits [..., V] (the output matrix, or the tied embedding),
    soft-capped where the family caps them (gemma2: cap * tanh(logits / cap))."""
    logits = linear(h, params["output"] if "output" in params else params["embed"])
    if cfg is not None and cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits
