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


TARGET_KEYS = {"decode_ratio", "prefill_512_ratio", "aggregate_8_vs_peer_decode", "load_s",
               "decode_ratio_vs_peer_best", "aggregate_8_vs_peer_best_decode", "ttft_warm_s", "memory_file_ratio",
               "native_decode_ratio", "native_prefill_512_ratio", "native_aggregate_8_ratio", "grammar_cost"}


def check_native_peer(r: dict) -> None:
    """llama.cpp's own batching ran in the same run, and every ratio against it is there."""
    n = r["llama_cpp_native"]
    assert n["decode_tps"] > 0 and n["decode_steps_counted"] > 0
    assert set(n["prefill_tps"]) == set(PREFILL) and all(v > 0 for v in n["prefill_tps"].values())
    assert set(n["aggregate_tps"]) == set(SESSIONS) and all(v > 0 for v in n["aggregate_tps"].values())
    rn = r["ratios_native"]
    assert rn["decode_tps"] > 0 and set(rn["prefill_tps"]) == set(PREFILL) and set(rn["aggregate_tps"]) == set(SESSIONS)
    for key in ("native_decode_ratio", "native_prefill_512_ratio", "native_aggregate_8_ratio"):
        assert r["targets"][key]["met"] in (True, False), key


def check_grammar_figure(g: dict) -> None:
    """Constrained decoding's cost: unconstrained, JSON-schema and regex decode on one prompt, each
    counting the same steps, the costs against unconstrained and the host's mask time."""
    assert set(g["decode_tps"]) == {"none", "json_schema", "regex"} and all(v > 0 for v in g["decode_tps"].values())
    assert set(g["cost"]) == {"json_schema", "regex"}
    for kind, cost in g["cost"].items():
        assert cost == pytest.approx(1 - g["decode_tps"][kind] / g["decode_tps"]["none"])
        assert g["host_ms_per_token"][kind]["fill_ms"] > 0
    assert g["worst_cost"] == max(g["cost"].values())
    steps = g["decode_steps_counted"]
    assert steps["json_schema"] == steps["regex"] > 0   # neither grammar lets the generation end early


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
    check_native_peer(r)
    check_grammar_figure(r["woolly"]["grammar"])
    assert set(r["targets"]) == TARGET_KEYS
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


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_models import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny.gguf", context_length=4096))


def test_grammar_cost_figure_on_a_tiny_model(tiny_gguf):
    """The constrained-decoding figure, its text rows and its target, on a tiny model (structure
    only, never speed)."""
    pytest.importorskip("llguidance")
    from woolly.bench import BenchConfig, WoollySide, format_text, targets
    from woolly.bench.measure import grammar_report, grammars

    side = WoollySide(BenchConfig(model=tiny_gguf), tiny_gguf)
    side.load()
    gs = grammars()
    side.grammar_warmup(gs)
    runs = {kind: [side.grammar_decode(g, 12, seed=r) for r in range(2)] for kind, g in gs.items()}
    g = grammar_report(runs, gs, side.tokenizer)
    check_grammar_figure(g)
    assert g["decode_steps_counted"]["json_schema"] == 12
    text = side.tokenizer.decode(runs["json_schema"][0][2])
    assert text.startswith('{"story": "'), text
    report = {"woolly": {"grammar": g, "memory": {"model_bytes": 1}, "load_s": 1.0, "ttft_warm_s": 1.0,
                         "decode_tps": 1.0, "aggregate_tps": {"8": 1.0}},
              "model": "tiny", "file_bytes": 1, "residency": "quantized", "settings": {"sessions": [8]}}
    t = targets(report)["grammar_cost"]
    assert t["target"] == 0.15 and t["value"] == g["worst_cost"] and t["met"] == (g["worst_cost"] <= 0.15)


@pytest.mark.oracle
def test_native_peer_batches_sequences_in_one_llama_batch(tiny_gguf):
    """llama.cpp's own batching (LlamaNative): 8 sequences decode together, each with its own
    seq_id and sampler; a 512-token prompt is one llama_decode. Structure only, never speed."""
    pytest.importorskip("llama_cpp")
    from woolly.bench import BenchConfig, LlamaSide, prompt_text

    side = LlamaSide(BenchConfig(model=tiny_gguf, compare="llama-cpp"), tiny_gguf)
    side.load()
    words = side.llm.tokenize(prompt_text(600, 1).encode(), add_bos=True)[:512]
    side.ttft_warmup(words)
    try:
        nat = side.native
        assert nat.n_seq_max == 8 and nat.n_batch == 512
        calls = []
        real_decode = nat.lib.llama_decode

        def counting(ctx, batch):
            calls.append((batch.n_tokens, sorted({batch.seq_id[i][0] for i in range(batch.n_tokens)})))
            return real_decode(ctx, batch)

        nat.lib.llama_decode = counting
        try:
            assert side.native_prefill(words) > 0
            assert calls == [(512, [0])]          # the whole prompt in one llama_decode
            calls.clear()
            rate, tokens = side.native_aggregate(8, 6, seed=0)
            assert rate > 0 and 8 <= tokens <= 48
            assert calls[0][1] == list(range(8))  # every prompt prefilled in one batch, one seq_id each
            assert calls[1][1] == list(range(8))  # then one token per live sequence per step
            assert all(n == len(seqs) for n, seqs in calls[1:])
            calls.clear()
            rate, steps = side.native_decode(words[:16], 8, seed=0)
            assert rate > 0 and 1 <= steps <= 8 and all(n == 1 for n, _ in calls[1:])
        finally:
            nat.lib.llama_decode = real_decode
    finally:
        side.close()


@pytest.mark.oracle
@pytest.mark.slow
def test_bench_tiny_model_xla_kernels_against_both_peers(tiny_gguf, tmp_path):
    """The whole `woolly bench --compare llama-cpp` on a tiny file with `--kernels xla`: Woolly ran
    without its C++ kernels, and both llama.cpp peers (the Python loop, its own batching) ran."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "r.json"
    p = subprocess.run(WOOLLY + ["bench", tiny_gguf, "--quick", "--compare", "llama-cpp", "--residency", "quantized",
                                 "--kernels", "xla", "-o", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["kernels"]["mode"] == "xla" and not r["kernels"]["qmatvec"] and not r["kernels"]["attention"]
    assert "WOOLLY_QMATMUL_KERNEL" in r["kernels"]["why_not"]
    check_engine_figures(r["woolly"], woolly=True)
    check_engine_figures(r["llama_cpp"], woolly=False)
    check_native_peer(r)
    check_grammar_figure(r["woolly"]["grammar"])
    assert set(r["targets"]) == TARGET_KEYS
    assert "llama.cpp 8 sequences in one llama_batch" in p.stdout and "sequential Python loop" in p.stdout


def test_bench_peer_lib_must_hold_libllama(tiny_gguf, tmp_path):
    p = subprocess.run(WOOLLY + ["bench", tiny_gguf, "--compare", "llama-cpp", "--peer-lib", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no libllama.so" in p.stderr and "Traceback" not in p.stderr
