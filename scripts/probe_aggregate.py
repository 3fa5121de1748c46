"""Where the bench's "aggregate decode, N sessions" time goes: generate_batch of N x 32 tokens on
an 8-slot quantized engine (as `woolly bench` builds it), three repeats, with each run's slowest
time to first token (the admission cost: prompts are prefilled one after another).

    .venv/bin/python scripts/probe_aggregate.py smollm2-135m-instruct
"""
import time, sys, os
from woolly.bench import prompt_text, SAMPLING
from woolly.engine import CacheConfig, Engine, EngineConfig
name = sys.argv[1]
e = Engine(EngineConfig(max_batch_size=8, max_sequence_length=512, residency="quantized", cache_config=CacheConfig(enabled=False)))
from woolly.model_store import resolve_model_path
e.load_model(str(resolve_model_path(name)))
e.generate_batch([prompt_text(12, 0)], max_tokens=2, **SAMPLING)
e.generate_batch([prompt_text(12, i) for i in range(8)], max_tokens=4, **SAMPLING)   # the batched admission too
for rep in range(3):
    for n in (1, 8):
        prompts = [prompt_text(12, rep * 100 + i) for i in range(n)]
        t0 = time.perf_counter()
        rs = e.generate_batch(prompts, max_tokens=32, seed=rep, **SAMPLING)
        dt = time.perf_counter() - t0
        tot = sum(r.generated_tokens for r in rs)
        ttft = max(r.time_to_first_token for r in rs)
        print(f"rep {rep} n={n}: {tot} tokens in {dt:.2f}s = {tot/dt:.0f} tok/s; max ttft {ttft:.2f}s; prompt tokens {[r.prompt_tokens for r in rs][:3]}")
