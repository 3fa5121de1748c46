"""Constrained decoding: grammars compiled by llguidance, their token masks applied on device.

A `Grammar` (JSON schema, any JSON object, regex, GBNF or Lark) is compiled against the model's
vocabulary (`vocabulary_for`: each id's bytes from woolly's tokenizer, control tokens marked
with a 0xFF prefix as llguidance's llama.cpp bridge does; built once per tokenizer, in the
background after a model loads: `prepare_vocabulary`). Each constrained slot holds a `Matcher`;
a step with one is `constrained_step`: the forward pass is queued on the device (or already was,
by the step before), the host fills each row's packed bitmask u32 [B, ceil(V/32)] while it runs
(all ones for an unconstrained row), the jitted sampler draws with the mask, and the next step's
forward pass is queued on the drawn tokens before the host reads them. A grammar that can take
nothing more ends the generation ("stop"); at an accepting point the end-of-generation ids are
allowed.
"""
from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from woolly.errors import GenerationFailed, InvalidRequest
from woolly.runtime.device_sampling import pack_floats

log = logging.getLogger("woolly.engine")

try:
    import llguidance
    from llguidance import LLMatcher, LLTokenizer
except ImportError:   # an optional dependency: a clear error when a grammar is asked for
    llguidance = None


def _need_library() -> None:
    if llguidance is None:
        raise InvalidRequest("constrained output needs the llguidance package (pip install llguidance)")


# JSON as models write it: ", " and ": " between items, no other whitespace (llguidance's default
# lets any run of whitespace in, and small models then loop on newlines until max_tokens).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `kind` is json_schema, regex or lark; `source` its text."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Grammar":
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text).checked()

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object, Ollama's format "json")."""
        return cls("json_schema", '{"type": "object"}').checked()

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern).checked()

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        """A llama.cpp GBNF grammar (Lark is accepted too), converted by llguidance."""
        _need_library()
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            lark = any_to_lark(text)
        except Exception as e:
            raise InvalidRequest(f"invalid grammar: {e}") from None
        return cls("lark", lark).checked()

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text).checked()

    def compiled(self) -> str:
        """The llguidance grammar definition."""
        _need_library()
        try:
            if self.kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_STYLE)
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.source)
            if self.kind == "lark":
                return LLMatcher.grammar_from_lark(self.source)
        except Exception as e:   # malformed JSON and the like raise here; the rest in validate_grammar
            raise InvalidRequest(f"invalid {self.kind} grammar: {e}") from None
        raise InvalidRequest(f"unknown grammar kind {self.kind!r}")

    def checked(self) -> "Grammar":
        """self, after llguidance has validated it (an InvalidRequest saying why, if not)."""
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(self.compiled())
        if is_error:
            raise InvalidRequest(f"invalid {self.kind} grammar: {'; '.join(msgs)}")
        return self


# -- the vocabulary bridge -------------------------------------------------------------------
class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tok):
        n = tok.vocab_size
        control = [i for i in range(n) if tok.is_control(i)]
        self.tokens = [tok.token_bytes(i) for i in range(n)]
        for i in control:
            self.tokens[i] = b"\xff" + self.tokens[i]
        self.eos_token_id = tok.special_tokens.eos if tok.special_tokens.eos is not None \
            else min(tok.special_tokens.eog)
        self.bos_token_id = tok.special_tokens.bos
        self.special_token_ids = control
        self._tok = tok

    def __call__(self, text: bytes) -> list[int]:
        return self._tok.tokenize(text.decode("utf-8", errors="replace"), add_bos=False)


_vocabs: "weakref.WeakKeyDictionary[object, Future]" = weakref.WeakKeyDictionary()
_vocabs_lock = threading.Lock()
# The name of the thread that built each tokenizer's bridge: never the scheduler's (the engine
# builds it when a model loads, `prepare_vocabulary`).
_built_by: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
PREPARE_THREAD = "woolly-grammar-vocabulary"


def vocabulary_built_by(tok) -> str | None:
    """The name of the thread that built tok's vocabulary bridge (None: not built)."""
    with _vocabs_lock:
        return _built_by.get(tok)


def _build(tok) -> "LLTokenizer":
    with _vocabs_lock:
        _built_by[tok] = threading.current_thread().name
    eog = sorted(tok.special_tokens.eog)
    return LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tok)), eos_token=eog or None)


