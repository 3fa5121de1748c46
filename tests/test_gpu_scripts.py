"""The prepared GPU scripts stay runnable without a GPU: scripts/gpu_decode_check.py runs every
code path on CPU (hidden --allow-cpu, a tiny model, tiny settings) and reports every figure;
both it and scripts/gpu_pallas_check.py answer "no GPU" with exit 2 and one line. No timing
assertions: the figures mean something only on the device machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import write_tiny_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
DECODE = SCRIPTS / "gpu_decode_check.py"
PALLAS = SCRIPTS / "gpu_pallas_check.py"
CPU_ENV = dict(os.environ, JAX_PLATFORMS="cpu")   # "no GPU" even on a machine with one


def _run(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=CPU_ENV)


@pytest.mark.parametrize("script", [DECODE, PALLAS], ids=lambda p: p.name)
def test_no_gpu_exits_2_with_one_line(script):
    p = _run(script)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no GPU" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert p.stdout.strip() == ""


def test_missing_model_file_is_one_line(tmp_path):
    p = _run(DECODE, "--allow-cpu", "--models", str(tmp_path / "absent.gguf"))
    assert p.returncode == 3, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "absent.gguf" in lines[0] and "--weights synthetic" in lines[0], p.stderr


def test_decode_check_on_cpu_reports_every_figure(tmp_path):
    model = write_tiny_model(tmp_path / "tiny-llama.gguf", "llama", "Q4_1")
    out = tmp_path / "gpu-decode.json"
    p = _run(DECODE, "--allow-cpu", "--models", str(model), "--steps", "4", "--batches", "1,2",
             "--prefill", "16", "--bandwidth-mib", "8", "--output", str(out))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "jax.devices()" in p.stdout and "| tiny-llama | bf16 | decode b1 |" in p.stdout
    r = json.loads(out.read_text())
    assert r["backend"] == "cpu" and r["devices"] and r["versions"]["jax"] and r["complete"]
    bw = r["bandwidth"]
    assert bw["copy_bytes_per_s"] > 0 and bw["read_bytes_per_s"] > 0 and bw["spec_bytes_per_s"] == 4.8e12
    assert [(m["model"], m["mode"]) for m in r["results"]] == [("tiny-llama", "bf16"), ("tiny-llama", "quantized")]
    for m in r["results"]:
        assert "error" not in m, m
        assert m["load_s"] > 0 and m["weight_resident_bytes"] > 0
        assert m["kv_dtype"] == ("bfloat16" if m["mode"] == "bf16" else "float32")
        for kind in ("decode", "device_loop"):
            assert set(m[kind]) == {"1", "2"}, m
            for b, c in m[kind].items():
                assert c["batch"] == int(b) and c["steps"] == 4, c
                for key in ("tokens_per_s", "bytes_per_step", "weight_bytes_per_step", "kv_bytes_per_step",
                            "bound_tokens_per_s", "fraction_of_bound", "bound_tokens_per_s_spec",
                            "fraction_of_spec_bound", "fraction_of_bound_read_bw"):
                    assert isinstance(c[key], (int, float)) and c[key] > 0, (kind, b, key, c)
                assert c["weight_bytes_per_step"] == m["weight_resident_bytes"]   # tied embedding: all read
        assert m["decode"]["1"]["finite_logits"]
        assert set(m["prefill"]) == {"16"} and m["prefill"]["16"]["tokens_per_s"] > 0
    # bf16 weights are 2 bytes each: more resident bytes than 4-bit codes, fewer than f32
    bf16, quant = r["results"]
    n, total = map(int, quant["pallas_matrices"].split("/"))
    assert total == 2 * 7 + 1 and 0 <= n <= total   # 2 layers of 7 matrices + the tied embedding
    assert bf16["weight_resident_bytes"] > quant["weight_resident_bytes"]


def test_decode_check_budget_skips_cases(tmp_path):
    model = write_tiny_model(tmp_path / "tiny-llama.gguf", "llama", "Q8_0")
    out = tmp_path / "gpu-decode.json"
    p = _run(DECODE, "--allow-cpu", "--models", str(model), "--modes", "quantized", "--budget-s", "0",
             "--bandwidth-mib", "8", "--output", str(out))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (m,) = json.loads(out.read_text())["results"]
    assert m["error"] == "skipped: time budget spent"
