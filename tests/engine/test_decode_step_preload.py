"""Engine.load_model starts loading the first request's executables (the decode step, a short
prompt's prefill) in the background (Runner `load_first_steps`): in a new process with warm caches
the first steps find them loaded from disk, not traced, and the text is the same as a process that
compiled them. From the second process on they start before the model file is even read
(`aot.EarlyLoad`, by the hints the first one left)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import write_tiny_model

CHILD = """
import concurrent.futures, json, sys
from woolly.engine import Engine, EngineConfig
from woolly.runtime import aot
engine = Engine(EngineConfig(max_batch_size=2, max_sequence_length=128))
engine.load_model({path!r})
runner = engine._runner
pending = [v for k, v in runner._executables.items() if k[0] == "decode_and_sample_packed"]
prefill = [(k, v) for k, v in runner._executables.items() if k[0] == "prefill"]
prefill_loaded = len(prefill) == 1 and prefill[0][1].result(timeout=300) is not None
started = len(pending) == 1 and isinstance(pending[0], concurrent.futures.Future)
loaded = pending[0].result(timeout=300) if started else None
text = "".join(engine.create_session().stream_sync("one two three", max_tokens=8, temperature=0.0))
after = [v for k, v in runner._executables.items() if k[0] == "decode_and_sample_packed"]
early = runner._early.entry("decode_and_sample_packed").result() if isinstance(runner._early, aot.EarlyLoad) else None
early_prefill = runner._early.entry("prefill").result() if isinstance(runner._early, aot.EarlyLoad) else None
prefill_after = runner._executables[prefill[0][0]] if prefill else None
print(json.dumps({{"started": started, "loaded": loaded is not None, "same": len(after) == 1 and after[0] is loaded,
                  "from_disk": aot.stats["executables_loaded"], "written": aot.stats["executables_written"],
                  "text": text, "early": early is not None and early[1] is loaded,
                  "prefill": prefill_loaded and not isinstance(prefill_after, concurrent.futures.Future),
                  "early_prefill": early_prefill is not None and early_prefill[1] is prefill_after}}))
engine.close()
"""


def test_the_decode_step_is_loaded_while_the_model_loads(tmp_path):
    path = write_tiny_model(tmp_path / "tiny.gguf")
    env = dict(os.environ, WOOLLY_COMPILE_CACHE=str(tmp_path / "jax-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", CHILD.format(path=str(path))], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    for r in runs:   # started at load, an executable, and the one the first step ran; the prompt's prefill too
        assert r["started"] and r["loaded"] and r["same"] and r["prefill"], r
    assert first["written"] >= 1                                   # a fresh cache: compiled and written
    assert second["written"] == 0 and second["from_disk"] >= 1    # warm: read back, nothing compiled
    # no hint yet; then loaded before the file was read
    assert not first["early"] and second["early"] and not first["early_prefill"] and second["early_prefill"]
    assert first["text"] == second["text"] and first["text"]
