"""Architecture hyperparameters read once from GGUF metadata (host side, no JAX).

`ModelConfig` is frozen and hashable: the runtime passes it to `jax.jit` as a static
argument. Each family registers how to read its config and which tensors it needs; a
new family (qwen2, phi3) adds one entry here and one module under `woolly.models`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from woolly.errors import ModelLoadFailed


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # GGUF general.architecture, e.g. "llama", "gemma3"
    n_layers: int
    d_model: int              # D
    n_heads: int              # N
    n_kv_heads: int           # K
    head_dim: int             # H
    ffn_dim: int              # F
    vocab_size: int           # V
    context_length: int
    rms_eps: float
    rope_base: float
    rope_neox: bool           # True: rotate halves (NEOX); False: adjacent pairs (llama GGUF)
    tied_output: bool         # output projection shares token_embd
    rope_base_local: float = 0.0   # gemma3 sliding-window layers use their own base
    sliding_window: int = 0        # 0: every layer attends globally
    sliding_window_pattern: int = 0  # gemma3: every Nth layer is global, the rest slide
    embed_scale: float = 1.0       # gemma: embeddings times sqrt(D)
    attn_scale: float = 0.0        # 0: 1/sqrt(H)

    @property
    def n_groups(self) -> int:  # G: query heads per kv head
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def query_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only within the sliding window."""
        if not self.sliding_window or not self.sliding_window_pattern:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> GGUF dims (innermost first) that this architecture needs."""
        return FAMILIES[self.arch].tensors(self)


def _get(meta: Callable[[str], object], key: str, kind=int, default=None):
    v = meta(key)
    if v is None:
        if default is None:
            raise ModelLoadFailed(f"metadata key {key!r} is missing")
        return default
    if isinstance(v, (str, bytes, list)) or hasattr(v, "shape"):
        raise ModelLoadFailed(f"metadata key {key!r} has the wrong type")
    try:
        out = kind(v)
    except (TypeError, ValueError, OverflowError):
        raise ModelLoadFailed(f"metadata key {key!r} has an invalid value {v!r}") from None
    if kind is int and not 0 < out < 1 << 31:
        raise ModelLoadFailed(f"metadata key {key!r} = {out} is out of range")
    if kind is float and not (math.isfinite(out) and out > 0):
        raise ModelLoadFailed(f"metadata key {key!r} = {out} is out of range")
    return out


def _common(arch: str, meta, vocab_size: int, tied: bool) -> dict:
    p = arch + "."
    d = _get(meta, p + "embedding_length")
    n_heads = _get(meta, p + "attention.head_count")
    n_kv = _get(meta, p + "attention.head_count_kv", default=n_heads)
    head_dim = _get(meta, p + "attention.key_length", default=d // n_heads)
    if n_heads % n_kv:
        raise ModelLoadFailed(f"{n_heads} attention heads do not divide into {n_kv} kv heads")
    return dict(
        arch=arch, n_layers=_get(meta, p + "block_count"), d_model=d, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, ffn_dim=_get(meta, p + "feed_forward_length"), vocab_size=vocab_size,
        context_length=_get(meta, p + "context_length", default=2048),
        rms_eps=_get(meta, p + "attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_base=_get(meta, p + "rope.freq_base", float, 10000.0), tied_output=tied,
    )


def _llama_config(meta, vocab_size, tied) -> ModelConfig:
    return ModelConfig(**_common("llama", meta, vocab_size, tied), rope_neox=False)


def _gemma3_config(meta, vocab_size, tied) -> ModelConfig:
    c = _common("gemma3", meta, vocab_size, tied)
    # llama.cpp's gemma3 constants: every 6th layer global, local RoPE base 10k.
    return ModelConfig(**c, rope_neox=True, rope_base_local=10000.0,
                       sliding_window=_get(meta, "gemma3.attention.sliding_window", default=4096),
                       sliding_window_pattern=6, embed_scale=math.sqrt(c["d_model"]),
                       attn_scale=1.0 / math.sqrt(c["head_dim"]))


def _llama_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
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


def _gemma3_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = _llama_tensors(c)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({
            b + "attn_q_norm.weight": (c.head_dim,),
            b + "attn_k_norm.weight": (c.head_dim,),
            b + "post_attention_norm.weight": (c.d_model,),
            b + "post_ffw_norm.weight": (c.d_model,),
        })
    return t


@dataclass(frozen=True)
class Family:
    config: Callable[..., ModelConfig]
    tensors: Callable[[ModelConfig], dict[str, tuple[int, ...]]]


FAMILIES: dict[str, Family] = {
    "llama": Family(_llama_config, _llama_tensors),
    "gemma3": Family(_gemma3_config, _gemma3_tensors),
}


def read_config(arch: str, meta: Callable[[str], object], vocab_size: int, tied_output: bool) -> ModelConfig:
    """Build the config of `arch` from a metadata lookup `meta(key) -> value | None`."""
    if arch not in FAMILIES:
        raise ModelLoadFailed(f"architecture {arch!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch].config(meta, vocab_size, tied_output)
