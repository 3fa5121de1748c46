"""`woolly bench`: every figure is reported (and every ratio, with --compare). No timing assertions:
speed lives in the benchmark's numbers (benchmarks/README.md), not in tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WOOLLY = [sys.executable, "-m", "woolly.cli"]
SESSIONS = ("1", "2", "4", "8")
PREFILL = ("128", "512")


def check_engine_figures(e: dict, woolly: bool) -> None:
    for key in ("load_s", "ttft_cold_s", "ttft_warm_s", "decode_tps", "decode_bound_fraction"):
        assert isinstance(e[key], float) and e[key] > 0, key
    assert set(e["prefill_tps"]) == set(PREFILL) and all(v > 0 for v in e["prefill_tps"].values())
    assert set(e["aggregate_tps"]) == set(SESSIONS) and all(v > 0 for v in e["aggregate_tps"].values())
    assert e["decode_steps_counted"] > 0
    mem = e["memory"]
    assert mem["rss_bytes"] > 0 and "rss_anon_bytes" in mem
    if woolly:
        assert mem["device_bytes"] > 0 and mem["device_weight_bytes"] > 0 and mem["device_kv_cache_bytes"] > 0


@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.slow
def test_bench_json_has_every_figure_and_ratio(tmp_path):
    pytest.importorskip("llama_cpp")
    plot = tmp_path / "bench.png"
    p = subprocess.run(WOOLLY + ["bench", "smollm2-135m-instruct", "--json", "--quick", "--compare", "llama-cpp",
                                 "--residency", "quantized", "--plot", str(plot)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["quick"] and r["residency"] == "quantized" and r["threads"] == 2
    assert r["file_bytes"] > 0 and r["weight_bytes_per_token"] > 0 and r["decode_bound_tps"] > 0
    assert r["machine"]["read_bandwidth_bytes_per_s"] > 0
    check_engine_figures(r["woolly"], woolly=True)
    check_engine_figures(r["llama_cpp"], woolly=False)
    ratios = r["ratios"]
    for key in ("load_s", "ttft_cold_s", "ttft_warm_s", "decode_tps", "memory_rss", "memory_rss_anon"):
        assert ratios[key] > 0, key
    assert set(ratios["prefill_tps"]) == set(PREFILL) and all(v > 0 for v in ratios["prefill_tps"].values())
    for key in ("aggregate_tps", "aggregate_tps_vs_peer_decode"):
        assert set(ratios[key]) == set(SESSIONS) and all(v > 0 for v in ratios[key].values())
    assert set(r["targets"]) == {"decode_ratio", "prefill_512_ratio", "aggregate_8_vs_peer_decode", "load_s",
                                 "decode_ratio_vs_peer_best", "aggregate_8_vs_peer_best_decode",
                                 "ttft_warm_s", "memory_file_ratio"}
    assert all(t["met"] in (True, False) for t in r["targets"].values())
    assert plot.stat().st_size > 10_000

    from woolly.bench import format_text, markdown
    assert "decode batch 1" in format_text(r)
    assert markdown([r, r]).count("\n") > 10


def test_runtime_and_bench_module_do_not_import_the_peer():
    code = ("import sys, woolly.engine, woolly.runtime, woolly.bench, woolly.cli; "
            "sys.exit(1 if 'llama_cpp' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_bench_rejects_an_unknown_peer():
    p = subprocess.run(WOOLLY + ["bench", "smollm2-135m-instruct", "--compare", "ollama"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_read_bandwidth_is_positive():
    from woolly.bench import read_bandwidth

    assert read_bandwidth(threads=2, nbytes=8 << 20, repeats=2) > 1e8
