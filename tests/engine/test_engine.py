"""The Engine and Session on the real SmolLM2: finish reasons, stops, seeds, cancellation, session
context, continuous batching, streaming, evaluation helpers, host samplers, stats."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from oracle import llama_cpp_model
from woolly.engine import GenerationResult, MirostatSampler
from woolly.errors import InvalidRequest

from support.engine import SLOTS, run_events

pytestmark = pytest.mark.real

STORY = "Once upon a time, in a small village by the sea,"
PROMPTS = [STORY, "The three primary colors are", "Python is a programming language that",
           "The best way to learn to cook is", "In 1969, astronauts", "My favourite season is autumn because",
           "To make a cup of tea, first", "The largest planet in the solar system"]


@pytest.fixture(scope="module")
def alone(engine):
    """Greedy completions, each from a fresh session with nothing else running: the reference."""
    cache = {}

    def get(prompt: str, max_tokens: int):
        if (prompt, max_tokens) not in cache:
            s = engine.create_session()
            s.generate_sync(prompt, max_tokens=max_tokens, temperature=0)
            cache[prompt, max_tokens] = s.last_result
        return cache[prompt, max_tokens]
    return get


def test_length_finish_gives_exactly_max_tokens(engine, alone):
    r = alone(STORY, 6)
    assert r.finish_reason == "length" and r.generated_tokens == len(r.token_ids) == 6
    assert r.text == engine.detokenize(r.token_ids)


def test_zero_max_tokens_gives_nothing(engine):
    s = engine.create_session()
    assert s.generate_sync(STORY, max_tokens=0) == "" and s.last_result.finish_reason == "length"


def test_stop_string_spanning_two_tokens_is_honoured_and_cut(engine):
    events, full = run_events(engine.create_session(), STORY, max_tokens=24, temperature=0)
    ends, n = [], 0
    for e in events:
        n += len(e.text)
        ends.append(n)
    text = full.text
    assert "".join(e.text for e in events) == text
    stop = None
    for j in range(1, len(events) - 1):   # a stop made of the end of token j and the start of token j+1
        a, b = events[j].text, events[j + 1].text
        if len(a) < 1 or len(b) < 1:
            continue
        cand = a[-2:] + b[:2]
        start = ends[j] - len(a[-2:])
        if text.find(cand) == start and cand.strip():
            stop = cand
            break
    assert stop is not None, f"no two-token stop candidate in {text!r}"
    s = engine.create_session()
    out = s.generate_sync(STORY, max_tokens=24, temperature=0, stop=[stop])
    assert out == text[:start] and stop not in out
    assert s.last_result.finish_reason == "stop"
    assert s.last_result.generated_tokens == j + 2      # generation halted at the token completing it


def test_eos_ends_with_stop(engine):
    s = engine.create_session()
    s.generate_sync("Answer with one word. What colour is the sky?", max_tokens=200, temperature=0)
    r = s.last_result
    assert r.finish_reason == "stop" and r.generated_tokens < 200
    assert not any(engine.tokenizer.is_eog(t) for t in r.token_ids)


def test_same_seed_same_text_alone_and_in_a_batch_of_four(engine):
    opts = dict(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    first = engine.create_session().generate_sync(STORY, **opts)
    again = engine.create_session().generate_sync(STORY, **opts)

    async def batch():
        sessions = [engine.create_session() for _ in range(4)]
        return await asyncio.gather(
            sessions[0].generate(PROMPTS[1], max_tokens=12, temperature=0.9, seed=7),
            sessions[1].generate(STORY, **opts),
            sessions[2].generate(PROMPTS[2], max_tokens=20, temperature=1.2, top_k=5),
            sessions[3].generate(STORY, max_tokens=12, temperature=1.0, seed=99))
    texts = asyncio.run(batch())
    assert first == again == texts[1]
    assert first != engine.create_session().generate_sync(STORY, **{**opts, "seed": 4321}) or \
        first != texts[3]     # another seed draws another text (both equal would be a broken seed)


def test_cancel_from_the_stream_consumer_takes_effect_within_one_step(engine):
    session = engine.create_session()
    sched = engine.scheduler()
    N = 3

    async def consume():
        pieces, at_cancel = [], None
        async for piece in session.generate_stream(STORY, max_tokens=100, temperature=0):
            pieces.append(piece)
            if len(pieces) == N:
                session.cancel_generation()
                at_cancel = sched.steps
        return pieces, at_cancel
    pieces, at_cancel = asyncio.run(consume())
    r = session.last_result
    assert r.finish_reason == "cancelled"
    assert sched.steps - at_cancel <= 1                 # at most the step already running
    assert N <= r.generated_tokens <= N + 2 and len(pieces) <= N + 2


def test_second_turn_reuses_the_first_turns_cache(engine):
    s = engine.create_session()
    s.generate_sync("Here is a short poem about the moon:", max_tokens=8, temperature=0)
    first = s.last_result
    history = list(s.context)
    assert len(history) == first.prompt_tokens + first.generated_tokens
    follow = " Now write one about the sun:"
    second_text = s.generate_sync(follow, max_tokens=8, temperature=0)
    second = s.last_result
    new = engine.tokenize(follow, add_bos=False)
    assert second.prompt_tokens == len(history) + len(new)
    # every token of the first turn whose KV exists (all but the last sampled one) is reused
    assert second.cached_prompt_tokens == len(history) - 1
    assert s.stats().cached_prompt_tokens >= second.cached_prompt_tokens and s.stats().generations == 2
    # the reused cache gives what a full prefill of the same ids gives
    engine.scheduler().prefix_cache.clear()
    fresh = engine.create_session()
    assert fresh.generate_sync(history + new, max_tokens=8, temperature=0) == second_text
    assert fresh.last_result.cached_prompt_tokens == 0
    s.clear_context()
    s.generate_sync(follow, max_tokens=1, temperature=0)
    assert s.last_result.prompt_tokens == len(engine.tokenize(follow))


def test_a_shared_system_prompt_is_prefilled_once(engine):
    system = "You are a careful assistant. Answer briefly and truthfully, in plain English.\n"
    first, second = system + "Question: what is two plus two?", system + "Question: name a red fruit."
    sched = engine.scheduler()
    sched.prefix_cache.clear()
    a = engine.create_session()
    a.generate_sync(first, max_tokens=4, temperature=0)
    known = (engine.tokenize(first) + a.last_result.token_ids)[:-1]     # tokens whose KV was kept
    ids = engine.tokenize(second)
    shared = next(i for i, (x, y) in enumerate(zip(known + [-1], ids)) if x != y)
    assert shared >= len(engine.tokenize(system)) - 1
    b = engine.create_session()
    text = b.generate_sync(second, max_tokens=6, temperature=0)
    assert b.last_result.cached_prompt_tokens == shared
    sched.prefix_cache.clear()                                          # the same without reuse
    assert engine.create_session().generate_sync(second, max_tokens=6, temperature=0) == text


def test_steps_queued_on_device_draw_what_host_packed_steps_draw(engine):
    """Each step is queued on the last one's device outputs (token, position, counter, penalty
    window, budget moved on there) before the host reads it; a request with logprobs is stepped
    from host-packed inputs only. Same seed and settings -> the same tokens, alone and beside
    requests that end at other steps (the queued step then still holds their slots)."""
    opts = dict(temperature=0.9, top_k=40, repeat_penalty=1.3, repeat_last_n=5, presence_penalty=0.4,
                frequency_penalty=0.2, seed=31)

    def ids(**extra):
        s = engine.create_session()
        s.generate_sync(STORY, max_tokens=24, **opts, **extra)
        return s.last_result.token_ids
    host = ids(logprobs=1)
    assert len(host) == 24 and ids() == host

    async def batch():
        sessions = [engine.create_session() for _ in range(4)]
        outs = await asyncio.gather(
            sessions[0].generate(STORY, max_tokens=24, **opts),
            *(sessions[i].generate(PROMPTS[i], max_tokens=2 + 5 * i, temperature=0.7, seed=i) for i in (1, 2, 3)))
        return sessions[0].last_result.token_ids, outs
    together, outs = asyncio.run(batch())
    assert together == host
    for i, text in zip((1, 2, 3), outs[1:]):
        assert text == engine.create_session().generate_sync(PROMPTS[i], max_tokens=2 + 5 * i, temperature=0.7,
                                                             seed=i)


def test_eight_sessions_progress_together_and_match_their_solo_text(engine, alone):
    assert len(PROMPTS) == SLOTS
    log: list[tuple[int, str]] = []

    async def one(i, session):
        async for event in session.generate_events(PROMPTS[i], max_tokens=16, temperature=0):
            log.append((i, "done" if isinstance(event, GenerationResult) else "token"))
            if isinstance(event, GenerationResult):
                return event

    async def all_of_them():
        sessions = [engine.create_session() for _ in PROMPTS]
        return await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    results = asyncio.run(all_of_them())
    first_done = next(k for k, (_, kind) in enumerate(log) if kind == "done")
    for i in range(SLOTS):
        assert log.index((i, "token")) < first_done, f"session {i} had no token before another finished"
    switches = sum(a[0] != b[0] for a, b in zip(log, log[1:]))
    assert switches >= 8 * 4      # token events interleave, not one session after another
    for p, r in zip(PROMPTS, results):
        solo = alone(p, 16)
        assert (r.text, r.finish_reason) == (solo.text, solo.finish_reason), p


def test_requests_beyond_the_slots_queue_and_complete(engine):
    n = SLOTS + 3
    log: list[tuple[int, str]] = []
    seen_queued = []

    async def one(i):
        async for event in engine.create_session().generate_events(
                f"Count from {i}:", max_tokens=6, temperature=0):
            log.append((i, "done" if isinstance(event, GenerationResult) else "token"))
            seen_queued.append(engine.stats().queued_requests)
            seen_load.append(engine.load())
            if isinstance(event, GenerationResult):
                return event

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(n)))
    seen_load = []
    tokens_before = engine.load().tokens_generated
    results = asyncio.run(all_of_them())
    # the public counters /metrics reads: slots in use and the queue while busy, idle after
    assert max(x.waiting for x in seen_load) >= 1 and max(x.active for x in seen_load) == SLOTS
    after = engine.load()
    assert (after.active, after.waiting) == (0, 0)
    assert after.tokens_generated - tokens_before == sum(r.generated_tokens for r in results)
    assert all(r.finish_reason in ("length", "stop") and r.generated_tokens > 0 for r in results)
    # at most SLOTS had begun when the first finished; the rest waited for a slot
    first_done = next(k for k, (_, kind) in enumerate(log) if kind == "done")
    started = {i for i, kind in log[:first_done] if kind == "token"}
    assert len(started) <= SLOTS and len({i for i, _ in log}) == n
    assert max(seen_queued) >= 1


def test_generate_stream_with_tx_puts_pieces_then_none(engine, alone):
    async def main():
        tx: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(engine.create_session().generate_stream(STORY, 10, 0.0, 1.0, tx=tx))
        got = [await tx.get()]
        while got[-1] is not None:
            got.append(await tx.get())
        assert await task is None
        return got
    got = asyncio.run(main())
    assert got[-1] is None and all(got[:-1])
    assert "".join(got[:-1]) == alone(STORY, 10).text


def test_generate_stream_with_tx_still_ends_the_queue_on_error(engine):
    async def main():
        tx: asyncio.Queue = asyncio.Queue()
        with pytest.raises(InvalidRequest):
            await engine.create_session().generate_stream(STORY, -5, 0.0, 1.0, tx=tx)
        return tx.get_nowait()
    assert asyncio.run(main()) is None


def test_async_iteration_gives_the_same_pieces(engine, alone):
    async def main():
        return [p async for p in engine.create_session().generate_stream(STORY, 10, 0.0, 1.0)]
    assert "".join(asyncio.run(main())) == alone(STORY, 10).text


def test_streamed_pieces_are_whole_characters(engine):
    prompt = "把这句话翻译成英文：我喜欢在周末和朋友一起吃火锅 🍲🎉😊"
    s = engine.create_session()
    pieces = list(s.stream_sync(prompt, max_tokens=48, temperature=1.0, seed=3))
    ids = s.last_result.token_ids
    r = s.last_result
    assert "".join(pieces) == engine.detokenize(ids)
    for p in pieces[:-1]:
        assert p and "\ufffd" not in p
        p.encode("utf-8")                                  # no lone surrogates
    # only a generation cut off by max_tokens inside a character may end with its replacement
    assert "\ufffd" not in pieces[-1].rstrip("\ufffd")
    assert not pieces[-1].endswith("\ufffd") or r.finish_reason == "length"
    # the output did hold characters split across tokens, so whole-character streaming was exercised
    assert any("\ufffd" in engine.detokenize([t]) for t in ids)


def test_generate_batch_matches_each_prompt_alone(engine, alone):
    results = engine.generate_batch(PROMPTS[:3], max_tokens=8, temperature=0)
    assert [r.text for r in results] == [alone(p, 8).text for p in PROMPTS[:3]]


def test_generate_batch_with_a_refused_prompt_stops_the_others(engine):
    sched = engine.scheduler()
    too_long = "word " * (engine.scheduler().runner.cache_length + 10)
    with pytest.raises(InvalidRequest):
        engine.generate_batch([STORY, PROMPTS[1], too_long], max_tokens=200, temperature=0)
    at_error = sched.steps
    # a request queued after them finishes after their first step (slots are admitted in order)
    engine.create_session().generate_sync(PROMPTS[2], max_tokens=1, temperature=0)
    assert engine.stats().active_sessions == 0 and sched.steps - at_error <= 3   # not 200 steps


def test_perplexity_matches_llama_cpp(engine, smollm2_path):
    text = open("tests/data/perplexity.txt", encoding="utf-8").read()[:2400]   # 4 chunks: quick
    n_ctx = 128
    ours = engine.perplexity(text, n_ctx=n_ctx)
    llm = llama_cpp_model(smollm2_path, logits_all=True, n_ctx=n_ctx)
    ids = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    nll, count, first = 0.0, 0, n_ctx // 2
    for c in range(len(ids) // n_ctx):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        if llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false":
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(first, n_ctx):
            nll -= logp[t - 1, chunk[t]]
            count += 1
    theirs = math.exp(nll / count)
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


def test_embeddings_are_unit_vectors_and_similar_texts_are_closer(engine):
    v = engine.embed(["The cat sat on the mat.", "A cat was sitting on the rug.",
                      "Quarterly tax filings are due in April."])
    assert v.shape[0] == 3 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[1] @ v[2]


@pytest.mark.parametrize("options", [{"max_tokens": -1}, {"temperature": math.nan}, {"mirostat_tau": 5.0}])
def test_invalid_options_raise_invalid_request(engine, options):
    s = engine.create_session()
    with pytest.raises(InvalidRequest):
        s.generate_sync(STORY, **{"max_tokens": 4, **options})
    assert s.last_result is None and s.context == []


@pytest.mark.parametrize("version", [2, 1])
def test_mirostat_generates_and_adapts(engine, version):
    texts = []
    for _ in range(2):
        sampler = MirostatSampler(tau=5.0, eta=0.1, version=version, seed=42)
        s = engine.create_session()
        texts.append(s.generate_sync(STORY, max_tokens=10, sampler=sampler))
        assert s.last_result.generated_tokens > 0 and sampler.mu != 10.0
    assert texts[0] == texts[1] and texts[0]


def test_a_custom_host_sampler_chooses_the_tokens(engine):
    target = engine.tokenize(" moon", add_bos=False)
    assert len(target) == 1

    class Always:
        def sample(self, logits, temperature, top_p, top_k):
            assert len(logits) >= engine.tokenizer.vocab_size
            return target[0]
    s = engine.create_session()
    assert s.generate_sync(STORY, max_tokens=5, sampler=Always()) == " moon" * 5


def test_engine_stats(engine):
    before = engine.stats()
    s = engine.create_session()
    s.generate_sync(STORY, max_tokens=5, temperature=0)
    st = engine.stats()
    assert st.model == engine.current_model_name == "smollm2-135m-instruct"
    assert st.load_time > 0 and st.compiles > 0
    assert st.host_memory > 0 and st.device_memory > 0
    assert st.tokens_generated == before.tokens_generated + s.last_result.generated_tokens
    assert st.active_sessions == 0 and st.queued_requests == 0
    ss = s.stats()
    assert ss.generated_tokens == 5 and ss.time_to_first_token > 0 and ss.tokens_per_second > 0
