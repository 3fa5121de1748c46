"""Constrained vs unconstrained decode tokens/s on one model (woolly.engine.grammar's cost).

    PYTHONPATH=. python benchmarks/grammar_speed.py [model] [--tokens 64] [--repeats 3]

Each run generates the same number of tokens greedily: unconstrained, then under a JSON schema
(one long string field) and a regex that neither end before max_tokens. Decode rate is
(tokens - 1) / (generation time - time to first token), the median over repeats.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics

from woolly.engine import Engine, EngineConfig
from woolly.engine.grammar import Grammar

GRAMMARS = {
    "none": None,
    "json_schema": lambda: Grammar.json_schema({"type": "object", "properties": {"story": {"type": "string"}},
                                                "required": ["story"]}),
    "regex": lambda: Grammar.regex(r"[A-Za-z ,.']{1,2000}"),
}


def decode_rate(engine, prompt: str, tokens: int, grammar) -> float:
    async def go():
        result = None
        async for kind, payload in engine.create_session().generate_events(
                prompt, max_tokens=tokens, temperature=0.0, grammar=grammar):
            result = payload if kind == "done" else result
        return result
    r = asyncio.run(go())
    return (r.generated_tokens - 1) / (r.generation_time - r.time_to_first_token), r.generated_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(EngineConfig(max_batch_size=1, max_sequence_length=512))
    engine.load_model(args.model)
    prompt = "Write a short story about a lighthouse keeper."
    rates = {}
    for name, make in GRAMMARS.items():
        grammar = make() if make else None
        decode_rate(engine, prompt, 8, grammar)   # warm: compiles, the vocabulary bridge
        runs = [decode_rate(engine, prompt, args.tokens, grammar) for _ in range(args.repeats)]
        rates[name] = statistics.median(r for r, _ in runs)
        print(f"{name:12s} {rates[name]:8.1f} tok/s  (tokens generated: {[n for _, n in runs]})", flush=True)
    for name in GRAMMARS:
        if name != "none":
            print(f"{name}: {100 * (1 - rates[name] / rates['none']):+.1f}% slower than unconstrained")
    engine.unload_model()


if __name__ == "__main__":
    main()
