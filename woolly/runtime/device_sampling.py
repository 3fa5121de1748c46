"""Token sampling on device, as pure functions of (logits, key, params).

The chain follows llama.cpp's default order: penalties over the recent window, top-k,
top-p, min-p (on temperature-1 probabilities), then temperature, then a categorical draw.
A temperature <= 0 means greedy. Every value is a traced per-slot array, so changing
them never recompiles.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# top-k at or below this runs on lax.top_k candidates; otherwise the whole vocabulary is sorted.
TOP_K_CANDIDATES = 128
NEG_INF = -jnp.inf


class SamplingParams(NamedTuple):
    """Per-slot sampling settings, each an array [B]: the sampling settings the device applies
    (named as woolly.sampling_settings declares them; the scheduler packs them by these names)."""

    temperature: jax.Array         # f32; <= 0: greedy
    top_k: jax.Array               # i32; <= 0: off
    top_p: jax.Array               # f32; >= 1: off
    min_p: jax.Array               # f32; <= 0: off
    repeat_penalty: jax.Array      # f32; 1: off
    presence_penalty: jax.Array    # f32; 0: off
    frequency_penalty: jax.Array   # f32; 0: off

    @classmethod
    def make(cls, batch: int, **values) -> "SamplingParams":
        """Host-side constructor: scalars are broadcast to [batch], sequences taken per slot; a
        setting not given is off (`OFF`: greedy, no filter, no penalty)."""
        unknown = set(values) - set(cls._fields)
        if unknown:
            raise TypeError(f"unknown device sampling setting(s): {', '.join(sorted(unknown))}")
        return cls(*(jnp.broadcast_to(jnp.asarray(values.get(k, OFF[k]), DTYPES[k]), (batch,)) for k in cls._fields))


# Each device setting's element type, and the value that turns it off (an idle slot's).
DTYPES = {k: np.int32 if k == "top_k" else np.float32 for k in SamplingParams._fields}
FLOAT_SETTINGS = tuple(k for k in SamplingParams._fields if DTYPES[k] == np.float32)   # packed columns, in order


def pack_floats(sampling: dict) -> np.ndarray:
    """The float settings of per-slot host values {name: [B]} as one array f32 [B, len(FLOAT_SETTINGS)]
    (one host->device copy); `from_packed` reads it back on the device."""
    return np.stack([np.asarray(sampling[k], np.float32) for k in FLOAT_SETTINGS], axis=1)


def from_packed(floats: jax.Array, top_k: jax.Array) -> SamplingParams:
    """SamplingParams from `pack_floats`' columns f32 [B, F] and top_k i32 [B] (packed with the ints)."""
    return SamplingParams(top_k=top_k, **{k: floats[:, i] for i, k in enumerate(FLOAT_SETTINGS)})
OFF = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
       "presence_penalty": 0.0, "frequency_penalty": 0.0}


def token_counts(recent: jax.Array, vocab_size: int) -> jax.Array:
    """How often each token occurs in recent [B, W] (-1: empty) -> i32 [B, V]."""
    B, W = recent.shape
    slot = jnp.broadcast_to(jnp.arange(B)[:, None], (B, W))                               # [B, W]
    ids = jnp.where(recent >= 0, recent, vocab_size)                                     # [B, W]; V: dropped
    return jnp.zeros((B, vocab_size), jnp.int32).at[slot, ids].add(1, mode="drop")


def apply_penalties(logits: jax.Array, recent: jax.Array, params: SamplingParams) -> jax.Array:
    """llama.cpp's penalties on logits [B, V] for tokens in recent [B, W]."""
    counts = token_counts(recent, logits.shape[-1])                                      # [B, V]
    seen = counts > 0
    rp = params.repeat_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rp, logits * rp)
    out = jnp.where(seen, penalized, logits)
    return (out - counts * params.frequency_penalty[:, None]
            - seen * params.presence_penalty[:, None])


def slot_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """One PRNG key per slot from its request's seed u32 [B] and token counter i32 [B] -> keys [B],
    so a request draws the same tokens whichever slots it shares a batch with."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)


# Large vocabularies are searched in blocks of logits: one vectorized max per block, then the
# exact answer among the best blocks. XLA:CPU's argmax (a variadic reduce) and TopK over
# [8, 262144] logits took ~3 ms each, a tenth of a Gemma-3 8-slot step. The largest block
# size that leaves at least 4n blocks is used (SmolLM2's 49152 logits: 32).
BLOCKS = (128, 64, 32)


def _blocks(logits: jax.Array, n: int):
    """logits [B, V] -> [B, V/b, b] when blocking pays for picking n, else None."""
    B, V = logits.shape
    for b in BLOCKS:
        if V % b == 0 and V // b >= 4 * n:
            return logits.reshape(B, V // b, b)
    return None


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, -1) (first index of the maximum) for logits f32 [B, V] -> i32 [B]."""
    blocks = _blocks(logits, 1)
    if blocks is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = blocks.shape[-1]
    best = jnp.argmax(blocks.max(axis=-1), axis=-1)                                      # [B] first best block
    inner = jnp.argmax(jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0], axis=-1)
    return (best * b + inner).astype(jnp.int32)


