"""Architecture name (GGUF general.architecture) -> its `Architecture`, and the model entry points."""
from __future__ import annotations

import jax

from woolly.arch import ModelConfig
from woolly.errors import ModelLoadFailed
from woolly.models.base import Architecture, KVCache, hidden_states, output_logits
from woolly.models.gemma3 import GEMMA3
from woolly.models.llama import LLAMA

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, GEMMA3)}


def architecture(cfg: ModelConfig) -> Architecture:
    try:
        return ARCHITECTURES[cfg.arch]
    except KeyError:
        raise ModelLoadFailed(f"no forward pass for architecture {cfg.arch!r}") from None


def forward_hidden(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens [B, T], positions [B, T] (-1: padding) -> final states [B, T, D], cache."""
    return hidden_states(architecture(cfg), params, tokens, positions, cache, cfg)


def forward(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens [B, T], positions [B, T] (-1: padding) -> logits [B, T, V], cache. Pure; cfg static."""
    h, cache = forward_hidden(params, tokens, positions, cache, cfg)
    return output_logits(params, h), cache
