"""The jitted entry points: the one place that decides what compiles, and for which shapes.

Shapes are buckets (prompt length, cache length, slot count, output budget); everything
that changes per call (lengths, positions, slots, budgets, sampling values) is a traced
array. Each entry point compiles once per combination of bucket shapes and `cfg`.
Caches are donated, so XLA updates them in place.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from woolly.models import KVCache, forward_hidden, output_logits
from woolly.runtime.aot import Exported
from woolly.runtime.cache import new_cache
from woolly.runtime.device_sampling import SamplingParams, from_packed, pack_floats, push_recent, sample, slot_keys


def _slot_rows(cache: KVCache, slot: jax.Array, length: int | None = None) -> KVCache:
    """A copy of slot `slot`'s first `length` rows (all when None) -> [1, K, length, H] per buffer."""
    def rows(c):
        return jax.lax.dynamic_slice(c, (slot, 0, 0, 0), (1, c.shape[1], length or c.shape[2], c.shape[3]))
    return jax.tree.map(rows, cache)


def _put_slot_rows(cache: KVCache, rows: KVCache, slot: jax.Array) -> KVCache:
    """Write rows [1, K, S', H] (S' <= S) over slot `slot`'s first S' rows, in place when donated."""
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=0), cache, rows)


@partial(jax.jit, static_argnames=("cfg", "kv_len", "logits"), donate_argnames=("cache",))
def prefill(params, cache: KVCache, tokens: jax.Array, start: jax.Array, length: jax.Array, slot: jax.Array,
            cfg, kv_len: int | None = None, logits: bool = True) -> tuple[jax.Array | None, KVCache]:
    """Run tokens[:length] (tokens i32 [T], padded to a bucket) at positions start.. into cache slot
    `slot`; -> logits of the last real token [V], cache. Longer prompts: call again with start moved on.
    kv_len (static, >= start + length): attend over only the first kv_len cache rows — a short
    prompt in a long cache then costs attention over its own bucket, not the whole cache.
    logits (static) False: return None instead (the output projection is skipped: Gemma-3's
    262144-row one costs ~7 ms, which a prompt whose last token is decoded next never reads)."""
    T = tokens.shape[0]
    idx = jnp.arange(T, dtype=jnp.int32)
    positions = jnp.where(idx < length, start + idx, -1)[None]                              # [1, T]
    S = cache.length if kv_len is None else min(kv_len, cache.length)
    # Only the slot's first S rows are copied out and back (not the whole slot: a short prompt
    # in an 8-slot cache otherwise moved ~50 MB per prefill, measured).
    head = _slot_rows(cache, slot, S)                                                        # [1, K, S, H]
    h, head = forward_hidden(params, tokens[None], positions, head, cfg)                     # [1, T, D]
    cache = _put_slot_rows(cache, head, slot)
    if not logits:
        return None, cache
    last = jax.lax.dynamic_index_in_dim(h[0], length - 1, axis=0, keepdims=False)            # [D]
    return output_logits(params, last, cfg), cache


@partial(jax.jit, static_argnames=("cfg", "logits"), donate_argnames=("cache",))
def prefill_rows(params, cache: KVCache, tokens: jax.Array, positions: jax.Array, last: jax.Array, cfg,
                 logits: bool = True):
    """Several slots' prompts at once: tokens i32 [B, T] at positions i32 [B, T] (-1: padding or a
    slot not being filled, writes nothing) into the whole cache -> (logits [B, V] of each row's
    token at index last i32 [B], cache). Each row's result is what `prefill` gives it alone (the
    CPU kernels treat rows and queries independently); on a mesh, each device prefills its own
    slots against its own part of the cache, so no KV moves. logits False: None (as `prefill`)."""
    h, cache = forward_hidden(params, tokens, positions, cache, cfg)                         # [B, T, D]
    if not logits:
        return None, cache
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]                        # [B, D]
    return output_logits(params, h_last, cfg), cache


def decode_logits(params, cache: KVCache, tokens: jax.Array, positions: jax.Array, cfg) -> tuple[jax.Array, KVCache]:
    """One token per slot: tokens i32 [B] at positions i32 [B] (-1: slot inactive, nothing written)
    -> logits [B, V], cache."""
    h, cache = forward_hidden(params, tokens[:, None], positions[:, None], cache, cfg)       # [B, 1, D]
    return output_logits(params, h[:, 0], cfg), cache


