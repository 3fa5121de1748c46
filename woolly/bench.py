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

The llama.cpp peer (`llama-cpp-python`, the `peer` extra) is imported only here, only when
asked for; the runtime never imports it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

PEERS = ("llama-cpp",)
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)

# The issue's targets (2 CPU threads); load and warm first-token limits depend on the model.
TARGETS = {
    "decode_ratio": 1.0,            # decode batch-1, x llama.cpp
    "prefill_512_ratio": 2.0,       # prefill 512, x llama.cpp
    "aggregate_8_vs_peer_decode": 4.0,  # Woolly aggregate with 8 sessions, x llama.cpp batch-1 decode
    "memory_file_ratio": 2.0,       # quantized-resident RSS delta, x file size
}
LOAD_LIMITS = {"smollm2-135m-instruct": (2.0, 3.0), "gemma3-270m": (3.0, 4.0)}   # (load s, warm ttft s)
DEFAULT_LIMITS = (2.0, 3.0)


@dataclass
class BenchConfig:
    model: str
    residency: str = "quantized"
    threads: int = 2
    compare: str | None = None
    repeats: int = 3
    prefill_sizes: tuple[int, ...] = (128, 512)
    decode_tokens: int = 128
    sessions: tuple[int, ...] = (1, 2, 4, 8)
    aggregate_tokens: int = 32
    ttft_warm_runs: int = 2
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "BenchConfig":
        """Every figure, reduced sizes: one repeat, short decodes (for tests, not for numbers)."""
        return cls(repeats=1, decode_tokens=16, aggregate_tokens=8, ttft_warm_runs=1, quick=True, **kw)


