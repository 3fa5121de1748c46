"""`Runner`: the thin stateful shell the engine drives — params, one KV cache, host-side bucketing.

Everything it computes goes through the jitted entry points in `entry`; this class only pads
to buckets, keeps the cache it donates, and converts to and from numpy.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from woolly.model_file import Model
from woolly.runtime import aot, entry
from woolly.runtime.cache import KV_CACHE_TYPES, KVCache, bucket, cache_shape, new_cache
from woolly.runtime.compile_cache import enable_compile_cache
from woolly.runtime.params import load_params
from woolly.runtime.device_sampling import FLOAT_SETTINGS, SamplingParams
from woolly.sampling_settings import RECENT_WINDOW

MAX_PREFILL_BUCKET = 512   # longer prompts are prefilled in chunks of this many tokens
PENALTY_WINDOW = 64        # llama.cpp's default repeat_last_n


def _put(a, dtype=None) -> jax.Array:
    """A host array on the default device. Not `jnp.asarray`: in this jax that compiles (or looks
    up in the compile cache) a copy program for every new shape, ~10-30 ms on a new process's
    path to its first token; `jax.device_put` is a plain transfer."""
    return jax.device_put(np.asarray(a, dtype))


def _rows_for(chunk_tokens: int, T: int) -> int:
    """Rows of length T in an embedding pass of `chunk_tokens`: the largest power of two that fits, at least 1."""
    return 1 << (max(1, chunk_tokens // T).bit_length() - 1)


class PendingStep(NamedTuple):
    """A queued decode step's device-side outputs."""

    tokens: jax.Array      # i32 [B]: the tokens drawn
    logits: jax.Array      # f32 [B, V]
    next_ints: jax.Array   # i32 [B, 7 + W]: the next step's packed ints (entry.next_step_ints)
    floats: jax.Array      # f32 [B, 6]: this step's sampling floats (the next one's too)


