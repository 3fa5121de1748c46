"""Continuous batching: one thread owns the device state and decodes every active slot together.

A request takes a free slot, is prefilled (reusing a cached prefix where one matches),
then joins the batched decode step; it never waits for another request to finish. When
no slot is free it queues; past `max_queue` it is refused as busy. Each step every
active slot gets one token; cancellation takes effect at the next step.

Events go to each request's `emit(event)`, called on the scheduler thread: `TokenEvent`s,
then one `GenerationResult` or one `WoollyError` (an `Event` each). An `emit` that
raises (its consumer's event loop has closed) cancels its own request and touches no other.
Live schedulers are closed at interpreter exit, so no thread is left inside XLA then.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from woolly.runtime import Runner
from woolly.runtime.device_sampling import DTYPES, OFF, SamplingParams
from woolly.engine import grammar
from woolly.engine.prefix_cache import PrefixCache
from woolly.engine.samplers import GenerationParams, seed32
from woolly.engine.stops import StopMatcher
from woolly.errors import ContextLengthExceeded, GenerationFailed, InvalidRequest, ServerBusy, WoollyError
from woolly.sampling_settings import RECENT_WINDOW   # W: penalty window kept per slot (repeat_last_n <= W)
from woolly.tokenizers.streaming import IncrementalDecoder

log = logging.getLogger("woolly.engine")

CLOSE_TIMEOUT = 30.0   # seconds `Scheduler.close` waits for the thread to finish its step


@dataclass
class TokenEvent:
    text: str                 # decoded text safe to show (may be "" while a character is incomplete)
    token_id: int
    index: int                # 0-based index among generated tokens
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str        # "stop" | "length" | "cancelled"
    time_to_first_token: float | None
    generation_time: float
    cached_prompt_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_time if self.generation_time > 0 else 0.0


# What a request's `emit` receives: tokens as they come, then a result or an error.
Event = TokenEvent | GenerationResult | WoollyError


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: GenerationParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Event) -> None:
        """emit(event); if it raises, this request is cancelled (it ends at the next step)."""
        try:
            self.emit(event)
        except Exception as e:   # e.g. "Event loop is closed": that consumer is gone
            if not self.cancelled.is_set():
                log.warning("request %d: its consumer cannot take events (%s: %s); cancelled",
                            self.id, type(e).__name__, e)
            self.cancel()


@dataclass
class _Slot:
    req: Request
    pos: int                  # where the next input token goes
    next_input: int
    stream: IncrementalDecoder
    stops: StopMatcher
    seed: int
    recent: list[int]
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    cached: int = 0
    grammar: object | None = None   # a woolly.engine.grammar.Matcher: constrained output


class Scheduler:
    """Owns the runner's cache and slots; a daemon thread runs admit -> step -> emit."""

    def __init__(self, runner: Runner, tokenizer, max_queue: int = 64, cache_bytes: int = 1 << 30,
                 cache_ttl: float = 3600.0, cache_enabled: bool = True):
        self.runner, self.tok = runner, tokenizer
        self.slots: list[_Slot | None] = [None] * runner.slots
        self.queue: collections.deque[Request] = collections.deque()
        self.max_queue = max_queue
        self.prefix_cache = PrefixCache(cache_bytes if cache_enabled else 0, cache_ttl)
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._closing: WoollyError | None = None
        self.tokens_generated = 0
        self.steps = 0
        self._ahead = None   # (PendingStep, slot owners' request ids) queued before the last step was read
        self._thread = threading.Thread(target=self._run, name="woolly-scheduler", daemon=True)
        self._thread.start()
        _live.add(self)

    # -- called from any thread ----------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: GenerationParams, emit) -> Request:
        limit = self.runner.cache_length
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        if len(prompt_ids) >= limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {limit} "
                f"(prompt plus at least one generated token)",
                details={"prompt_tokens": len(prompt_ids), "context_length": limit})
        req = Request(next(self._ids), list(prompt_ids), params, emit)
        with self._wake:
            if self._closing is not None:
                raise self._closing
            # a slot freed by a request that just finished takes from the queue on the next pass:
            # until then it still counts as room, or a client that got its answer and sends the next
            # request would be told "busy" while a slot stands idle
            free_slots = sum(s is None for s in self.slots)
            if len(self.queue) >= self.max_queue + free_slots:
                raise ServerBusy(f"the server is busy: {len(self.queue)} requests are waiting for a slot")
            self.queue.append(req)
            self._wake.notify()
        return req

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def idle(self) -> bool | None:
        """Nothing running or waiting? None once closed (for grammar.prepare_vocabulary)."""
        if self._closing is not None:
            return None
        return not self.queue and self.active == 0

    def close(self, error: WoollyError) -> None:
        """Stop the thread; every queued or running request ends with `error`. Idempotent."""
        with self._wake:
            if self._closing is None:
                self._closing = error
            self._wake.notify()
        if threading.current_thread() is not self._thread:   # (an emit may close its own engine)
            self._thread.join(timeout=CLOSE_TIMEOUT)
            if not self._thread.is_alive():
                self.prefix_cache.clear()
        _live.discard(self)

    # -- the scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while self._closing is None and not self.queue and self.active == 0:
                    self._wake.wait(timeout=1.0)
                closing = self._closing
            if closing is not None:
                self._fail_all(closing)
                return
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as e:  # a device failure ends the requests in flight, not the thread
                log.exception("decode step failed")
                err = e if isinstance(e, WoollyError) else GenerationFailed(f"generation failed: {type(e).__name__}")
                for i, s in enumerate(self.slots):
                    if s is not None:
                        self.slots[i] = None
                        s.req.send(err)
                self._ahead = None
                self.runner.reset_cache()

    def _fail_all(self, error: WoollyError) -> None:
        for i, s in enumerate(self.slots):
            if s is not None:
                self.slots[i] = None
                s.req.send(error)
        while self.queue:
            self.queue.popleft().send(error)

    def _admit(self) -> None:
        """Fill free slots from the queue, then prefill the new prompts in one pass."""
        started: list[int] = []
        for i in range(len(self.slots)):
            if self.slots[i] is not None:
                continue
            with self._wake:
                if not self.queue:
                    break
                req = self.queue.popleft()
            if req.cancelled.is_set():
                self._finish_unstarted(req, "cancelled")
                continue
            if req.params.max_tokens == 0:
                self._finish_unstarted(req, "length")
                continue
            try:
                self.slots[i] = self._start(i, req)
                started.append(i)
            except Exception as e:  # this request fails alone; it has left the queue, so tell it here
                self._fail_start(i, req, e)
        todo = {i: self.slots[i] for i in started if len(self.slots[i].req.prompt_ids) - 1 > self.slots[i].cached}
        if len(todo) > 1:
            try:
                self.runner.prefill_rows({i: (s.req.prompt_ids[s.cached:-1], s.cached) for i, s in todo.items()},
                                        logits=False)
                return
            except Exception:
                if self.runner.cache.k[0].is_deleted():  # donated and lost: the others' KV went with it
                    raise
                log.exception("batched prefill failed; prefilling one by one")
        for i, s in todo.items():   # one at a time, so a failure is that request's alone
            try:
                self.runner.prefill(s.req.prompt_ids[s.cached:-1], slot=i, start=s.cached, logits=False)
            except Exception as e:
                self._fail_start(i, s.req, e)

    def _fail_start(self, slot: int, req: Request, e: Exception) -> None:
        log.exception("prefill failed")
        self.slots[slot] = None
        req.send(e if isinstance(e, WoollyError) else GenerationFailed(f"prefill failed: {type(e).__name__}"))
        if self.runner.cache.k[0].is_deleted():  # donated and lost: the others' KV went with it
            raise e

    def _start(self, slot: int, req: Request) -> _Slot:
        """A slot for req, its KV filled from the prefix cache where it can be (the rest of the
        prompt, but for its last token, is prefilled by `_admit`)."""
        ids = req.prompt_ids
        n = len(ids)
        cached = 0
        if self.prefix_cache.max_bytes:
            cached, rows = self.prefix_cache.lookup(ids, n - 1)
            if cached:
                self.runner.write_slot(rows, slot)
        p = req.params
        seed = seed32(p.seed) if p.seed is not None else int(np.random.default_rng().integers(0, 2**31 - 1))
        return _Slot(req=req, pos=n - 1, next_input=ids[-1], stream=self._decoder(ids[-1]),
                     stops=StopMatcher(p.stop), seed=seed, recent=ids[-p.repeat_last_n:]
                     if p.repeat_last_n else [], cached=cached, grammar=grammar.matcher(p.grammar, self.tok))

    def _decoder(self, context_id: int) -> IncrementalDecoder:
        """The text of a slot's new tokens. They continue the prompt, so a SentencePiece space
        before the first is kept, unless the prompt is only BOS (then they begin the text)."""
        return IncrementalDecoder(self.tok, at_start=context_id == self.tok.special_tokens.bos)

    def _step(self) -> None:
        """One decode step for every active slot. Where it can, the step after it is queued on the
        device (`Runner.chain_step`) before this one's tokens are read, so the host's work per
        step (reading, detokenizing, emitting, packing) overlaps the device's next step."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and any(s is not None and ahead[1][i] != s.req.id for i, s in enumerate(self.slots)):
            ahead = None   # a slot was filled since that step was queued: it lacks the newcomer
        host_logits = any(s is not None and (s.req.params.sampler is not None or s.req.params.logprobs > 0)
                          for s in self.slots)
        constrained = [None if s is None else s.grammar for s in self.slots]
        queued = ahead[0] if ahead is not None and isinstance(ahead[0], grammar.QueuedForward) else None
        if queued is not None or any(m is not None for m in constrained):   # host masks: woolly.engine.grammar
            owners, ahead, pending = [None if s is None else s.req.id for s in self.slots], None, None
            # queue the next forward pass only while a slot is constrained (then back to the fused path)
            chain = any(m is not None for m in constrained) and grammar.CHAIN and self._may_chain(host_logits)
            next_tokens, logits, queued = grammar.constrained_step(self.runner, self._pack(), constrained,
                                                                   host_logits, queued, chain)
            if queued is not None:
                self._ahead = (queued, owners)
        elif ahead is not None:
            pending, owners = ahead
            next_tokens, logits = None, pending.logits
        else:
            owners = [None if s is None else s.req.id for s in self.slots]
            packed = self._pack()
            next_tokens = None
            if self.runner.can_chain:
                pending = self.runner.dispatch_step(*packed)
                logits = pending.logits
            else:
                pending = None
                next_tokens, logits = self.runner.step(*packed[:6], want_logits=host_logits)
        if pending is not None and self._may_chain(host_logits):
            self._ahead = (self.runner.chain_step(pending), owners)
        if next_tokens is None:
            next_tokens = np.asarray(pending.tokens)
        self.steps += 1
        now = time.perf_counter()
        for i, s in enumerate(self.slots):
            if s is None or owners[i] != s.req.id:   # idle, or finished since the step was queued
                continue
            p = s.req.params
            tok = int(next_tokens[i])
            lp = top = None
            if host_logits and (p.sampler is not None or p.logprobs):
                row = np.asarray(logits[i], np.float64)
                if p.sampler is not None:
                    tok = int(p.sampler.sample(row, p.temperature, p.top_p, p.top_k))
                if p.logprobs:
                    logp = row - row.max()
                    logp -= np.log(np.exp(logp).sum())
                    lp = float(logp[tok])
                    best = np.argsort(-logp)[:p.logprobs]
                    top = [(int(t), float(logp[t])) for t in best]
            self._advance(i, s, tok, now, lp, top)

    def _pack(self) -> tuple:
        """The active slots' step inputs from host state -> Runner.dispatch_step's arguments."""
        B = len(self.slots)
        tokens = np.zeros(B, np.int32)
        positions = np.full(B, -1, np.int32)
        seeds = np.zeros(B, np.uint32)
        counters = np.zeros(B, np.int32)
        recent = np.full((B, RECENT_WINDOW), -1, np.int32)
        keep = np.zeros(B, np.int32)
        budget = np.zeros(B, np.int32)
        sampling = {k: np.full(B, OFF[k], DTYPES[k]) for k in SamplingParams._fields}   # idle slots: off
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            p = s.req.params
            tokens[i], positions[i] = s.next_input, s.pos
            seeds[i], counters[i] = s.seed & 0xFFFFFFFF, len(s.generated)
            if s.recent:
                recent[i, -len(s.recent):] = s.recent
            keep[i] = p.repeat_last_n   # <= RECENT_WINDOW: the setting's declared bound
            budget[i] = p.max_tokens - len(s.generated)
            for k in sampling:
                sampling[k][i] = getattr(p, k)
        return tokens, positions, seeds, counters, sampling, recent, keep, budget

    def _may_chain(self, host_logits: bool) -> bool:
        """Queue the next step (with a constrained slot: its forward pass) before reading this one?
        Not when the host picks tokens (a Python sampler, logprobs), not when a waiting request is
        about to take a free slot (the queued step would lack it), and not when every slot ends
        here by its budget or the cache."""
        if host_logits or not self.runner.can_chain:
            return False
        if self.queue and any(s is None for s in self.slots):
            return False
        return any(s is not None and len(s.generated) + 1 < s.req.params.max_tokens
                   and s.pos + 1 < self.runner.cache_length for s in self.slots)

    def _advance(self, i: int, s: _Slot, tok: int, now: float, lp, top) -> None:
        req, p = s.req, s.req.params
        if req.cancelled.is_set():
            return self._finish(i, "cancelled")
        if s.first_token_at is None:
            s.first_token_at = now
        if self.tok.is_eog(tok):
            return self._finish(i, "stop")
        s.generated.append(tok)
        self.tokens_generated += 1
        piece = s.stops.feed(s.stream.feed(tok))
        if piece or lp is not None:
            s.text.append(piece)
            req.send(TokenEvent(piece, tok, len(s.generated) - 1, lp, top))
        if s.stops.stopped:
            return self._finish(i, "stop")
        if s.grammar is not None and s.grammar.advance(tok):   # the grammar is complete
            return self._finish(i, "stop")
        s.pos += 1
        s.next_input = tok
        if p.repeat_last_n:
            s.recent = (s.recent + [tok])[-p.repeat_last_n:]
        if len(s.generated) >= p.max_tokens or s.pos >= self.runner.cache_length:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> None:
        s = self.slots[i]
        self.slots[i] = None
        if reason != "stop" or not s.stops.stopped:
            tail = s.stops.feed(s.stream.flush()) + s.stops.flush()
            if tail:
                s.text.append(tail)
                s.req.send(TokenEvent(tail, -1, len(s.generated) - 1))
        if self.prefix_cache.max_bytes and s.pos > 0:
            known = (s.req.prompt_ids + s.generated)[:s.pos]   # tokens whose KV is in the slot
            self.prefix_cache.store(tuple(known), self.runner.read_slot(i), self.runner.slot_nbytes)
        now = time.perf_counter()
        start = s.req.submitted
        s.req.send(GenerationResult(
            text="".join(s.text), token_ids=list(s.generated), prompt_tokens=len(s.req.prompt_ids),
            generated_tokens=len(s.generated), finish_reason=reason,
            time_to_first_token=None if s.first_token_at is None else s.first_token_at - start,
            generation_time=now - start, cached_prompt_tokens=s.cached))

    def _finish_unstarted(self, req: Request, reason: str) -> None:
        req.send(GenerationResult("", [], len(req.prompt_ids), 0, reason, None,
                                          time.perf_counter() - req.submitted))


_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    """At interpreter exit, stop every scheduler thread before Python finalizes: a daemon thread
    still stepping inside XLA then aborted the process ("FATAL: exception not rethrown")."""
    for sched in list(_live):
        sched.close(GenerationFailed("the process is exiting"))
