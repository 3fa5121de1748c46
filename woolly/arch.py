"""Architecture hyperparameters read once from GGUF metadata (host side, no JAX).

`ModelConfig` is frozen and hashable: the runtime passes it to `jax.jit` as a static
argument. Each family module under `woolly.models` reads its own config with the helpers
here (`meta_value`, `common_config`) and lists its own tensors; `woolly.models.families`
maps GGUF architecture names to those modules.
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
    rope_base_local: float = 0.0   # gemma3: sliding-window layers use their own base
    sliding_window: int = 0        # 0: every layer attends globally
    sliding_window_pattern: int = 0  # every Nth layer is global, the rest slide (gemma3: 6, gemma2: 2)
    embed_scale: float = 1.0       # gemma: embeddings times sqrt(D)
    attn_scale: float = 0.0        # 0: 1/sqrt(H)
    rope_freq_scale: float = 1.0   # linear RoPE scaling: positions times this (1 / rope.scaling.factor)
    rope_freq_factors: tuple[float, ...] = ()  # [H/2] angle divisors (rope_freqs.weight, Llama 3.1+)
    attn_softcap: float = 0.0      # gemma2: scores -> cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0     # gemma2: the same on the output logits
    n_experts: int = 0             # E: mixture-of-experts layers (qwen3moe); 0: a dense MLP
    n_experts_used: int = 0        # k: experts each token goes through
    expert_ffn_dim: int = 0        # F_e: each expert's hidden width

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
        from woolly.models.families import family

        return family(self.arch).tensors(self)


def meta_value(meta: Callable[[str], object], key: str, kind=int, default=None):
    """meta(key) checked and converted to `kind` (int: in 1..2^31-1, float: finite and > 0);
    missing: `default`, or ModelLoadFailed when there is none."""
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


def common_config(arch: str, meta, vocab_size: int, tied: bool) -> dict:
    """The `ModelConfig` fields every family reads under the same `{arch}.` keys."""
    p = arch + "."
    d = meta_value(meta, p + "embedding_length")
    n_heads = meta_value(meta, p + "attention.head_count")
    n_kv = meta_value(meta, p + "attention.head_count_kv", default=n_heads)
    head_dim = meta_value(meta, p + "attention.key_length", default=d // n_heads)
    if n_heads % n_kv:
        raise ModelLoadFailed(f"{n_heads} attention heads do not divide into {n_kv} kv heads")
    return dict(
        arch=arch, n_layers=meta_value(meta, p + "block_count"), d_model=d, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, ffn_dim=meta_value(meta, p + "feed_forward_length"), vocab_size=vocab_size,
        context_length=meta_value(meta, p + "context_length", default=2048),
        rms_eps=meta_value(meta, p + "attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_base=meta_value(meta, p + "rope.freq_base", float, 10000.0), tied_output=tied,
    )