# -- machine --------------------------------------------------------------------------------------------
def proc_status(field_name: str) -> int:
    """A /proc/self/status memory field (VmRSS, RssAnon, ...) in bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_snapshot() -> dict:
    return {"rss": proc_status("VmRSS"), "rss_anon": proc_status("RssAnon")}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def read_bandwidth(threads: int = 2, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of `repeats` numpy sums of a large array,
    split over `threads` threads (numpy releases the GIL inside the reduction)."""
    import numpy as np

    a = np.ones(nbytes // 8, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        out = [0.0] * threads

        def work(i):
            out[i] = float(parts[i].sum())

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def weight_bytes_per_token(path: str) -> int:
    """GGUF bytes of the weights one batch-1 decode step reads: every matrix once, the output
    projection (the token embedding when tied) in full, one embedding row otherwise."""
    from woolly.model import Model

    m = Model.from_file(path)
    try:
        tensors = m.tensors
        total = 0
        tied = "output.weight" not in tensors
        for name, info in tensors.items():
            if name == "token_embd.weight" and not tied:
                total += info.nbytes // max(1, info.shape[0])
            else:
                total += info.nbytes
        return total
    finally:
        m.close()


# -- prompts ---------------------------------------------------------------------------------------------
_WORDS = ("the river under old stone bridges carried news of harvest and weather to every village "
          "along its banks while merchants counted coins and children chased geese across muddy "
          "fields in spring light a quiet library kept maps of distant mountains letters from "
          "sailors recipes for bread and long arguments about the nature of time").split()


def prompt_text(n_words: int, seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(_WORDS, n_words))


def prompt_ids(tokenizer, n: int, seed: int) -> list[int]:
    """Exactly n token ids of English-like text (fresh per seed, so no cache can hit)."""
    ids: list[int] = []
    words = n
    while len(ids) < n:
        ids = list(tokenizer.tokenize(prompt_text(words, seed), add_bos=False))
        words *= 2
    return ids[:n]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _settle():
    """Let the other engine's spinning worker threads go idle before the next timing."""
    time.sleep(0.1)


# -- Woolly ----------------------------------------------------------------------------------------------
class WoollySide:
    name = "woolly"

    def __init__(self, cfg: BenchConfig, path: str):
        self.cfg, self.path = cfg, path
        self.engine1 = self.engine8 = None
        self.memory: dict = {}

    def load(self) -> float:
        import jax

        from woolly.engine import CacheConfig, Engine, EngineConfig

        jax.devices()   # the runtime itself is up before "before"
        before = memory_snapshot()
        t0 = time.perf_counter()
        e = Engine(EngineConfig(max_batch_size=1, max_sequence_length=1024, residency=self.cfg.residency,
                                cache_config=CacheConfig(enabled=False)))
        e.load_model(self.path)
        dt = time.perf_counter() - t0
        after = memory_snapshot()
        cfg = e.model.config
        kv = 2 * cfg.n_layers * 1 * cfg.n_kv_heads * 1024 * cfg.head_dim * 4
        device = e.stats().device_memory
        self.memory = {"rss_bytes": after["rss"] - before["rss"],
                       "rss_anon_bytes": after["rss_anon"] - before["rss_anon"],
                       "device_bytes": device, "device_kv_cache_bytes": kv, "device_weight_bytes": device - kv,
                       "model_bytes": after["rss"] - before["rss"] - kv}   # RSS delta less the KV cache
        self.engine1 = e
        return dt

    def load_batched(self) -> None:
        from woolly.engine import CacheConfig, Engine, EngineConfig

        e = Engine(EngineConfig(max_batch_size=max(self.cfg.sessions), max_sequence_length=512,
                                residency=self.cfg.residency, cache_config=CacheConfig(enabled=False)))
        e.load_model(self.path)
        self.engine8 = e

    @property
    def tokenizer(self):
        return self.engine1.tokenizer

    def _first_token(self, ids: list[int], max_tokens: int, seed: int):
        s = self.engine1.create_session()
        s.generate_sync(ids, max_tokens=max_tokens, seed=seed, **SAMPLING)
        return s.last_result

    def prefill(self, ids: list[int]) -> float:
        r = self._first_token(ids, 1, 0)
        return len(ids) / r.time_to_first_token

    def decode(self, ids: list[int], n: int, seed: int) -> tuple[float, int]:
        """Batch-1 decode tokens/s over the steps after the first token -> (tok/s, steps counted).
        A completion cut short by an end-of-generation token is retried with another seed."""
        best = None
        for attempt in range(3):
            r = self._first_token(ids, n + 1, seed + 1000 * attempt)
            steps = r.generated_tokens - 1
            if steps > 0:
                rate = steps / (r.generation_time - r.time_to_first_token)
                if best is None or steps > best[1]:
                    best = (rate, steps)
            if steps >= n:
                break
        return best if best else (None, 0)

    def aggregate(self, n_sessions: int, n_tokens: int, seed: int) -> tuple[float, int]:
        prompts = [prompt_text(12, seed * 100 + i) for i in range(n_sessions)]
        t0 = time.perf_counter()
        results = self.engine8.generate_batch(prompts, max_tokens=n_tokens, seed=seed, **SAMPLING)
        dt = time.perf_counter() - t0
        total = sum(r.generated_tokens for r in results)
        return total / dt, total

    def ttft_warmup(self, ids: list[int]) -> None:
        """Compile (or load from the compile cache) every shape the timings use."""
        self._first_token(ids[:16], 2, 0)
        for n in self.cfg.prefill_sizes:
            self._first_token(ids[:n], 1, 0)
        # One prompt alone (its own prefill), then every slot at once (prompts admitted together
        # are prefilled in one pass): both admission paths compiled, every slot's rows touched.
        self.engine8.generate_batch([prompt_text(12, 0)], max_tokens=2, **SAMPLING)
        self.engine8.generate_batch([prompt_text(12, i) for i in range(max(self.cfg.sessions))], max_tokens=4,
                                    **SAMPLING)


# -- llama.cpp (llama-cpp-python) -------------------------------------------------------------------------
def plain_cpu_buffers(llama_cpp) -> None:
    """Load weights into plain CPU buffers (llama_model_params.use_extra_bufts = False).

    This machine's CPU reports AMX, and llama.cpp's AMX/repacked weight buffers segfault
    here on the first quantized matmul; `Llama()` has no option for it, so the default
    params it starts from are patched once (tests/oracle.py loads llama.cpp through here too).
    """
    import llama_cpp.llama as llama_module

    if getattr(llama_module.llama_cpp, "_woolly_plain_buffers", False):
        return
    default_params = llama_cpp.llama_model_default_params

    def plain_buffer_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_buffer_params
    llama_module.llama_cpp._woolly_plain_buffers = True


def import_llama_cpp():
    from woolly.errors import InvalidRequest

    try:
        import llama_cpp
    except ImportError:
        raise InvalidRequest("--compare llama-cpp needs llama-cpp-python: pip install 'woolly[peer]'") from None
    plain_cpu_buffers(llama_cpp)
    return llama_cpp


def new_llama(path: str, threads: int, n_ctx: int = 1024):
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False, seed=0)


