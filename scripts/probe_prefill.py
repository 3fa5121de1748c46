"""Prefill tokens/s at 128 and 512 tokens through `Runner.prefill` (quantized-resident, one slot,
cache of 1024), best and median of 4 after a warm-up: the prefill figures of benchmarks/README.md's
"What changed" list, without the first decode step the bench's time to first token includes;
then the engine's admission of 8 short prompts in one `prefill_rows` pass.

    .venv/bin/python scripts/probe_prefill.py gemma3-270m
    WOOLLY_KERNEL_MAX_ROWS=256 .venv/bin/python scripts/probe_prefill.py gemma3-270m   # 512 rows via GEMM
"""
import os
import sys
import time

import jax
import numpy as np

from woolly.model_file import Model
from woolly.runtime.runner import Runner

model = Model.from_file(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct")
runner = Runner(model, "quantized", slots=1, cache_length=1024)
ids = list(np.random.default_rng(0).integers(100, 20000, 512))
for n in (128, 512):
    jax.block_until_ready(runner.prefill(ids[:n]))
    times = []
    for _ in range(4):
        t = time.perf_counter()
        jax.block_until_ready(runner.prefill(ids[:n]))
        times.append(time.perf_counter() - t)
    print(f"{model.name} prefill {n}: {n / min(times):.0f} tok/s best, {n / np.median(times):.0f} median "
          f"(WOOLLY_KERNEL_MAX_ROWS={os.environ.get('WOOLLY_KERNEL_MAX_ROWS', 'default')})")

# The engine's admission of 8 short prompts: one `prefill_rows` pass over an 8-slot cache
# (8 x 11 tokens: the bench's 12-token prompts less the last token, which decode reads).
runner8 = Runner(model, "quantized", slots=8, cache_length=512)
rows = {i: (ids[11 * i:11 * i + 11], 0) for i in range(8)}
for _ in range(2):
    runner8.prefill_rows(rows, logits=False)
    jax.block_until_ready(runner8.cache)
times = []
for _ in range(5):
    t = time.perf_counter()
    runner8.prefill_rows(rows, logits=False)
    jax.block_until_ready(runner8.cache)
    times.append(time.perf_counter() - t)
print(f"{model.name} admission of 8 x 11 tokens in one pass: {min(times) * 1e3:.0f} ms best, "
      f"{np.median(times) * 1e3:.0f} median")