def vocabulary_for(tok) -> "LLTokenizer":
    """llguidance's view of a woolly tokenizer, built once per tokenizer (0.2-1.2 s, holding the
    GIL): by the first caller, or by the thread `prepare_vocabulary` started, which is then told
    to build at once and waited for."""
    _need_library()
    with _vocabs_lock:
        pending = _vocabs.get(tok)
        mine = pending is None
        if mine:
            pending = _vocabs[tok] = Future()
        elif tok in _wanted:
            _wanted[tok].set()
    if mine:
        _resolve(tok, pending)
    return pending.result()


def _resolve(tok, pending: Future) -> None:
    try:
        pending.set_result(_build(tok))
    except BaseException as e:   # the next caller tries again (and gets the error itself)
        with _vocabs_lock:
            if _vocabs.get(tok) is pending:
                del _vocabs[tok]
        pending.set_exception(e)


_wanted: "weakref.WeakKeyDictionary[object, threading.Event]" = weakref.WeakKeyDictionary()
QUIET_S = 0.3        # how long the engine must have been idle before the background build starts
POLL_S = 0.05


def prepare_vocabulary(tok, idle=None) -> threading.Thread | None:
    """Build tok's vocabulary bridge in a background thread, so the first grammar request does
    not stall the scheduler (every slot) while it is built; None without llguidance (or built).

    The build holds the GIL for its length (0.9 s for a 262k vocabulary), so with `idle` (a
    callable: is the engine doing nothing? None once it has closed) it waits until the engine has
    been idle for QUIET_S, or until a grammar asks for the vocabulary: a request sent right after
    load (a one-shot `woolly run`, the first token of a new process) is not slowed by it."""
    if llguidance is None:
        return None
    with _vocabs_lock:
        if tok in _vocabs:
            return None
        pending = _vocabs[tok] = Future()
        wanted = _wanted[tok] = threading.Event()

    def given_up() -> bool:
        """Leave the vocabulary to whoever asks for it (unless somebody already has)."""
        with _vocabs_lock:
            if wanted.is_set():
                return False
            _vocabs.pop(tok, None)
            _wanted.pop(tok, None)
            pending.cancel()
            return True

    def build():
        quiet_since = None
        while idle is not None and not wanted.is_set() and not _exiting.is_set():
            quiet, now = idle(), time.monotonic()
            if quiet is None:   # that engine has closed
                if given_up():
                    return
                break
            quiet_since = (quiet_since or now) if quiet else None
            if quiet_since is not None and now - quiet_since >= QUIET_S:
                break
            wanted.wait(POLL_S)
        if _exiting.is_set() and given_up():   # the process is exiting: no build starts now
            return
        _resolve(tok, pending)
        if pending.exception() is not None:   # a request that asks for a grammar gets the error itself
            log.warning("building the grammar vocabulary failed: %s", pending.exception())

    thread = threading.Thread(target=build, name=PREPARE_THREAD, daemon=True)
    _preparing.add(thread)
    thread.start()
    return thread


_exiting = threading.Event()
_preparing: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


@atexit.register
def _stop_preparing() -> None:
    """At interpreter exit, no background build starts and one under way is waited for: a daemon
    thread still inside llguidance when Python finalizes aborts the process ("FATAL: exception
    not rethrown"), as the scheduler's thread did inside XLA."""
    _exiting.set()
    for thread in list(_preparing):
        thread.join(timeout=60)


class Matcher:
    """One request's grammar state: the mask of what may come next, the tokens it took."""

    def __init__(self, grammar: Grammar, tok):
        self.m = LLMatcher(vocabulary_for(tok), grammar.compiled(), log_level=0)
        if self.m.is_error():
            raise InvalidRequest(f"invalid {grammar.kind} grammar: {self.m.get_error()}")

    def fill(self, row: np.ndarray) -> None:
        """This step's allowed ids into row u32 [ceil(V/32)] (bit i of word w: id 32w + i)."""
        self.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def advance(self, token: int) -> bool:
        """Take the drawn token -> whether the grammar is complete (nothing more can follow)."""
        if not self.m.consume_token(token):
            raise GenerationFailed(f"the grammar refused token {token}: {self.m.get_error()}")
        return self.m.is_stopped()


def matcher(grammar: Grammar | None, tok) -> Matcher | None:
    return None if grammar is None else Matcher(grammar, tok)


