"""The family table: GGUF general.architecture -> its module's `Architecture`; the model entry points.

Adding a family is one module under `woolly.models` and one line in `ARCHITECTURES`.
"""
from __future__ import annotations

from typing import Callable

import jax

from woolly.arch import ModelConfig
from woolly.errors import ModelLoadFailed
from woolly.models import gemma2, gemma3, llama, phi3, qwen2, qwen3, qwen3moe
from woolly.models.base import Architecture, KVCache, hidden_states, output_logits

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    llama.LLAMA,
    gemma3.GEMMA3,
    qwen2.QWEN2,
    qwen3.QWEN3,
    phi3.PHI3,
    gemma2.GEMMA2,
    qwen3moe.QWEN3MOE,
)}


def family(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ModelLoadFailed(
            f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})") from None


def architecture(cfg: ModelConfig) -> Architecture:
    return family(cfg.arch)


def read_config(arch: str, meta: Callable[[str], object], vocab_size: int, tied_output: bool,
                tensor: Callable[[str], object] = lambda name: None) -> ModelConfig:
    """The config of `arch` from a metadata lookup `meta(key) -> value | None` and, for the
    few families that keep hyperparameters in tensors, `tensor(name) -> f32 array | None`."""
    return family(arch).config(meta, vocab_size, tied_output, tensor)


def forward_hidden(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens [B, T], positions [B, T] (-1: padding) -> final states [B, T, D], cache."""
    return hidden_states(architecture(cfg), params, tokens, positions, cache, cfg)


def forward(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens [B, T], positions [B, T] (-1: padding) -> logits [B, T, V], cache. Pure; cfg static."""
    h, cache = forward_hidden(params, tokens, positions, cache, cfg)
    return output_logits(params, h, cfg), cache
