"""Time to first token of a 512-token prompt through the engine (a batch-1 quantized engine with
a 1024-token context and no prefix cache, as `woolly bench` builds it): what the bench's
"prefill 512" divides 512 by. Four runs after two warm-ups; and `Runner.prefill` of 511 vs 512
tokens (the engine prefills all but the last prompt token, which the first decode step reads).

    .venv/bin/python scripts/probe_first_token.py gemma3-270m
"""
import sys
import time

import jax

from woolly.bench import SAMPLING, prompt_ids
from woolly.engine import CacheConfig, Engine, EngineConfig
from woolly.model_store import resolve_model_path

name = sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m"
e = Engine(EngineConfig(max_batch_size=1, max_sequence_length=1024, residency="quantized",
                        cache_config=CacheConfig(enabled=False)))
e.load_model(str(resolve_model_path(name)))
ids = prompt_ids(e.tokenizer, 512, seed=1)


def first_token() -> float:
    s = e.create_session()
    s.generate_sync(ids, max_tokens=1, seed=0, **SAMPLING)
    return s.last_result.time_to_first_token


for _ in range(2):
    first_token()
times = [first_token() for _ in range(4)]
print(f"{name}: first token of 512 tokens {[round(t * 1e3) for t in times]} ms -> {512 / min(times):.0f} tok/s")
runner = e._scheduler.runner
for n in (511, 512):
    for _ in range(2):
        runner.prefill(ids[:n], logits=False)
        jax.block_until_ready(runner.cache)
    t = time.perf_counter()
    for _ in range(3):
        runner.prefill(ids[:n], logits=False)
        jax.block_until_ready(runner.cache)
    print(f"Runner.prefill of {n} tokens: {(time.perf_counter() - t) / 3 * 1e3:.0f} ms")
e.unload_model()
