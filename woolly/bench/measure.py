"""Measuring: the run, Woolly's side, the machine, first token in a new process, ratios and targets."""
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

# The targets (2 CPU threads); load and warm first-token limits depend on the model.
TARGETS = {
    "decode_ratio": 1.0,            # decode batch-1, x llama.cpp
    "prefill_512_ratio": 2.0,       # prefill 512, x llama.cpp
    "aggregate_8_vs_peer_decode": 4.0,  # Woolly aggregate with 8 sessions, x llama.cpp batch-1 decode
    "memory_file_ratio": 2.0,       # quantized-resident RSS delta, x file size
    # issue 17, against llama.cpp's own batching (LlamaNative) rather than llama-cpp-python's loop
    "native_decode_ratio": 1.0,         # decode batch 1
    "native_prefill_512_ratio": 2.0,    # prefill 512 (one llama_decode of 512 tokens)
    "native_aggregate_8_ratio": 1.5,    # 8 sessions aggregate vs llama.cpp's 8-sequence batched decode
    # issue 16: constrained decoding costs at most 15% of unconstrained decode tokens/s
    "grammar_cost": 0.15,
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
    kernels: str = "native"          # "native": Woolly's C++ CPU kernels; "xla": the XLA-only fallback
    peer_lib: str | None = None      # a directory holding another libllama.so (LLAMA_CPP_LIB_PATH)
    grammar: bool = True             # constrained decoding's cost (needs llguidance; skipped without it)

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
    from woolly.model_file import Model

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


# Constrained decoding's cost: the same prompt decoded unconstrained, under a JSON schema and under
# a regex, none of which lets the generation end before max_tokens (a 1000-character string field;
# 400 or more letters), so each counts the same number of steps.
GRAMMAR_PROMPT = "Once upon a time, in a lighthouse by the sea, there lived"
GRAMMAR_KINDS = ("none", "json_schema", "regex")


def grammars() -> dict:
    """name -> woolly.engine.grammar.Grammar (None: unconstrained); {} without llguidance."""
    from woolly.engine import grammar

    if grammar.llguidance is None:
        return {}
    return {"none": None,
            "json_schema": grammar.Grammar.json_schema({"type": "object", "required": ["story"], "properties": {
                "story": {"type": "string", "minLength": 1000}}}),
            "regex": grammar.Grammar.regex(r"[A-Za-z ,.']{400,2000}")}


# -- Woolly ----------------------------------------------------------------------------------------------
class WoollySide:
    name = "woolly"

    def __init__(self, cfg: BenchConfig, path: str):
        self.cfg, self.path = cfg, path
        self.engine1 = self.engine8 = None
        self.memory: dict = {}

    def load(self) -> float:
        import jax

        import numpy as np

        from woolly.engine import CacheConfig, Engine, EngineConfig
        from woolly.runtime.cache import KV_CACHE_TYPES

        jax.devices()   # the runtime itself is up before "before"
        before = memory_snapshot()
        t0 = time.perf_counter()
        e = Engine(EngineConfig(max_batch_size=1, max_sequence_length=1024, residency=self.cfg.residency,
                                cache_config=CacheConfig(enabled=False)))
        e.load_model(self.path)
        dt = time.perf_counter() - t0
        after = memory_snapshot()
        cfg = e.model.config
        item = np.dtype(KV_CACHE_TYPES[e.config.kv_cache_type]).itemsize   # f16 by default, as llama.cpp
        kv = 2 * cfg.n_layers * 1 * cfg.n_kv_heads * 1024 * cfg.head_dim * item
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

    def grammar_decode(self, g, n: int, seed: int):
        """Batch-1 decode tokens/s of GRAMMAR_PROMPT under grammar g (None: unconstrained), over the
        steps after the first token, sampling as `decode` -> (tok/s, steps, the generated ids).
        An unconstrained completion cut short by an end-of-generation token is retried."""
        best = None
        for attempt in range(3):
            r = self._grammar_run(g, n + 1, seed + 1000 * attempt)
            steps = r.generated_tokens - 1
            if steps > 0 and (best is None or steps > best[1]):
                best = (steps / (r.generation_time - r.time_to_first_token), steps, r.token_ids)
            if steps >= n:
                break
        return best if best else (None, 0, [])

    def _grammar_run(self, g, max_tokens: int, seed: int):
        s = self.engine1.create_session()
        s.generate_sync(GRAMMAR_PROMPT, max_tokens=max_tokens, seed=seed, grammar=g, **SAMPLING)
        return s.last_result

    def grammar_warmup(self, gs: dict) -> None:
        """Compile the constrained step's shapes; build the vocabulary bridge."""
        for g in gs.values():
            self._grammar_run(g, 4, 0)


def mask_ms_per_token(tokenizer, g, token_ids: list[int]) -> dict:
    """The host's grammar work per token, replaying a constrained generation: the median ms to
    fill one mask row (`Matcher.fill`) and to take one token (`Matcher.advance`)."""
    import numpy as np

    from woolly.engine.grammar import Matcher, mask_words

    m = Matcher(g, tokenizer)
    row = np.zeros(mask_words(tokenizer.vocab_size), np.uint32)
    fill, advance = [], []
    for t in token_ids:
        t0 = time.perf_counter()
        m.fill(row)
        t1 = time.perf_counter()
        m.advance(t)
        advance.append(time.perf_counter() - t1)
        fill.append(t1 - t0)
    return {"fill_ms": 1000 * statistics.median(fill) if fill else None,
            "advance_ms": 1000 * statistics.median(advance) if advance else None}


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
        from woolly.bench.peer_llama_cpp import import_llama_cpp, new_llama

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
    grammar: dict = field(default_factory=dict)    # kind -> [(tok/s, steps, ids)]


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: BenchConfig) -> dict:
    """Measure everything; -> the JSON-able report."""
    from woolly.model_store import resolve_model_path

    if cfg.compare not in (None, *PEERS):
        from woolly.errors import InvalidRequest
        raise InvalidRequest(f"--compare takes one of {', '.join(PEERS)}")
    _select_builds(cfg)
    _pin_threads(cfg.threads)
    path = str(resolve_model_path(cfg.model))
    file_bytes = os.path.getsize(path)
    load_before = load_average()
    bandwidths = [read_bandwidth(cfg.threads)]
    bytes_per_token = weight_bytes_per_token(path)

    sides = [WoollySide(cfg, path)]
    if cfg.compare:
        from woolly.bench.peer_llama_cpp import LlamaSide

        sides.append(LlamaSide(cfg, path))
    got = {s.name: Collected() for s in sides}
    native = Collected()   # llama.cpp's own batching (LlamaNative), same weights as llama_cpp

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
    gs = grammars() if cfg.grammar else {}
    if gs:
        sides[0].grammar_warmup(gs)

    for r in range(cfg.repeats):
        _log(f"repeat {r + 1}/{cfg.repeats}")
        bandwidths.append(read_bandwidth(cfg.threads))
        for n in cfg.prefill_sizes:
            ids = prompt_ids(sides[0].tokenizer, n, seed=100 + r)
            for s in sides:
                _settle()
                got[s.name].prefill.setdefault(n, []).append(s.prefill(ids))
            if cfg.compare:
                _settle()
                native.prefill.setdefault(n, []).append(sides[1].native_prefill(ids))
        ids = prompt_ids(sides[0].tokenizer, 16, seed=200 + r)
        for s in sides:
            _settle()
            got[s.name].decode.append(s.decode(ids, cfg.decode_tokens, seed=r))
        if cfg.compare:
            _settle()
            native.decode.append(sides[1].native_decode(ids, cfg.decode_tokens, seed=r))
        if cfg.compare and cfg.threads > 1:
            _settle()
            got["llama_cpp"].decode_one_thread.append(sides[1].decode_one_thread(ids, cfg.decode_tokens // 2))
        for n in cfg.sessions:
            _settle()
            got["woolly"].aggregate.setdefault(n, []).append(sides[0].aggregate(n, cfg.aggregate_tokens, seed=r))
            if cfg.compare:
                _settle()
                native.aggregate.setdefault(n, []).append(sides[1].native_aggregate(n, cfg.aggregate_tokens, seed=r))
        if cfg.compare:
            _settle()
            for n, v in sides[1].aggregate_all(cfg.sessions, cfg.aggregate_tokens, seed=r).items():
                got["llama_cpp"].aggregate.setdefault(n, []).append(v)
        for kind, g in gs.items():   # interleaved kind by kind, so the machine's state falls on each alike
            _settle()
            got["woolly"].grammar.setdefault(kind, []).append(sides[0].grammar_decode(g, cfg.decode_tokens, seed=r))

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
        "kernels": kernels_report(cfg),
        "machine": {"cpus": os.cpu_count(), "cpu_isa": cpu_isa(), "load_average_before": load_before, "load_average_after": load_average(),
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
        nd = _median([d[0] for d in native.decode])
        report["llama_cpp_native"] = {
            "how": "llama-cpp-python's low-level API: one llama_decode per step over every sequence's token "
                   f"(n_seq_max {max(cfg.sessions)}, unified KV cache, n_batch = n_ubatch = 512, flash attention "
                   "auto), native sampler chains; prefill one llama_decode per 512 tokens",
            "prefill_tps": {str(n): _median(v) for n, v in native.prefill.items()},
            "decode_tps": nd,
            "decode_steps_counted": min((d[1] for d in native.decode), default=0),
            "aggregate_tps": {str(n): _median([a[0] for a in v]) for n, v in native.aggregate.items()},
            "decode_bound_fraction": nd / bound if nd else None,
            "samples": {"prefill_tps": {str(n): v for n, v in native.prefill.items()},
                        "decode_tps": [d[0] for d in native.decode],
                        "aggregate_tps": {str(n): [a[0] for a in v] for n, v in native.aggregate.items()}},
        }
        report["ratios_native"] = ratios_native(engines["woolly"], report["llama_cpp_native"])
    if gs:
        report["woolly"]["grammar"] = grammar_report(got["woolly"].grammar, gs, sides[0].tokenizer)
    report["targets"] = targets(report)
    if cfg.compare:
        sides[1].close()
    for s in sides:   # free the engines before the next model or process
        for attr in ("engine1", "engine8", "llm"):
            if getattr(s, attr, None) is not None:
                setattr(s, attr, None)
    return report


def grammar_report(runs: dict, gs: dict, tokenizer) -> dict:
    """Constrained decoding's figures: decode tok/s per kind (medians), each constrained kind's
    cost (1 - its tok/s / unconstrained tok/s, same run), and the host's mask work per token."""
    tps = {k: _median([x[0] for x in v]) for k, v in runs.items()}
    base = tps.get("none")
    cost = {k: (1 - v / base if v and base else None) for k, v in tps.items() if k != "none"}
    host = {k: mask_ms_per_token(tokenizer, gs[k], max((x[2] for x in v), key=len))
            for k, v in runs.items() if k != "none"}
    return {"prompt": GRAMMAR_PROMPT,
            "grammars": {k: (None if g is None else {"kind": g.kind, "source": g.source}) for k, g in gs.items()},
            "decode_tps": tps, "cost": cost,
            "worst_cost": max((c for c in cost.values() if c is not None), default=None),
            "host_ms_per_token": host,
            "decode_steps_counted": {k: min(x[1] for x in v) for k, v in runs.items()},
            "samples": {k: [x[0] for x in v] for k, v in runs.items()}}


def _select_builds(cfg: BenchConfig) -> None:
    """--kernels xla and --peer-lib: both set through the environment, so the first-token child
    processes get them too, and before the runtime or llama_cpp is imported."""
    from woolly.errors import InvalidRequest

    if cfg.kernels not in ("native", "xla"):
        raise InvalidRequest("--kernels takes native or xla")
    if cfg.kernels == "xla":
        os.environ["WOOLLY_QMATMUL_KERNEL"] = "0"   # woolly.ops.cpu_kernels: no C++ kernel is built or used
    if cfg.peer_lib:
        lib = os.path.abspath(cfg.peer_lib)
        if not os.path.isfile(os.path.join(lib, "libllama.so")):
            raise InvalidRequest(f"--peer-lib {cfg.peer_lib}: no libllama.so there")
        if "llama_cpp" in sys.modules and os.environ.get("LLAMA_CPP_LIB_PATH") != lib:
            raise InvalidRequest("--peer-lib must be chosen before llama_cpp is imported (a new process)")
        os.environ["LLAMA_CPP_LIB_PATH"] = lib


def cpu_isa() -> list[str]:
    """The CPU's vector features that decide which kernels and llama.cpp paths can run."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")
    return [x for x in wanted if x in flags]


def kernels_report(cfg: BenchConfig) -> dict:
    """Which of Woolly's CPU kernels this run used, and how they were compiled."""
    from woolly.ops import attention, cpu_kernels, qmatmul

    return {"mode": cfg.kernels, "qmatvec": bool(qmatmul.kernel_available()),
            "attention": bool(attention.kernel_available()), "isa": cpu_kernels.isa(),
            "compile_flags": " ".join(cpu_kernels.compile_flags()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "why_not": qmatmul.kernel_error(), "peer_lib": os.environ.get("LLAMA_CPP_LIB_PATH")}


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


def ratios_native(w: dict, n: dict) -> dict:
    """Woolly / llama.cpp's own batching (`llama_cpp_native`): > 1 is Woolly faster."""
    return {"decode_tps": _ratio(w["decode_tps"], n["decode_tps"]),
            "prefill_tps": {k: _ratio(w["prefill_tps"][k], n["prefill_tps"].get(k)) for k in w["prefill_tps"]},
            "aggregate_tps": {k: _ratio(w["aggregate_tps"][k], n["aggregate_tps"].get(k)) for k in w["aggregate_tps"]}}


def targets(report: dict) -> dict:
    """The issue's targets, each with the figure and whether it is met (None: not measured here)."""
    w, r, rn = report["woolly"], report.get("ratios"), report.get("ratios_native")
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
        # issue 17: against llama.cpp's own batching (the real peer), same run
        "native_decode_ratio": t(rn and rn["decode_tps"], TARGETS["native_decode_ratio"]),
        "native_prefill_512_ratio": t(rn and rn["prefill_tps"].get("512"), TARGETS["native_prefill_512_ratio"]),
        "native_aggregate_8_ratio": t(rn and rn["aggregate_tps"].get(big), TARGETS["native_aggregate_8_ratio"]),
        "load_s": t(w["load_s"], load_limit, higher_is_better=False),
        "ttft_warm_s": t(w["ttft_warm_s"], ttft_limit, higher_is_better=False),
        "memory_file_ratio": t(mem, TARGETS["memory_file_ratio"], higher_is_better=False,
                               applies=report["residency"] == "quantized"),
        # issue 16: the worse of the JSON-schema and regex costs (None: not measured, e.g. an old report)
        "grammar_cost": t((w.get("grammar") or {}).get("worst_cost"), TARGETS["grammar_cost"], higher_is_better=False),
    }
