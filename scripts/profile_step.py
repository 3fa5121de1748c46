"""Where a step's time goes: a jax.profiler trace of Runner.decode (8 slots, `rows` live), of the
engine's step (`sample`: decode and sampling, each step chained on the last as the scheduler
does, llama.cpp's default sampling settings) or of Runner.prefill (`rows` tokens),
quantized-resident, summed per XLA operation kind and, for the C++ kernel calls (ffi_call.N),
per position within a layer (call order in the compiled module).

    .venv/bin/python scripts/profile_step.py smollm2-135m-instruct decode 8
    .venv/bin/python scripts/profile_step.py smollm2-135m-instruct sample 8
    .venv/bin/python scripts/profile_step.py gemma3-270m prefill 512

The trace slows everything somewhat; compare positions and kinds, not totals with other probes.
A `cond` (sampling's branches) is timed whole and again for each cond nested in it.
"""
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from woolly.model_file import Model
from woolly.runtime.runner import Runner

name, mode = sys.argv[1], sys.argv[2]
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 8
model = Model.from_file(name)
runner = Runner(model, "quantized", slots=8, cache_length=1024)
ids = list(np.random.default_rng(0).integers(100, 20000, 512))
if mode == "decode":
    for s in range(rows):
        runner.prefill(ids[:40], slot=s)
    positions, steps = [40] * rows + [-1] * (8 - rows), 40

    def run():
        return runner.decode([5] * 8, positions)
elif mode == "sample":
    B = runner.slots
    sampling = {"temperature": np.full(B, 0.8, np.float32), "top_p": np.full(B, 0.95, np.float32),
                "min_p": np.full(B, 0.05, np.float32), "repeat_penalty": np.ones(B, np.float32),
                "presence_penalty": np.zeros(B, np.float32), "frequency_penalty": np.zeros(B, np.float32),
                "top_k": np.full(B, 40, np.int32)}
    live = np.arange(B) < rows
    pending = [runner.dispatch_step(np.full(B, 5, np.int32), np.where(live, 10, -1).astype(np.int32),
                                    np.arange(B, dtype=np.uint32), np.zeros(B, np.int32), sampling,
                                    np.full((B, 256), -1, np.int32), np.zeros(B, np.int32), np.full(B, 1 << 20))]
    steps = 40

    def run():   # queue the next step, then read this one (Scheduler._step)
        nxt = runner.chain_step(pending[0])
        np.asarray(pending[0].tokens)
        pending[0] = nxt
        return nxt.tokens
else:
    steps = 4

    def run():
        return runner.prefill(ids[:rows])
for _ in range(3):
    jax.block_until_ready(run())
t = time.perf_counter()
for _ in range(steps):
    jax.block_until_ready(run())
print(f"{name} {mode} {rows}: {(time.perf_counter() - t) / steps * 1e3:.2f} ms per call (untraced)")
with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
        for _ in range(steps):
            jax.block_until_ready(run())
    events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "end:"))
       and "." in e["name"] or e.get("name", "").startswith("ffi_call")]
kind_total, kind_count = collections.Counter(), collections.Counter()
for e in ops:
    kind = e["name"].split(".")[0]
    kind_total[kind] += e["dur"]
    kind_count[kind] += 1
print("per call, by operation kind:")
for kind, us in kind_total.most_common(15):
    print(f"  {us / steps / 1e3:8.3f} ms  {kind_count[kind] / steps:6.1f} x  {kind}")
calls = collections.defaultdict(list)
for e in ops:
    if e["name"].startswith("ffi_call."):
        calls[int(e["name"].split(".")[1])].append(e["dur"])
ids_ = sorted(calls)
per_layer = len(ids_[:-1]) // model.config.n_layers if model.config.n_layers else 0
if per_layer:
    by_pos = collections.defaultdict(float)
    for i, k in enumerate(ids_[:-1]):
        by_pos[i % per_layer] += statistics.median(calls[k])
    print(f"kernel calls: {per_layer} per layer; summed over layers (ms):",
          {p: round(v / 1e3, 3) for p, v in sorted(by_pos.items())},
          f"; last call (output projection): {statistics.median(calls[ids_[-1]]) / 1e3:.3f} ms")
