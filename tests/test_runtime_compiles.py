"""Compile counting: prompt lengths within a bucket and decode steps never recompile, and a second
process with the persistent compilation cache compiles nothing and traces no entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.model_file import Model
from woolly.runtime import Runner, SamplingParams, entry

# Every executable JAX builds or loads from the persistent cache; cache loads also record CACHE_HIT.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"
_compiles: list[str] = []


def _on_event(event: str, duration: float, **kw) -> None:
    if event == COMPILE_EVENT:
        _compiles.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def workload(runner: Runner, rng: np.random.Generator, prompt_lengths, decode_steps: int) -> None:
    """Prefill each prompt length into slot 0, decode `decode_steps` batched steps, sample, generate."""
    V = runner.cfg.vocab_size
    for n in prompt_lengths:
        runner.prefill(rng.integers(0, V, n).tolist(), slot=int(rng.integers(0, runner.slots)))
    positions = [17, 3]
    for _ in range(decode_steps):
        runner.decode(rng.integers(0, V, 2).tolist(), positions)
        positions = [positions[0] + 1, -1 if positions[1] < 0 else positions[1] + 1]
    sampling = SamplingParams.make(2, temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(1, 50)),
                                   top_p=float(rng.uniform(0.5, 1.0)))
    runner.generate([rng.integers(0, V, 5).tolist(), rng.integers(0, V, 9).tolist()],
                    max_tokens=[int(rng.integers(1, 16)), int(rng.integers(1, 16))], sampling=sampling,
                    stop_ids=[int(rng.integers(0, V))], seed=int(rng.integers(0, 1000)))


def test_no_recompiles_within_buckets(tmp_path):
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="gemma3", qtype="Q8_0"))
    runner = Runner(model, slots=2, cache_length=64, compile_cache=False)
    rng = np.random.default_rng(0)
    workload(runner, rng, prompt_lengths=[17, 20], decode_steps=2)       # warm up: 32-token bucket
    before = len(_compiles)
    sizes = (entry.prefill._cache_size(), entry.decode_step._cache_size(), entry.generate._cache_size())
    workload(runner, rng, prompt_lengths=range(17, 33), decode_steps=40)
    print(f"compiles after warm-up: {len(_compiles) - before}; executables per entry point {sizes}")
    assert len(_compiles) == before
    assert (entry.prefill._cache_size(), entry.decode_step._cache_size(), entry.generate._cache_size()) == sizes


CHILD = """
import json, sys, jax
events = []
jax.monitoring.register_event_duration_secs_listener(lambda e, d, **kw: events.append(e))
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
sys.path.insert(0, {tests!r})
import numpy as np
from test_runtime_compiles import workload
from woolly.model_file import Model
from woolly.runtime import Runner
runner = Runner(Model.from_file({path!r}), slots=2, cache_length=64)
workload(runner, np.random.default_rng(0), prompt_lengths=[17, 30], decode_steps=3)
import hashlib
probe = hashlib.sha256(np.asarray(runner.prefill(list(range(3, 20)), slot=1)).tobytes()).hexdigest()
from test_runtime_compiles import CACHE_HIT, COMPILE_EVENT
from woolly.runtime import aot
print(json.dumps([events.count(COMPILE_EVENT), events.count(CACHE_HIT), aot.stats["exported"], aot.stats["loaded"],
                  aot.stats["executables_loaded"], probe]))
"""


def test_second_process_compiles_nothing(tmp_path):
    path = write_tiny_model(tmp_path / "tiny.gguf", arch="llama", qtype="Q4_K")
    env = dict(os.environ, WOOLLY_COMPILE_CACHE=str(tmp_path / "jax-cache"))
    script = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    counts, lowerings, probes = [], [], []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        executables, loaded, exported, read_back, exe_read_back, probe = json.loads(out.stdout.strip().splitlines()[-1])
        probes.append(probe)   # prefill logits: a fresh compile's, then the deserialized executable's
        counts.append(executables - loaded)   # compiled, not loaded from the disk cache
        lowerings.append((exported, read_back, exe_read_back))
    print(f"XLA compiles: first process {counts[0]}, second process {counts[1]}; "
          f"entry-point lowerings (exported, read back): {lowerings}")
    assert counts[0] > 0 and counts[1] == 0
    # prefill, decode_step, generate: traced and exported by the first process only (aot.py);
    # the second reads each back, the runner's prefill as its whole executable (Runner._call)
    assert lowerings[0][0] >= 3 and lowerings[0][1] == 0 and lowerings[0][2] == 0
    assert lowerings[1][0] == 0 and lowerings[1][2] >= 1
    assert lowerings[1][1] + lowerings[1][2] == lowerings[0][0]
    assert probes[0] == probes[1]   # bit for bit