decode_step = jax.jit(decode_logits, static_argnames=("cfg",), donate_argnames=("cache",))


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_and_sample(params, cache: KVCache, tokens: jax.Array, positions: jax.Array, seeds: jax.Array,
                      counters: jax.Array, sampling: SamplingParams, recent: jax.Array, cfg):
    """decode_step, then sample every slot's next token on device with the key of (seed u32 [B],
    counter i32 [B]); recent [B, W] is the penalty window -> (next tokens i32 [B], logits [B, V], cache)."""
    logits, cache = decode_logits(params, cache, tokens, positions, cfg)
    return sample(logits, slot_keys(seeds, counters), sampling, recent), logits, cache


STEP_COLUMNS = 7   # ints columns before the penalty window: see pack_step


def pack_step(tokens, positions, seeds, counters, sampling: dict, recent, keep=None,
              budget=None) -> tuple[np.ndarray, np.ndarray]:
    """A decode step's per-slot host inputs as two arrays, so a step costs two host->device copies,
    not thirteen: ints i32 [B, 7 + W] (token, position, seed bits, counter, top_k, window length,
    budget, recent window [W]) and floats f32 [B, 6] (device_sampling.pack_floats). keep (default W): how many
    of the window's last entries the slot's penalties use; budget (default 2**30): tokens the slot
    may still draw, counting this step's (both only matter to `next_step_ints`)."""
    B, W = len(tokens), recent.shape[1]
    ints = np.empty((B, STEP_COLUMNS + W), np.int32)
    ints[:, 0], ints[:, 1], ints[:, 3], ints[:, 4] = tokens, positions, counters, sampling["top_k"]
    ints[:, 2] = np.asarray(seeds, np.uint32).view(np.int32)
    ints[:, 5] = W if keep is None else keep
    ints[:, 6] = 1 << 30 if budget is None else budget
    ints[:, STEP_COLUMNS:] = recent
    return ints, pack_floats(sampling)


def next_step_ints(ints: jax.Array, drawn: jax.Array, cache_length: int) -> jax.Array:
    """The packed ints of the step after this one, from this step's ints [B, 7 + W] and the tokens
    it drew [B], made on device (what the scheduler would pack on the host for a slot that goes
    on): the drawn token is the input at the next position, the counter moves on, the token joins
    the penalty window (of which the last `keep` entries stay), the budget drops by one. A slot
    whose budget or cache runs out goes idle (position -1); idle slots stay as they are."""
    W = ints.shape[1] - STEP_COLUMNS
    live = ints[:, 1] >= 0                                                                  # [B]
    budget = ints[:, 6] - 1
    pos = jnp.where((budget > 0) & (ints[:, 1] + 1 < cache_length), ints[:, 1] + 1, -1)
    window = jnp.concatenate([ints[:, STEP_COLUMNS + 1:], drawn[:, None]], axis=1)          # [B, W]
    window = jnp.where(jnp.arange(W)[None] >= W - ints[:, 5:6], window, -1)
    nxt = jnp.concatenate([drawn[:, None], pos[:, None], ints[:, 2:3], ints[:, 3:4] + 1, ints[:, 4:6],
                           budget[:, None], window], axis=1)
    return jnp.where(live[:, None], nxt, ints)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_and_sample_packed(params, cache: KVCache, ints: jax.Array, floats: jax.Array, cfg):
    """`decode_and_sample` with its inputs packed by `pack_step` -> (next tokens i32 [B], logits [B, V],
    cache, the next step's ints (`next_step_ints`): a step can be queued on this one's output
    before the host has read it)."""
    sampling = from_packed(floats, ints[:, 4])
    seeds = jax.lax.bitcast_convert_type(ints[:, 2], jnp.uint32)
    logits, cache = decode_logits(params, cache, ints[:, 0], ints[:, 1], cfg)
    drawn = sample(logits, slot_keys(seeds, ints[:, 3]), sampling, ints[:, STEP_COLUMNS:])
    return drawn, logits, cache, next_step_ints(ints, drawn, cache.length)