class LlamaSide:
    name = "llama_cpp"

    def __init__(self, cfg: BenchConfig, path: str):
        self.cfg, self.path = cfg, path
        self.llm = None
        self.memory: dict = {}

    def load(self) -> float:
        import_llama_cpp()
        before = memory_snapshot()
        t0 = time.perf_counter()
        self.llm = new_llama(self.path, self.cfg.threads)
        dt = time.perf_counter() - t0
        after = memory_snapshot()
        self.memory = {"rss_bytes": after["rss"] - before["rss"],
                       "rss_anon_bytes": after["rss_anon"] - before["rss_anon"]}
        return dt

    def prefill(self, ids: list[int]) -> float:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    def _run(self, ids: list[int], n: int) -> tuple[float, float, int]:
        """-> (time of the first token, time of the last, tokens after the first)."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        t_first = None
        count = 0
        for _ in llm.generate(ids, top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"],
                              temp=SAMPLING["temperature"], repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            else:
                count += 1
            if count >= n:
                break
        return t_first - t0, time.perf_counter() - t0, count

    def decode(self, ids: list[int], n: int, seed: int) -> tuple[float, int]:
        first, last, count = self._run(ids, n)
        return count / (last - first), count

    def decode_one_thread(self, ids: list[int], n: int) -> float:
        """Decode with 1 thread instead of `threads`: on an oversubscribed machine llama.cpp's
        spinning thread barriers collapse, and this shows it (a contention check, not a figure)."""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        llama_cpp.llama_set_n_threads(ctx, 1, 1)
        try:
            first, last, count = self._run(ids, n)
        finally:
            llama_cpp.llama_set_n_threads(ctx, self.cfg.threads, self.cfg.threads)
        return count / (last - first)

    def aggregate_all(self, sessions: tuple[int, ...], n_tokens: int, seed: int) -> dict:
        """N sessions one after another (llama-cpp-python serves one sequence at a time): the
        first N of max(sessions) sequential runs are the N-session figure -> {N: (tok/s, tokens)}."""
        total, out = 0, {}
        t0 = time.perf_counter()
        for i in range(max(sessions)):
            ids = self.llm.tokenize(prompt_text(12, seed * 100 + i).encode(), add_bos=True)
            _, _, count = self._run(ids, n_tokens - 1)
            total += count + 1
            if i + 1 in sessions:
                out[i + 1] = (total / (time.perf_counter() - t0), total)
        return out

    def ttft_warmup(self, ids: list[int]) -> None:
        self.prefill(ids[:16])
        self._run(ids[:16], 2)


# -- first token in a new process ---------------------------------------------------------------------------
def _child(argv: list[str]) -> int:
    """`python -m woolly.bench --child {woolly|llama-cpp} MODEL RESIDENCY THREADS`: load, take one
    token of a short prompt, print the wall-clock time it arrived (and phases), exit at once."""
    t_start = time.time()
    kind, model, residency, threads = argv[0], argv[1], argv[2], int(argv[3])
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    cache_events = {"hits": 0, "misses": 0}
    if kind == "woolly":
        import jax

        from woolly.engine import CacheConfig, Engine, EngineConfig

        def count(event: str, **_):
            if event.startswith("/jax/compilation_cache/cache_"):
                cache_events[event.rsplit("_", 1)[-1]] = cache_events.get(event.rsplit("_", 1)[-1], 0) + 1

        def duration(event: str, secs: float, **_):
            key = {"/jax/compilation_cache/cache_retrieval_time_sec": "retrieval_s",
                   "/jax/core/compile/backend_compile_duration": "backend_compile_s"}.get(event)
            if key:
                cache_events[key] = cache_events.get(key, 0.0) + secs

        jax.monitoring.register_event_listener(count)
        jax.monitoring.register_event_duration_secs_listener(duration)
        t_import = time.time()
        e = Engine(EngineConfig(max_batch_size=1, max_sequence_length=1024, residency=residency,
                                cache_config=CacheConfig(enabled=False)))
        e.load_model(model)
        t_load = time.time()
        s = e.create_session()
        s.generate_sync(prompt, max_tokens=1, seed=0, **SAMPLING)
        t_first = time.time()
    else:
        llama_cpp = import_llama_cpp()  # noqa: F841
        t_import = time.time()
        llm = new_llama(model, threads)
        t_load = time.time()
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        next(iter(llm.generate(ids, top_k=40, top_p=0.95, min_p=0.05, temp=0.8)))
        t_first = time.time()
    print(json.dumps({"t_start": t_start, "t_first": t_first, "import_s": t_import - t_start,
                      "load_s": t_load - t_import, "first_token_s": t_first - t_load,
                      "compile_cache_hits": cache_events["hits"], "compile_cache_misses": cache_events["misses"],
                      "compile_cache_retrieval_s": cache_events.get("retrieval_s", 0.0),
                      "backend_compile_s": cache_events.get("backend_compile_s", 0.0)}),
          flush=True)
    os._exit(0)


def ttft_new_process(kind: str, path: str, residency: str, threads: int, cache_dir: str | None) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:
        env["WOOLLY_COMPILE_CACHE"] = cache_dir
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "woolly.bench", "--child", kind, path, residency, str(threads)],
                       env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"the {kind} first-token child failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["total_s"] = out["t_first"] - t0
    out["startup_s"] = out["t_start"] - t0
    return out


# -- the run ---------------------------------------------------------------------------------------------
@dataclass
class Collected:
    load_s: float | None = None
    ttft_cold: list = field(default_factory=list)
    ttft_warm: list = field(default_factory=list)
    prefill: dict = field(default_factory=dict)     # n -> [tok/s]
    decode: list = field(default_factory=list)      # [(tok/s, steps)]
    aggregate: dict = field(default_factory=dict)   # N -> [(tok/s, tokens)]
    decode_one_thread: list = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: BenchConfig) -> dict:
    """Measure everything; -> the JSON-able report."""
    from woolly.model_store import resolve_model_path

    if cfg.compare not in (None, *PEERS):
        from woolly.errors import InvalidRequest
        raise InvalidRequest(f"--compare takes one of {', '.join(PEERS)}")
    _pin_threads(cfg.threads)
    path = str(resolve_model_path(cfg.model))
    file_bytes = os.path.getsize(path)
    load_before = load_average()
    bandwidths = [read_bandwidth(cfg.threads)]
    bytes_per_token = weight_bytes_per_token(path)

    sides = [WoollySide(cfg, path)]
    if cfg.compare:
        sides.append(LlamaSide(cfg, path))
    got = {s.name: Collected() for s in sides}

    # first token in a new process: cold (empty compile cache), then warm (the same, filled)
    with tempfile.TemporaryDirectory(prefix="woolly-bench-cc-") as cache_dir:
        _log("first token in a new process, empty compile cache")
        got["woolly"].ttft_cold.append(ttft_new_process("woolly", path, cfg.residency, cfg.threads, cache_dir))
        for i in range(cfg.ttft_warm_runs):
            _log(f"first token in a new process, warm compile cache ({i + 1}/{cfg.ttft_warm_runs})")
            got["woolly"].ttft_warm.append(ttft_new_process("woolly", path, cfg.residency, cfg.threads, cache_dir))
            if cfg.compare:
                r = ttft_new_process("llama-cpp", path, cfg.residency, cfg.threads, None)
                (got["llama_cpp"].ttft_cold if i == 0 else got["llama_cpp"].ttft_warm).append(r)
        if cfg.compare and not got["llama_cpp"].ttft_warm:
            got["llama_cpp"].ttft_warm.append(ttft_new_process("llama-cpp", path, cfg.residency, cfg.threads, None))

    # load and memory (Woolly first, before llama.cpp maps the file)
    for s in sides:
        _log(f"load {s.name}")
        got[s.name].load_s = s.load()
    sides[0].load_batched()
    ids_long = prompt_ids(sides[0].tokenizer, max(cfg.prefill_sizes), seed=1)
    _log("warm-up (compiles, or loads from the compile cache)")
    for s in sides:
        s.ttft_warmup(ids_long)

    for r in range(cfg.repeats):
        _log(f"repeat {r + 1}/{cfg.repeats}")
        bandwidths.append(read_bandwidth(cfg.threads))
        for n in cfg.prefill_sizes:
            ids = prompt_ids(sides[0].tokenizer, n, seed=100 + r)
            for s in sides:
                _settle()
                got[s.name].prefill.setdefault(n, []).append(s.prefill(ids))
        ids = prompt_ids(sides[0].tokenizer, 16, seed=200 + r)
        for s in sides:
            _settle()
            got[s.name].decode.append(s.decode(ids, cfg.decode_tokens, seed=r))
        if cfg.compare and cfg.threads > 1:
            _settle()
            got["llama_cpp"].decode_one_thread.append(sides[1].decode_one_thread(ids, cfg.decode_tokens // 2))
        for n in cfg.sessions:
            _settle()
            got["woolly"].aggregate.setdefault(n, []).append(sides[0].aggregate(n, cfg.aggregate_tokens, seed=r))
        if cfg.compare:
            _settle()
            for n, v in sides[1].aggregate_all(cfg.sessions, cfg.aggregate_tokens, seed=r).items():
                got["llama_cpp"].aggregate.setdefault(n, []).append(v)

    bandwidth = max(bandwidths)
    bound = bandwidth / bytes_per_token
    engines = {}
    for s in sides:
        c = got[s.name]
        decode = _median([d[0] for d in c.decode])
        engines[s.name] = {
            "load_s": c.load_s,
            "ttft_cold_s": _median([t["total_s"] for t in c.ttft_cold]),
            "ttft_warm_s": _median([t["total_s"] for t in c.ttft_warm]),
            "ttft_phases_warm": c.ttft_warm[-1] if c.ttft_warm else None,
            "ttft_phases_cold": c.ttft_cold[-1] if c.ttft_cold else None,
            "prefill_tps": {str(n): _median(v) for n, v in c.prefill.items()},
            "decode_tps": decode,
            "decode_steps_counted": min((d[1] for d in c.decode), default=0),
            "aggregate_tps": {str(n): _median([a[0] for a in v]) for n, v in c.aggregate.items()},
            "decode_bound_fraction": decode / bound if decode else None,
            "aggregate_bound_fraction": {str(n): (_median([a[0] for a in v]) or 0) / bound
                                         for n, v in c.aggregate.items()},
            "memory": s.memory,
            "samples": {"prefill_tps": {str(n): v for n, v in c.prefill.items()},
                        "decode_tps": [d[0] for d in c.decode],
                        "aggregate_tps": {str(n): [a[0] for a in v] for n, v in c.aggregate.items()}},
        }
    report = {
        "model": cfg.model, "file": path, "file_bytes": file_bytes, "residency": cfg.residency,
        "threads": cfg.threads, "compare": cfg.compare, "quick": cfg.quick,
        "settings": {"repeats": cfg.repeats, "prefill_sizes": list(cfg.prefill_sizes),
                     "decode_tokens": cfg.decode_tokens, "sessions": list(cfg.sessions),
                     "aggregate_tokens": cfg.aggregate_tokens, "sampling": SAMPLING,
                     "woolly_engines": "batch-1 engine (max_sequence_length 1024) for load/prefill/decode; "
                                       f"max_batch_size {max(cfg.sessions)} engine (512) for aggregate"},
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
                    "read_bandwidth_bytes_per_s": bandwidth, "bandwidth_samples": bandwidths},
        "weight_bytes_per_token": bytes_per_token,
        "decode_bound_tps": bound,
        "woolly": engines["woolly"],
    }
    if cfg.compare:
        report["llama_cpp"] = engines["llama_cpp"]
        one = _median(got["llama_cpp"].decode_one_thread)
        report["llama_cpp"]["decode_tps_one_thread"] = one
        # llama.cpp faster on 1 thread than on `threads`: the CPUs are oversubscribed and its
        # spinning barriers stall, so every ratio below flatters Woolly. Rerun on a quieter machine.
        report["machine"]["peer_contention_bound"] = bool(one and engines["llama_cpp"]["decode_tps"]
                                                          and one > engines["llama_cpp"]["decode_tps"])
        report["ratios"] = ratios(engines["woolly"], engines["llama_cpp"])
    report["targets"] = targets(report)
    for s in sides:   # free the engines before the next model or process
        for attr in ("engine1", "engine8", "llm"):
            if getattr(s, attr, None) is not None:
                setattr(s, attr, None)
    return report


def _pin_threads(threads: int) -> None:
    """Fewer threads than CPUs: keep the whole process (both engines) on `threads` CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])
    except (AttributeError, OSError):
        pass


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(w: dict, l: dict) -> dict:
    """Woolly / llama.cpp for every figure (speeds: > 1 is Woolly faster; times and memory: < 1 is
    Woolly faster or smaller)."""
    out = {k: _ratio(w[k], l[k]) for k in ("load_s", "ttft_cold_s", "ttft_warm_s", "decode_tps")}
    out["prefill_tps"] = {n: _ratio(w["prefill_tps"][n], l["prefill_tps"].get(n)) for n in w["prefill_tps"]}
    out["aggregate_tps"] = {n: _ratio(w["aggregate_tps"][n], l["aggregate_tps"].get(n)) for n in w["aggregate_tps"]}
    out["aggregate_tps_vs_peer_decode"] = {n: _ratio(v, l["decode_tps"]) for n, v in w["aggregate_tps"].items()}
    out["memory_rss"] = _ratio(w["memory"]["rss_bytes"], l["memory"]["rss_bytes"])
    out["memory_rss_anon"] = _ratio(w["memory"]["rss_anon_bytes"], l["memory"]["rss_anon_bytes"])
    return out


