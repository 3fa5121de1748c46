"""Decode step time through `Runner.decode` (quantized-resident, 8 slots, cache of 1024): steps
dispatched back to back, 7 blocks of 30, min and median per step. The A/B figures of
benchmarks/README.md's "What changed" 15 and 17:

    .venv/bin/python scripts/probe_decode.py smollm2-135m-instruct 8        # 8 live rows
    WOOLLY_KERNEL_SPIN_US=0 .venv/bin/python scripts/probe_decode.py ...     # XLA's pool only
    .venv/bin/python scripts/probe_decode.py smollm2-135m-instruct 8 --unfused   # separate q/k/v, gate/up

Interleave the variants (A, B, A, B): the machine's speed drifts by 10-20% within minutes.
"""
import os
import sys
import time

import jax
import numpy as np

from woolly.model_file import Model
from woolly.runtime import params as params_mod
from woolly.runtime.runner import Runner

args = [a for a in sys.argv[1:] if not a.startswith("--")]
name, rows = (args + ["smollm2-135m-instruct"])[0], int((args + ["", "8"])[1])
if "--unfused" in sys.argv:
    params_mod.FUSED = {}
model = Model.from_file(name)
runner = Runner(model, "quantized", slots=8, cache_length=1024)
ids = list(np.random.default_rng(0).integers(100, 20000, 64))
for s in range(rows):
    jax.block_until_ready(runner.prefill(ids[:40], slot=s))
positions = [40] * rows + [-1] * (8 - rows)
for _ in range(5):
    jax.block_until_ready(runner.decode([5] * 8, positions))
blocks = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(30):
        out = runner.decode([5] * 8, positions)
    jax.block_until_ready(out)
    blocks.append((time.perf_counter() - t) / 30 * 1e3)
blocks.sort()
print(f"{name} decode, {rows} live rows{' (unfused)' if '--unfused' in sys.argv else ''}, "
      f"WOOLLY_KERNEL_SPIN_US={os.environ.get('WOOLLY_KERNEL_SPIN_US', 'default')}: "
      f"min {blocks[0]:.2f} ms, median {blocks[3]:.2f} ms per step")