@partial(jax.jit, static_argnames=("cfg", "max_new"), donate_argnames=("cache",))
def generate(params, cache: KVCache, logits: jax.Array, positions: jax.Array, active: jax.Array,
             budgets: jax.Array, stop_ids: jax.Array, seeds: jax.Array, sampling: SamplingParams,
             recent: jax.Array, cfg, max_new: int):
    """Whole completions on device (lax.while_loop), for all slots at once.

    logits [B, V]: each slot's next-token logits (from prefill); positions i32 [B]: where the
    next token goes; active bool [B]; budgets i32 [B] (<= max_new, the static output bucket);
    stop_ids i32 [E] (-1 padded); seeds u32 [B]: token i of a slot is drawn with slot_keys(seed, i),
    as `decode_and_sample` does. A slot stops after emitting a stop id or its budget.
    -> (tokens i32 [B, max_new], counts i32 [B] (stop token included), cache).
    """
    B = logits.shape[0]
    out = jnp.zeros((B, max_new), jnp.int32)                                                 # [B, max_new]
    counts = jnp.zeros((B,), jnp.int32)

    def cond(state):
        step, active = state[0], state[3]
        return (step < max_new) & jnp.any(active)

    def body(state):
        step, logits, positions, active, counts, out, cache, recent = state
        tok = sample(logits, slot_keys(seeds, counts), sampling, recent)                     # [B]
        out = jnp.where(active[:, None] & (jnp.arange(max_new)[None] == counts[:, None]), tok[:, None], out)
        counts = counts + active
        recent = push_recent(recent, tok, active)
        active = active & ~jnp.any(tok[:, None] == stop_ids[None], axis=1) & (counts < budgets)
        logits, cache = decode_logits(params, cache, tok, jnp.where(active, positions, -1), cfg)
        return step + 1, logits, positions + active, active, counts, out, cache, recent

    state = (jnp.int32(0), logits, positions, active & (budgets > 0), counts, out, cache, recent)
    state = jax.lax.while_loop(cond, body, state)
    return state[5], state[4], state[6]


def sequence_logits(params, tokens: jax.Array, cfg) -> jax.Array:
    """Logits at every position of tokens i32 [B, T] from position 0, no cache kept -> [B, T, V]."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _ = forward_hidden(params, tokens, positions, new_cache(cfg, B, T), cfg)
    return output_logits(params, h, cfg)


all_logits = jax.jit(sequence_logits, static_argnames=("cfg",))


@partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(params, tokens: jax.Array, cfg) -> jax.Array:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for tokens i32 [B, T] -> [B, T-1] (perplexity)."""
    logits = sequence_logits(params, tokens, cfg)[:, :-1]                             # [B, T-1, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@partial(jax.jit, static_argnames=("cfg",))
def embed(params, tokens: jax.Array, lengths: jax.Array, cfg) -> jax.Array:
    """Mean of the final (normed) hidden states over tokens[:, :length], L2-normalized.
    tokens i32 [B, T] (padded to a bucket), lengths i32 [B] -> f32 [B, D]."""
    B, T = tokens.shape
    idx = jnp.arange(T, dtype=jnp.int32)[None]                                               # [1, T]
    valid = idx < lengths[:, None]                                                           # [B, T]
    positions = jnp.where(valid, idx, -1)
    h, _ = forward_hidden(params, tokens, positions, new_cache(cfg, B, T), cfg)              # [B, T, D]
    mean = jnp.sum(h * valid[..., None], axis=1) / jnp.maximum(lengths, 1)[:, None]          # [B, D]
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


read_slot = jax.jit(_slot_rows)
"""A copy of one slot's rows of the cache -> KVCache of [1, K, S, H] buffers (prefix cache)."""

write_slot = jax.jit(_put_slot_rows, donate_argnums=(0,))
"""Write rows ([1, K, S, H] per layer) into slot `slot` of the cache, in place."""


# The decode path's entry points, traced once per machine rather than once per process: a new
# process loads their exported lowering (woolly/runtime/aot.py) and goes straight to the
# compile cache. Same arguments, same donation (the cache, argument 1).
prefill = Exported(prefill, "prefill", donate_argnums=(1,), static_argnames=("cfg", "kv_len", "logits"))
prefill_rows = Exported(prefill_rows, "prefill_rows", donate_argnums=(1,), static_argnames=("cfg", "logits"))
decode_step = Exported(decode_step, "decode_step", donate_argnums=(1,))
decode_and_sample = Exported(decode_and_sample, "decode_and_sample", donate_argnums=(1,))
decode_and_sample_packed = Exported(decode_and_sample_packed, "decode_and_sample_packed", donate_argnums=(1,))
generate = Exported(generate, "generate", donate_argnums=(1,), static_argnames=("cfg", "max_new"))