# -- the constrained step ------------------------------------------------------------------
def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# Queue each constrained step's successor forward pass before its tokens are read (False: the
# step-by-step path, for comparison in benchmarks and tests).
CHAIN = True


def _pack_sampling(seeds, counters, sampling: dict, recent) -> tuple[np.ndarray, np.ndarray]:
    """The masked draw's per-slot inputs as two arrays (two host->device copies, not eleven):
    ints i32 [B, 3 + W] (seed bits, counter, top_k, penalty window) and floats f32 [B, 6]."""
    B, W = len(seeds), recent.shape[1]
    ints = np.empty((B, 3 + W), np.int32)
    ints[:, 0] = np.asarray(seeds, np.uint32).view(np.int32)
    ints[:, 1], ints[:, 2], ints[:, 3:] = counters, sampling["top_k"], recent
    return ints, pack_floats(sampling)


@partial(jax.jit, static_argnames=("want_logits",))
def _sample_masked(logits, ints, floats, mask, want_logits: bool):
    """Draw from logits [B, V] with the packed mask u32 [B, ceil(V/32)] applied -> (tokens i32 [B],
    masked logits [B, V] when want_logits)."""
    from woolly.runtime.device_sampling import apply_token_mask, from_packed, sample, slot_keys
    params = from_packed(floats, ints[:, 2])
    keys = slot_keys(jax.lax.bitcast_convert_type(ints[:, 0], jnp.uint32), ints[:, 1])
    masked = apply_token_mask(logits.astype(jnp.float32), mask)                          # [B, V]
    return sample(masked, keys, params, ints[:, 3:]), (masked if want_logits else None)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _forward_after(params, cache, drawn, positions, cfg):
    """The next step's forward pass, queued on this step's drawn tokens i32 [B] (still on device):
    each live slot (position i32 [B] >= 0) goes on at the next position; one whose cache is full,
    or an idle one, writes nothing -> (logits [B, V], cache)."""
    from woolly.runtime.entry import decode_logits
    nxt = jnp.where((positions >= 0) & (positions + 1 < cache.length), positions + 1, -1)
    return decode_logits(params, cache, drawn, nxt, cfg)


class QueuedForward(NamedTuple):
    """A step's forward pass queued on the device before the host read the tokens it takes in."""

    logits: jax.Array   # f32 [B, V], on device


def constrained_step(runner, packed: tuple, matchers: list, want_logits: bool = False,
                     queued: QueuedForward | None = None, chain: bool = False):
    """One decode step where some slots are constrained -> (tokens i32 [B] on host, masked logits
    [B, V] on device when `want_logits`, else None, the next step's QueuedForward when `chain`).

    The forward pass is dispatched (or was, `queued`: on the tokens the last step drew, before the
    host read them), each row's mask is filled on the host while it runs (all ones for an
    unconstrained row), then the masked draw. With `chain` the next step's forward pass is queued
    on the drawn tokens before they are read, so the host's work on them (emitting, the grammar
    taking them, the next masks) overlaps the device's next forward pass: every slot that goes on
    does so with the token drawn, so the scheduler chains only when the device's draw is final
    (no host sampler or logprobs) and no newcomer is about to take a slot."""
    from woolly.runtime import entry
    tokens, positions, seeds, counters, sampling, recent = packed[:6]
    if queued is None:
        step = getattr(runner._entry, "decode_step", entry.decode_step)
        logits, runner.cache = step(runner.params, runner.cache, jnp.asarray(tokens, jnp.int32),
                                    jnp.asarray(positions, jnp.int32), cfg=runner.cfg)         # queued
    else:
        logits = queued.logits
    V = logits.shape[-1]
    mask = np.full((len(matchers), mask_words(V)), 0xFFFFFFFF, np.uint32)                 # [B, ceil(V/32)]
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill(mask[i])
    ints, floats = _pack_sampling(seeds, counters, sampling, recent)
    drawn, masked = _sample_masked(logits, jnp.asarray(ints), jnp.asarray(floats), jnp.asarray(mask), want_logits)
    nxt = None
    if chain:
        nl, runner.cache = _forward_after(runner.params, runner.cache, drawn, jnp.asarray(positions, jnp.int32),
                                          cfg=runner.cfg)
        nxt = QueuedForward(nl)
    return np.asarray(drawn), masked, nxt
