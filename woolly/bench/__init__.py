"""`woolly bench`: measure Woolly (and, with `--compare llama-cpp`, llama.cpp) on one GGUF file.

One job: measure and report. Every figure of the two engines is taken in the same process
and the same run, interleaved repeat by repeat (Woolly, then llama.cpp, then the next
figure), and reported as the median of the repeats; ratios are Woolly / llama.cpp, so on a
shared, noisy machine the ratio is the figure to read.

Figures (keys of the JSON report, per engine):
- load_s: constructing the engine with the model (Woolly: `Engine.load_model`, no compile;
  llama.cpp: `Llama(...)`).
- ttft_cold_s / ttft_warm_s: first token of a short prompt in a *new process*, from just
  before the process is started until the child has the token; cold with an empty
  temporary WOOLLY_COMPILE_CACHE, warm with the same directory filled by the cold run.
  (llama.cpp has no compile cache: its cold and warm figures are both plain runs.)
- prefill_tps: prompt tokens / time to first token for a fresh n-token prompt (n = 128, 512);
  Woolly's includes its first decode step and sample, llama.cpp's is `eval` on a reset context.
- decode_tps: batch-1 tokens/s over `decode_tokens` (>= 128) steps after the first token,
  sampling included (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05 on both).
- aggregate_tps[N]: generated tokens / wall time for N concurrent sessions (Woolly: the
  Engine's continuous batching with max_batch_size 8; llama.cpp: N sequential runs, since
  llama-cpp-python serves one sequence at a time: the first N of 8 back-to-back runs).
- memory: process RSS and RssAnon after load minus before (the runtime already started),
  and the bytes JAX reports for live arrays (weights + KV cache); model_bytes is the RSS
  delta less the KV cache the engine allocates at load (the figure for the 2x-file target).
- decode_bound_fraction: decode_tps / (memory read bandwidth / GGUF weight bytes read per
  token); bandwidth is a numpy read of a large array, measured in the same run.

- llama_cpp_native (with --compare): llama.cpp's own batching, as llama-server's parallel slots
  drive it (`peer_llama_cpp.LlamaNative`): prefill_tps is one llama_decode per 512 prompt tokens,
  decode_tps one llama_decode per token, aggregate_tps[N] N sequences in one llama_batch per step
  (own seq_id and native sampler chain each); ratios_native are Woolly / these. The `llama_cpp`
  figures above are llama-cpp-python's Python loop (one sequence at a time), kept for continuity.
- grammar (Woolly only): batch-1 decode tokens/s unconstrained, under a JSON schema and under a
  regex (llguidance, `woolly.engine.grammar`) on one prompt, interleaved; each grammar's cost
  (1 - constrained / unconstrained) and the host's mask time per token; the target is a cost of
  at most 15% (grammar_cost, the worst of the two).
- kernels: which of Woolly's C++ CPU kernels ran (`--kernels xla`: none, the XLA-only fallback),
  their compile flags and the CPU's ISA; `--peer-lib DIR` loads llama.cpp from DIR/libllama.so.

Modules: `measure` (the run, Woolly's side, the machine, ratios and targets), `peer_llama_cpp`
(the peer, imported only when asked for; the runtime never imports it), `report` (tables, plots).
"""
from __future__ import annotations

import json

from woolly.bench.measure import (
    DEFAULT_LIMITS, LOAD_LIMITS, PEERS, SAMPLING, TARGETS, BenchConfig, WoollySide, load_average,
    memory_snapshot, prompt_ids, prompt_text, ratios, read_bandwidth, run, targets, ttft_new_process,
    weight_bytes_per_token)
from woolly.bench.peer_llama_cpp import LlamaSide, import_llama_cpp, new_llama, plain_cpu_buffers
from woolly.bench.report import format_text, markdown, plot, rows

# The package's public names (re-exported from its modules, as before the split), and its entry points.
__all__ = ["BenchConfig", "DEFAULT_LIMITS", "LOAD_LIMITS", "LlamaSide", "PEERS", "SAMPLING", "TARGETS", "WoollySide",
           "format_text", "import_llama_cpp", "load_average", "main", "markdown", "memory_snapshot", "new_llama",
           "plain_cpu_buffers", "plot", "prompt_ids", "prompt_text", "ratios", "read_bandwidth", "rows", "run",
           "targets", "ttft_new_process", "weight_bytes_per_token"]


def main(args) -> int:
    """`woolly bench` (argparse namespace from woolly.cli)."""
    kw = dict(model=args.model, residency=args.residency, threads=args.threads, compare=args.compare,
              kernels=getattr(args, "kernels", "native"), peer_lib=getattr(args, "peer_lib", None))
    cfg = BenchConfig.quick_config(**kw) if args.quick else BenchConfig(**kw)
    if args.repeats:
        cfg.repeats = args.repeats
    report = run(cfg)
    if args.plot:
        plot([report], args.plot)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_text(report), end="")
    return 0


def _summarize(argv: list[str]) -> int:
    """`python -m woolly.bench --summarize A.json B.json ... [--plot FILE.png]`: the README table."""
    plot_path = None
    if "--plot" in argv:
        i = argv.index("--plot")
        plot_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    reports = [json.load(open(p)) for p in argv]
    for r in reports:
        r["targets"] = targets(r)
    print(markdown(reports), end="")
    if plot_path:
        plot(reports, plot_path)
    return 0
