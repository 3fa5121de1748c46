"""Constrained vs unconstrained decode tokens/s on one model (woolly.engine.grammar's cost).

    PYTHONPATH=. python benchmarks/grammar_speed.py [model] [--tokens 64] [--repeats 3]

Each run generates the same number of tokens greedily: unconstrained, then under a JSON schema
(one long string field) and a regex that neither end before max_tokens. Decode rate is
(tokens - 1) / (generation time - time to first token), the median over interleaved repeats;
the host's mask time per token is measured alone by replaying a generation.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from woolly.engine import Engine, EngineConfig
from woolly.engine.grammar import Grammar, Matcher, mask_words

GRAMMARS = {
    "none": None,
    "json_schema": lambda: Grammar.json_schema({"type": "object", "required": ["story"],
                                                "properties": {"story": {"type": "string", "minLength": 1000}}}),
    "regex": lambda: Grammar.regex(r"[A-Za-z ,.']{1,2000}"),
}


def generate(engine, prompt: str, tokens: int, grammar):
    async def go():
        result = None
        async for kind, payload in engine.create_session().generate_events(
                prompt, max_tokens=tokens, temperature=0.0, grammar=grammar):
            result = payload if kind == "done" else result
        return result
    return asyncio.run(go())


def decode_rate(r) -> float:
    return (r.generated_tokens - 1) / (r.generation_time - r.time_to_first_token)


def mask_ms(engine, grammar, token_ids) -> float:
    """Median host time to fill one row's mask, replaying a generation's tokens."""
    m = Matcher(grammar, engine.tokenizer)
    row = np.zeros(mask_words(engine.tokenizer.vocab_size), np.uint32)
    times = []
    for t in token_ids:
        t0 = time.perf_counter()
        m.fill(row)
        times.append(time.perf_counter() - t0)
        m.advance(t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(EngineConfig(max_batch_size=1, max_sequence_length=512))
    engine.load_model(args.model)
    prompt = "Once upon a time, in a lighthouse by the sea, there lived"
    grammars = {name: make() if make else None for name, make in GRAMMARS.items()}
    for g in grammars.values():
        generate(engine, prompt, 8, g)   # warm: compiles, the vocabulary bridge
    runs = {name: [] for name in grammars}
    for _ in range(args.repeats):        # interleaved, so a shared machine's load falls on each alike
        for name, g in grammars.items():
            runs[name].append(generate(engine, prompt, args.tokens, g))
    rates = {name: statistics.median(decode_rate(r) for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        extra = "" if grammars[name] is None else \
            f", mask {mask_ms(engine, grammars[name], rs[0].token_ids):.2f} ms/token"
        print(f"{name:12s} {rates[name]:8.1f} tok/s  (tokens: {[r.generated_tokens for r in rs]}{extra})")
    for name in grammars:
        if name != "none":
            print(f"{name}: {100 * (1 - rates[name] / rates['none']):.1f}% fewer tokens/s than unconstrained")
    engine.unload_model()


if __name__ == "__main__":
    main()