def targets(report: dict) -> dict:
    """The issue's targets, each with the figure and whether it is met (None: not measured here)."""
    w, r = report["woolly"], report.get("ratios")
    load_limit, ttft_limit = LOAD_LIMITS.get(report["model"], DEFAULT_LIMITS)
    mem = w["memory"]["model_bytes"] / report["file_bytes"]

    def t(value, limit, higher_is_better=True, applies=True):
        if value is None or not applies:
            return {"value": value, "target": limit, "met": None}
        return {"value": value, "target": limit, "met": value >= limit if higher_is_better else value <= limit}

    big = str(max(report["settings"]["sessions"]))
    l = report.get("llama_cpp")
    # llama.cpp's best decode on this machine now: on an oversubscribed machine its 1-thread figure
    # beats its `threads` figure, and a target is judged against the stronger peer.
    best = max(filter(None, (l.get("decode_tps"), l.get("decode_tps_one_thread")))) if l else None
    return {
        "decode_ratio": t(r and r["decode_tps"], TARGETS["decode_ratio"]),
        "prefill_512_ratio": t(r and r["prefill_tps"].get("512"), TARGETS["prefill_512_ratio"]),
        "aggregate_8_vs_peer_decode": t(r and r["aggregate_tps_vs_peer_decode"].get(big),
                                        TARGETS["aggregate_8_vs_peer_decode"]),
        "decode_ratio_vs_peer_best": t(_ratio(w["decode_tps"], best), TARGETS["decode_ratio"]),
        "aggregate_8_vs_peer_best_decode": t(_ratio(w["aggregate_tps"].get(big), best),
                                             TARGETS["aggregate_8_vs_peer_decode"]),
        "load_s": t(w["load_s"], load_limit, higher_is_better=False),
        "ttft_warm_s": t(w["ttft_warm_s"], ttft_limit, higher_is_better=False),
        "memory_file_ratio": t(mem, TARGETS["memory_file_ratio"], higher_is_better=False,
                               applies=report["residency"] == "quantized"),
    }