def early_load(path: str | os.PathLike, slots: int, cache_length: int, residency: str,
               kv_cache_type: str) -> aot.EarlyLoad | None:
    """Start loading what `_load_first_steps` loads for a runner about to be made with these
    settings for the model file at `path`, before the file is read (`aot.EarlyLoad`: what the
    executables' keys need, the prepared weights' shapes, is only known once it is). The hint is
    the file's identity, the settings and the code; None for a file that is not there (its error
    comes from opening it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    hint = hashlib.sha256(repr((os.path.realpath(path), st.st_size, st.st_mtime_ns, slots, cache_length, residency,
                                kv_cache_type, aot.source_hash())).encode()).hexdigest()[:32]
    return aot.EarlyLoad(hint, ("prefill", "decode_and_sample_packed"))


class Runner:
    """A loaded model with `slots` concurrent sequences of up to `cache_length` positions."""

    def __init__(self, model: Model, residency: str = "dense", slots: int = 1, cache_length: int = 512,
                 compile_cache: bool = True, params: dict | None = None, mesh=None, kv_cache_type: str = "f32",
                 load_first_steps: "bool | aot.EarlyLoad" = False):
        """`params`: an already loaded pytree of `model` (shared between runners), else loaded here.
        `mesh`: a ("data", "model") `jax.sharding.Mesh` (`sharding.make_mesh`): params and cache
        are placed on it and every computation is partitioned by XLA; None: one device, as ever.
        `kv_cache_type`: the cache's element, one of cache.KV_CACHE_TYPES. `load_first_steps`:
        start loading the first request's executables now, in the background (`_load_first_steps`);
        an `aot.EarlyLoad` of them (`early_load`) is used where it loaded the right ones."""
        if compile_cache:
            enable_compile_cache()
        self.model = model
        self.cfg = model.config
        self.residency = residency
        self.mesh = mesh
        if params is None and mesh is not None:   # whole on the host first: the model need not fit one device
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                params = load_params(model, residency, grouped=False)   # rows are split by sharding
        elif params is None:   # prepared weights cached on disk with the compiled programs (weights_cache)
            params = load_params(model, residency, cache=compile_cache)
        if mesh is None:
            self._entry = entry          # the single-device entry points (with the CPU kernels)
        else:
            from woolly.runtime import sharding
            self._entry = sharding.entry_points(mesh)
            params = sharding.shard_params(params, self.cfg, mesh)
        self.params = params
        self.slots = slots
        self.cache_length = bucket(cache_length)
        self.cache_dtype = KV_CACHE_TYPES[kv_cache_type]
        # (entry name, shapes, static) -> compiled executable, None, or a Future of one (`_call`)
        self._executables: dict = {}
        self._early = load_first_steps
        if load_first_steps and mesh is None:
            self._load_first_steps()
        self.cache = self._new_cache()

    def _call(self, name: str, shape_key: tuple, *args, **static):
        """entry.<name>(*args, **static) through its compiled executable, which for a runner depends
        only on `shape_key` (params and cache shapes are fixed): a new process deserializes it
        (`aot.Exported.executable`) instead of tracing and lowering, ~0.3-0.4 s of CPU before its
        first token. The entry point itself where there is none (a mesh or several devices,
        WOOLLY_AOT=0, a failure to compile or load it)."""
        fn = getattr(self._entry, name)
        key = (name, shape_key, tuple(sorted(static.items())))
        exe = self._executables.get(key, False)
        if isinstance(exe, concurrent.futures.Future):   # being loaded in the background
            exe = self._executables[key] = exe.result()
        if exe is False:
            exe = self._executables[key] = fn.executable(*args, **static) if self.mesh is None and \
                hasattr(fn, "executable") else None
        if exe is not None:
            return exe(*args)
        return fn(*args, **static)

    def _load_first_steps(self) -> None:
        """Load (or compile) in background threads from now, while the caller builds the KV cache,
        the tokenizer and the scheduler, the executables a first request needs: the decode step
        and the prefill of a short prompt (up to MIN_BUCKET tokens). In a new process with warm
        caches deserializing each is ~0.3 s of CPU that the first token would otherwise wait for.
        The arguments are described by shape only (the cache does not exist yet)."""
        cache_spec = jax.ShapeDtypeStruct(cache_shape(self.cfg, self.slots, self.cache_length), self.cache_dtype)
        layers = (cache_spec,) * self.cfg.n_layers
        cache = KVCache(layers, layers)
        ints = jax.ShapeDtypeStruct((self.slots, entry.STEP_COLUMNS + RECENT_WINDOW), np.int32)   # pack_step
        floats = jax.ShapeDtypeStruct((self.slots, len(FLOAT_SETTINGS)), np.float32)
        scalar = jax.ShapeDtypeStruct((), np.int32)
        T = bucket(1)
        calls = [("decode_and_sample_packed", (ints.shape, floats.shape), (ints, floats), {"cfg": self.cfg})]
        if T <= self.cache_length:   # what `prefill` calls for a prompt of up to T tokens, as the scheduler does
            calls.append(("prefill", (T,), (jax.ShapeDtypeStruct((T,), np.int32), scalar, scalar, scalar),
                          {"cfg": self.cfg, "kv_len": T, "logits": False}))
        early = self._early if isinstance(self._early, aot.EarlyLoad) else None
        for name, shape_key, specs, static in calls:
            fn = getattr(self._entry, name)
            ahead = early.entry(name) if early is not None else None
            # None (the entry point is then traced on first use, as without this) if that raises
            self._executables[(name, shape_key, tuple(sorted(static.items())))] = aot.in_background(
                lambda fn=fn, specs=specs, static=static, ahead=ahead:
                    fn.executable(self.params, cache, *specs, early=ahead, **static),
                f"woolly-load-{name}")

    def _new_cache(self):
        if self.mesh is None:
            return new_cache(self.cfg, self.slots, self.cache_length, self.cache_dtype)
        from woolly.runtime import sharding
        return sharding.new_cache(self.cfg, self.mesh, self.slots, self.cache_length, self.cache_dtype)

    @property
    def data_parallel(self) -> int:
        """Devices the batch axis is split over (1 without a mesh)."""
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    # -- one step at a time ------------------------------------------------------------
    def prefill(self, tokens: Sequence[int], slot: int = 0, start: int = 0, logits: bool = True) -> jax.Array | None:
        """Feed tokens into `slot` from position `start` -> next-token logits f32 [V] (on device);
        None when not `logits` (the output projection is then skipped)."""
        self._check_span(tokens, start)
        if self.data_parallel > 1:
            out = self.prefill_rows({slot: (tokens, start)}, logits=logits)
            return None if out is None else out[slot]
        out = None
        for i in range(0, len(tokens), MAX_PREFILL_BUCKET):
            chunk = tokens[i:i + MAX_PREFILL_BUCKET]
            padded = np.zeros(min(bucket(len(chunk)), MAX_PREFILL_BUCKET), np.int32)     # [T]
            padded[:len(chunk)] = chunk
            kv_len = min(bucket(start + i + len(chunk)), self.cache_length)   # rows attention reads
            out, self.cache = self._call("prefill", (len(padded),), self.params, self.cache, _put(padded),
                                         np.int32(start + i), np.int32(len(chunk)), np.int32(slot),
                                         cfg=self.cfg, kv_len=kv_len,
                                         logits=logits and i + MAX_PREFILL_BUCKET >= len(tokens))
        return out

    def _check_span(self, tokens: Sequence[int], start: int) -> None:
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        if start + len(tokens) > self.cache_length:
            raise ValueError(f"{start + len(tokens)} positions exceed the cache length {self.cache_length}")

    def prefill_rows(self, rows: dict[int, tuple[Sequence[int], int]], logits: bool = True) -> jax.Array | None:
        """Several slots at once: {slot: (tokens, start)} fed in one pass over the whole cache
        (other slots get padding: position -1, writes nothing) -> logits f32 [B, V] (rows of
        `rows` only; None when not `logits`). Each slot's result is the one `prefill` gives it alone.
        With a mesh, the cache's B axis is split over "data": each device runs its own slots,
        reading no other's KV."""
        for toks, start in rows.values():
            self._check_span(toks, start)
        if self.mesh is None and len(rows) == 1:   # one slot: its own rows only (see `prefill`)
            (slot, (toks, start)), = rows.items()
            out = self.prefill(toks, slot=slot, start=start, logits=logits)
            return None if out is None else jnp.zeros((self.slots, self.cfg.vocab_size), jnp.float32).at[slot].set(out)
        longest = max(len(t) for t, _ in rows.values())
        result = None
        for i in range(0, longest, MAX_PREFILL_BUCKET):
            T = min(bucket(min(longest - i, MAX_PREFILL_BUCKET)), MAX_PREFILL_BUCKET)
            tokens = np.zeros((self.slots, T), np.int32)                                  # [B, T]
            positions = np.full((self.slots, T), -1, np.int32)                            # [B, T]
            last = np.zeros(self.slots, np.int32)                                         # [B]
            done = np.zeros(self.slots, bool)                                             # last token in this chunk
            for slot, (toks, start) in rows.items():
                chunk = list(toks[i:i + MAX_PREFILL_BUCKET])
                if chunk:
                    tokens[slot, :len(chunk)] = chunk
                    positions[slot, :len(chunk)] = start + i + np.arange(len(chunk))
                    last[slot] = len(chunk) - 1
                    done[slot] = i + len(chunk) == len(toks)
            out, self.cache = self._entry.prefill_rows(self.params, self.cache, _put(tokens),
                                                       _put(positions), _put(last), cfg=self.cfg,
                                                       logits=logits)
            if logits:
                result = out if result is None else jnp.where(jnp.asarray(done)[:, None], out, result)
        return result

    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> jax.Array:
        """One token per slot (position -1: slot idle) -> logits f32 [B, V] (on device)."""
        logits, self.cache = self._entry.decode_step(self.params, self.cache, _put(tokens, np.int32),
                                                     _put(positions, np.int32), cfg=self.cfg)
        return logits

    # -- whole completions -------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int] = 32,
                 sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                 seed: int | Sequence[int] = 0) -> list[list[int]]:
        """Complete one prompt per slot (len(prompts) <= slots) on device; stop ids are included.
        `seed` (one, or one per prompt) draws the same tokens as `step` with that seed."""
        n = len(prompts)
        if not 0 < n <= self.slots:
            raise ValueError(f"{n} prompts for {self.slots} slots")
        budgets = np.zeros(self.slots, np.int32)
        budgets[:n] = max_tokens
        if max(len(p) for p in prompts) + int(budgets.max()) > self.cache_length:
            raise ValueError("prompt plus max_tokens exceed the cache length")
        V = self.cfg.vocab_size
        recent = np.full((self.slots, PENALTY_WINDOW), -1, np.int32)
        positions = np.zeros(self.slots, np.int32)
        if self.data_parallel > 1:   # every prompt at once, each on its slot's device
            logits = self.prefill_rows({slot: (prompt, 0) for slot, prompt in enumerate(prompts)})
        else:
            logits = jnp.zeros((self.slots, V), jnp.float32)
        for slot, prompt in enumerate(prompts):
            if self.data_parallel == 1:
                logits = logits.at[slot].set(self.prefill(prompt, slot=slot))
            tail = list(prompt[-PENALTY_WINDOW:])
            recent[slot, PENALTY_WINDOW - len(tail):] = tail
            positions[slot] = len(prompt)
        stops = np.full(max(1, len(stop_ids)), -1, np.int32)
        stops[:len(stop_ids)] = stop_ids
        sampling = sampling or SamplingParams.make(self.slots)
        seeds = np.zeros(self.slots, np.uint32)
        seeds[:n] = seed
        out, counts, self.cache = self._entry.generate(
            self.params, self.cache, logits, _put(positions), _put(np.arange(self.slots) < n),
            _put(budgets), _put(stops), _put(seeds), sampling, _put(recent),
            cfg=self.cfg, max_new=bucket(int(budgets.max())))
        out, counts = np.asarray(out), np.asarray(counts)
        return [out[i, :counts[i]].tolist() for i in range(n)]

    def embed(self, token_lists: Sequence[Sequence[int]], chunk_tokens: int = 4096) -> np.ndarray:
        """Mean-pooled, L2-normalized final hidden states, one row per token list -> f32 [N, D].

        Inputs go through in passes of about `chunk_tokens` padded tokens (at least one input):
        sorted by length, each pass is [rows, T] with T its longest input's bucket and rows a power
        of two, so memory follows the chunk, not the request, and shapes (compiles) stay few."""
        n = len(token_lists)
        order = sorted(range(n), key=lambda i: len(token_lists[i]))
        out = np.zeros((n, self.cfg.d_model), np.float32)                                # [N, D]
        i = 0
        while i < n:
            j = i + 1   # this pass: order[i:j]; grow while its padded [rows, T] fits the chunk
            while j < n and j + 1 - i <= _rows_for(chunk_tokens, bucket(len(token_lists[order[j]]))):
                j += 1
            T = bucket(len(token_lists[order[j - 1]]))
            rows = -(-bucket(j - i, minimum=1) // self.data_parallel) * self.data_parallel
            padded = np.zeros((rows, T), np.int32)                                       # [rows, T]
            lengths = np.zeros(rows, np.int32)                                           # 0: a padding row
            for r, k in enumerate(order[i:j]):
                padded[r, :len(token_lists[k])] = token_lists[k]
                lengths[r] = len(token_lists[k])
            vecs = self._entry.embed(self.params, _put(padded), _put(lengths), cfg=self.cfg)
            out[order[i:j]] = np.asarray(vecs)[:j - i]
            i = j
        return out

    def token_logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """log p(tokens[:, t+1] | tokens[:, :t+1]) for tokens i32 [B, T] from position 0 -> f32 [B, T-1].
        With a mesh, the B rows are split over "data" (when B divides it)."""
        return np.asarray(self._entry.token_logprobs(self.params, _put(tokens, np.int32), cfg=self.cfg))

    # -- what the engine's scheduler drives ----------------------------------------------
    def step(self, tokens: np.ndarray, positions: np.ndarray, seeds: np.ndarray, counters: np.ndarray,
             sampling: dict, recent: np.ndarray, want_logits: bool = False):
        """One batched decode step with per-slot sampling -> (next tokens i32 [B] on host,
        logits [B, V] on device when `want_logits`, else None)."""
        if self.mesh is None:
            pending = self.dispatch_step(tokens, positions, seeds, counters, sampling, recent)
            return np.asarray(pending.tokens), (pending.logits if want_logits else None)
        params = SamplingParams(**{k: jnp.asarray(sampling[k]) for k in SamplingParams._fields})
        out, logits, self.cache = self._entry.decode_and_sample(
            self.params, self.cache, _put(tokens, np.int32), _put(positions, np.int32),
            _put(seeds, np.uint32), _put(counters, np.int32), params,
            _put(recent, np.int32), cfg=self.cfg)
        return np.asarray(out), (logits if want_logits else None)

    @property
    def can_chain(self) -> bool:
        """Whether `dispatch_step` / `chain_step` work here (one device)."""
        return self.mesh is None

    def dispatch_step(self, tokens, positions, seeds, counters, sampling: dict, recent, keep=None,
                      budget=None) -> "PendingStep":
        """`step` without waiting: the step is queued on the device and its outputs stay there
        (see `entry.pack_step` for keep and budget). One device only."""
        ints, floats = entry.pack_step(tokens, positions, seeds, counters, sampling, recent, keep, budget)
        return self._run_packed(_put(ints), _put(floats))

    def chain_step(self, pending: "PendingStep") -> "PendingStep":
        """Queue the step after `pending` on its device-side outputs, before the host reads them:
        every slot live in `pending` goes on with the token it drew (`entry.next_step_ints`), so
        the host's work on one step's tokens overlaps the next step's compute."""
        return self._run_packed(pending.next_ints, pending.floats)

    def _run_packed(self, ints: jax.Array, floats: jax.Array) -> "PendingStep":
        drawn, logits, self.cache, next_ints = self._call("decode_and_sample_packed", (ints.shape, floats.shape),
                                                          self.params, self.cache, ints, floats, cfg=self.cfg)
        return PendingStep(drawn, logits, next_ints, floats)

    def read_slot(self, slot: int):
        """A device copy of one slot's cache rows (for the prefix cache)."""
        return self._entry.read_slot(self.cache, np.int32(slot))

    def write_slot(self, rows, slot: int) -> None:
        self.cache = self._entry.write_slot(self.cache, rows, np.int32(slot))

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot's rows across all layers (what a prefix-cache entry holds)."""
        return sum(c.nbytes for c in self.cache.k + self.cache.v) // self.slots

    def reset_cache(self) -> None:
        """A fresh cache after a failed step (the donated one may be gone)."""
        self.cache = self._new_cache()