def top_k(logits: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k(logits, n) for logits f32 [B, V]: values [B, n] descending, ids i32 [B, n]
    (equal values: the lower id first). The n largest logits lie in the n blocks with the
    largest maxima, so only those blocks (kept in id order) are searched."""
    blocks = _blocks(logits, n)
    if blocks is None:
        return jax.lax.top_k(logits, n)
    B, b = logits.shape[0], blocks.shape[-1]
    _, best = jax.lax.top_k(blocks.max(axis=-1), n)                                     # [B, n]
    best = jnp.sort(best, axis=-1)                                                       # id order: ties as lax.top_k
    cand = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(B, n * b)       # [B, n * b]
    values, pos = jax.lax.top_k(cand, n)                                                 # [B, n]
    ids = jnp.take_along_axis(best, pos // b, axis=1) * b + pos % b
    return values, ids.astype(jnp.int32)


def _sample_from_candidates(logits: jax.Array, keys: jax.Array, params: SamplingParams, n_candidates: int):
    """Draw from the n_candidates largest logits [B, V] after top-k/top-p/min-p -> i32 [B]."""
    values, ids = top_k(logits, n_candidates)                                            # [B, C] descending
    rank = jnp.arange(n_candidates)[None, :]                                             # [1, C]
    k = params.top_k[:, None]
    keep = (k <= 0) | (rank < k)                                                         # [B, C]
    probs = jax.nn.softmax(jnp.where(keep, values, NEG_INF), axis=-1)                    # [B, C]
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (cum_before < params.top_p[:, None]) | (rank == 0)
    keep &= probs >= params.min_p[:, None] * probs[:, :1]
    temp = jnp.maximum(params.temperature, 1e-6)[:, None]
    scaled = jnp.where(keep, values / temp, NEG_INF)                                     # [B, C]
    choice = jax.vmap(jax.random.categorical)(keys, scaled)                              # [B]
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams, recent: jax.Array) -> jax.Array:
    """Next token per slot from logits [B, V] with keys [B] (see `slot_keys`); recent [B, W]
    (-1: empty) feeds the penalties -> i32 [B]."""
    logits = logits.astype(jnp.float32)
    penalized = jnp.any(params.repeat_penalty != 1) | jnp.any(params.presence_penalty != 0) \
        | jnp.any(params.frequency_penalty != 0)
    # Penalties off (the default) skip building token counts over the whole vocabulary. The
    # branches return tokens: one returning the logits unchanged cost a copy of all of them
    # (0.7 ms of an 8-slot SmolLM2 step, XLA:CPU's conditional copying its result).
    return jax.lax.cond(penalized, lambda lg: _draw(apply_penalties(lg, recent, params), keys, params),
                        lambda lg: _draw(lg, keys, params), logits)


def _draw(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """`sample` after the penalties: greedy where temperature <= 0, else a draw -> i32 [B]."""
    greedy = argmax(logits)                                                              # [B]
    V = logits.shape[-1]
    few = min(TOP_K_CANDIDATES, V)
    small_k = jnp.all((params.top_k > 0) & (params.top_k <= few) | (params.temperature <= 0))

    def drawn(_):
        return jax.lax.cond(small_k,
                            lambda: _sample_from_candidates(logits, keys, params, few),
                            lambda: _sample_from_candidates(logits, keys, params, V)).astype(jnp.int32)

    all_greedy = jnp.all(params.temperature <= 0)
    tokens = jax.lax.cond(all_greedy, lambda _: greedy, drawn, None)
    return jnp.where(params.temperature <= 0, greedy, tokens)


def push_recent(recent: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """Append tokens [B] to the recent window [B, W] of the active slots."""
    shifted = jnp.concatenate([recent[:, 1:], tokens[:, None]], axis=1)
    return jnp.where(active[:, None], shifted, recent)


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """logits [B, V] with the ids whose bit is clear in the packed mask u32 [B, ceil(V/32)] set to
    -inf (bit i of word w: id 32w + i; all ones: unconstrained). For constrained decoding
    (woolly.engine.grammar)."""
    B, V = logits.shape
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1                   # [B, W, 32]
    allowed = bits.reshape(B, -1)[:, :V].astype(bool)                                    # [B, V]
    return jnp.where(allowed, logits, NEG_INF)