# -- reporting -------------------------------------------------------------------------------------------
def _f(x, spec=".1f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, Woolly, llama.cpp, ratio) rows for the text table."""
    w, l, r = report["woolly"], report.get("llama_cpp"), report.get("ratios") or {}
    lv = (lambda *keys: _get(l, keys)) if l else (lambda *keys: None)
    mb = 1e6
    out = [
        ("load (s)", _f(w["load_s"], ".2f"), _f(lv("load_s"), ".2f"), _f(r.get("load_s"), ".2f", "x")),
        ("first token, new process, cold cache (s)", _f(w["ttft_cold_s"], ".2f"), _f(lv("ttft_cold_s"), ".2f"),
         _f(r.get("ttft_cold_s"), ".2f", "x")),
        ("first token, new process, warm cache (s)", _f(w["ttft_warm_s"], ".2f"), _f(lv("ttft_warm_s"), ".2f"),
         _f(r.get("ttft_warm_s"), ".2f", "x")),
    ]
    for n in w["prefill_tps"]:
        out.append((f"prefill {n} tokens (tok/s)", _f(w["prefill_tps"][n]), _f(lv("prefill_tps", n)),
                    _f(_get(r, ("prefill_tps", n)), ".2f", "x")))
    out.append(("decode batch 1 (tok/s)", _f(w["decode_tps"]), _f(lv("decode_tps")),
                _f(r.get("decode_tps"), ".2f", "x")))
    out.append(("  as fraction of bandwidth bound", _f(w["decode_bound_fraction"], ".2f"),
                _f(lv("decode_bound_fraction"), ".2f"), ""))
    if l and l.get("decode_tps_one_thread"):
        out.append(("  llama.cpp on 1 thread (contention check)", "", _f(l["decode_tps_one_thread"]), ""))
    for n in w["aggregate_tps"]:
        out.append((f"aggregate decode, {n} sessions (tok/s)", _f(w["aggregate_tps"][n]),
                    _f(lv("aggregate_tps", n)), _f(_get(r, ("aggregate_tps", n)), ".2f", "x")))
    big = str(max(int(n) for n in w["aggregate_tps"]))
    out.append((f"aggregate {big} sessions / peer batch-1 decode", "", "",
                _f(_get(r, ("aggregate_tps_vs_peer_decode", big)), ".2f", "x")))
    wm, lm = w["memory"], (l or {}).get("memory", {})
    out.append(("memory: RSS after load - before (MB)", _f(wm["rss_bytes"] / mb), _f(_div(lm.get("rss_bytes"), mb)),
                _f(r.get("memory_rss"), ".2f", "x")))
    out.append(("model memory: RSS delta - KV cache (MB)", _f(wm["model_bytes"] / mb), "", ""))
    out.append(("  as a multiple of the file size", _f(wm["model_bytes"] / report["file_bytes"], ".2f", "x"), "", ""))
    out.append(("memory: RssAnon after - before (MB)", _f(wm["rss_anon_bytes"] / mb),
                _f(_div(lm.get("rss_anon_bytes"), mb)), _f(r.get("memory_rss_anon"), ".2f", "x")))
    out.append(("memory: JAX live arrays, weights + KV (MB)",
                f"{wm['device_bytes'] / mb:.1f} ({wm['device_weight_bytes'] / mb:.1f} + "
                f"{wm['device_kv_cache_bytes'] / mb:.1f})", "", ""))
    return out


def _get(d, keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def _div(a, b):
    return None if a is None else a / b


def format_text(report: dict) -> str:
    m = report["machine"]
    head = (f"{report['model']} ({report['file_bytes'] / 1e6:.1f} MB), residency {report['residency']}, "
            f"{report['threads']} threads{', QUICK (reduced sizes)' if report['quick'] else ''}\n"
            f"memory read bandwidth {m['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, weights read per token "
            f"{report['weight_bytes_per_token'] / 1e6:.1f} MB -> decode bound {report['decode_bound_tps']:.0f} tok/s; "
            f"load average {m['load_average_before']} -> {m['load_average_after']}\n")
    table = rows(report)
    cols = ["figure", "woolly", "llama.cpp", "woolly/llama.cpp"] if report.get("llama_cpp") else ["figure", "woolly"]
    table = [r[:len(cols)] for r in table]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cols))]
    for r in table:
        lines.append("  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r)))
    if m.get("peer_contention_bound"):
        lines.append(f"WARNING: llama.cpp decodes faster on 1 thread ({report['llama_cpp']['decode_tps_one_thread']:.1f} "
                     f"tok/s) than on {report['threads']}: the machine is oversubscribed and the ratios flatter Woolly")
    tl = ["targets:"]
    for k, v in report["targets"].items():
        met = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        tl.append(f"  {k}: {_f(v['value'], '.2f')} (target {v['target']}) {met}")
    return head + "\n".join(lines) + "\n" + "\n".join(tl) + "\n"


def plot(reports: list[dict], path: str) -> None:
    """One row of panels per report: throughput vs llama.cpp, aggregate vs sessions, times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 3, figsize=(15, 3.8 * len(reports)), squeeze=False)
    for row, rep in zip(axes, reports):
        w, l = rep["woolly"], rep.get("llama_cpp")
        title = f"{rep['model']} · {rep['residency']}"
        labels = [f"prefill {n}" for n in w["prefill_tps"]] + ["decode b1"]
        wv = [w["prefill_tps"][n] or 0 for n in w["prefill_tps"]] + [w["decode_tps"] or 0]
        x = range(len(labels))
        ax = row[0]
        ax.bar([i - 0.2 for i in x], wv, 0.4, label="woolly")
        if l:
            lv_ = [l["prefill_tps"].get(n) or 0 for n in w["prefill_tps"]] + [l["decode_tps"] or 0]
            ax.bar([i + 0.2 for i in x], lv_, 0.4, label="llama.cpp")
            if l.get("decode_tps_one_thread"):
                ax.plot([len(labels) - 1 + 0.2], [l["decode_tps_one_thread"]], "k*", ms=12,
                        label="llama.cpp decode, 1 thread (contention check)")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax = row[1]
        ns = [int(n) for n in w["aggregate_tps"]]
        ax.plot(ns, [w["aggregate_tps"][str(n)] for n in ns], "o-", label="woolly (continuous batching)")
        if l:
            ax.plot(ns, [l["aggregate_tps"].get(str(n)) for n in ns], "s-", label="llama.cpp (sequential)")
            ax.axhline(4 * l["decode_tps"], ls=":", c="gray", label="target: 4x llama.cpp batch-1")
            if l.get("decode_tps_one_thread"):
                ax.axhline(4 * l["decode_tps_one_thread"], ls="-.", c="black",
                           label="4x llama.cpp batch-1 on 1 thread")
        ax.axhline(rep["decode_bound_tps"], ls="--", c="red", label="batch-1 bandwidth bound")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title("aggregate decode")
        ax.legend(fontsize=7)
        ax = row[2]
        tl = ["load", "1st token\ncold cache", "1st token\nwarm cache"]
        keys = ["load_s", "ttft_cold_s", "ttft_warm_s"]
        ax.bar([i - 0.2 for i in range(3)], [w[k] or 0 for k in keys], 0.4, label="woolly")
        if l:
            ax.bar([i + 0.2 for i in range(3)], [l[k] or 0 for k in keys], 0.4, label="llama.cpp")
        ax.set_xticks(range(3), tl)
        ax.set_ylabel("seconds (new process for 1st token)")
        ax.set_yscale("log")
        ax.set_title("startup")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(reports: list[dict]) -> str:
    """The benchmarks/README table: one column group per (model, residency)."""
    head = "| figure | " + " | ".join(f"{r['model']} {r['residency']}: woolly / llama.cpp / ratio"
                                      for r in reports) + " |"
    sep = "|---|" + "---|" * len(reports)
    table = [rows(r) for r in reports]
    lines = [head, sep]
    for i, first in enumerate(table[0]):
        cells = []
        for t in table:
            _, wv, lv_, rv = t[i]
            cells.append(" / ".join(x for x in (wv, lv_, rv) if x) or "")
        lines.append(f"| {first[0].strip()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """`woolly bench` (argparse namespace from woolly.cli)."""
    kw = dict(model=args.model, residency=args.residency, threads=args.threads, compare=args.compare)
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--summarize":
        sys.exit(_summarize(sys.argv[2:]))
    print("use `woolly bench`", file=sys.stderr)
    sys.exit(2)
