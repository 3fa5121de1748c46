"""Seconds to the first token of `woolly run MODEL "Hi" -n 1` in a new process.

    python benchmarks/first_token.py [MODEL] [--runs 3] [--cold] [--kv f16] [--prompt TEXT]
    python benchmarks/first_token.py [MODEL] --phases      # where one warm process spends it

Warm (default): the caches as they are (kernels in ~/.cache/woolly/kernels, compiled XLA
programs, traced entry points and executables in ~/.cache/woolly/jax, prepared weights in
~/.cache/woolly/weights); one untimed run fills them first.
--cold: each run gets empty WOOLLY_KERNEL_CACHE, WOOLLY_COMPILE_CACHE and WOOLLY_WEIGHTS_CACHE
directories, as on a first install. Reports, per run, the time to the first byte on stdout (the first token) and
to exit, the process's CPU seconds (user + system: less moved by other load on a shared
machine than wall time), and separately the time for a new process to `import woolly.cli`.
One JSON line. Run it from outside the repository (or with the checkout to measure first on
PYTHONPATH): `python -m` puts the current directory first on sys.path.

--phases: one warm process, in-process timestamps of each step of the run path (imports,
GGUF open, tokenizer, weight preparation, KV cache, the executables loaded in the background,
first token) and JAX's compile events (compile-cache hits, lowering and deserialization seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(seconds to the first stdout byte, seconds to exit, CPU seconds of the process)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {p.returncode}")
    return first, time.perf_counter() - t0, ru.ru_utime + ru.ru_stime


def phases(model: str, residency: str) -> None:
    """Timestamps of the run path in this process (caches warm: run the command once first)."""
    t0, c0 = time.perf_counter(), time.process_time()
    marks: list[tuple[str, float, float]] = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter(), time.process_time()))

    import woolly.cli  # noqa: F401
    mark("import woolly.cli")
    import collections

    import jax
    mark("import jax")
    count, secs = collections.Counter(), collections.defaultdict(float)
    jax.monitoring.register_event_listener(lambda e, **_: count.update([e]))

    def on_duration(e, d, **_):
        secs[e] += d
        count.update([e])
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    from woolly.engine import Engine, EngineConfig
    from woolly.model_file import Model
    from woolly.runtime import runner
    mark("import woolly.engine")
    m = Model.from_file(model)
    m.validate()
    mark("GGUF open + validate (a second copy, timed alone)")
    m.tokenizer  # noqa: B018
    mark("tokenizer (of that copy)")
    m.close()
    load_params, new_cache = runner.load_params, runner.Runner._new_cache

    def timed_load_params(*a, **k):
        mark("load_model up to load_params (open, validate)")
        out = jax.block_until_ready(load_params(*a, **k))
        mark("load_params (weights prepared and on device)")
        return out

    def timed_new_cache(self):
        out = jax.block_until_ready(new_cache(self))
        mark("KV cache")
        return out
    runner.load_params, runner.Runner._new_cache = timed_load_params, timed_new_cache
    from woolly.runtime import aot
    load_exe = aot._load_exe

    def timed_load_exe(path):   # in the background threads load_model starts (aot.EarlyLoad)
        out = load_exe(path)
        mark(f"  (background) executable loaded: {path.name.rsplit('-', 1)[0]}")
        return out
    aot._load_exe = timed_load_exe
    engine = Engine(EngineConfig(max_batch_size=1, max_sequence_length=2048, residency=residency))
    engine.load_model(model)
    mark("rest of load_model (tokenizer, scheduler)")
    it = engine.create_session().stream_sync("Hi", max_tokens=1)
    next(it)
    mark("first token (tokenize, trace/lookup, first step)")
    for _ in it:
        pass
    mark("end of the request")
    prev, prev_cpu = t0, c0
    print("  wall s   cpu s  (wall at)  phase  [cpu: this process's threads, all cores]")
    for name, t, c in marks:
        print(f"{t - prev:8.3f} {c - prev_cpu:7.3f}  ({t - t0:6.3f})  {name}")
        prev, prev_cpu = t, c
    for k in sorted(count):
        print(f"{count[k]:5d} {secs.get(k, 0.0):8.3f} s  {k}")
    from woolly.runtime import aot
    print("exported lowerings:", aot.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--residency", default="quantized", choices=("dense", "quantized"))
    ap.add_argument("--kv", default=None, choices=("f32", "f16", "bf16"), help="WOOLLY_KV_CACHE_TYPE for the runs")
    ap.add_argument("--phases", action="store_true", help="split one warm process's time (see the docstring)")
    ap.add_argument("--prompt", default="Hi", help="the prompt (default Hi: one token, no prefill; a longer one is "
                                                    "prefilled first, e.g. woolly bench's 14-token prompt)")
    a = ap.parse_args()
    env = dict(os.environ)
    if a.kv:
        env["WOOLLY_KV_CACHE_TYPE"] = a.kv
    if a.phases:
        os.environ.update(env)
        phases(a.model, a.residency)
        return
    cmd = [sys.executable, "-m", "woolly.cli", "run", a.model, a.prompt, "-n", "1", "--residency", a.residency]
    if not a.cold:
        _timed(cmd, env)   # fill the caches
    first, total, cpu = [], [], []
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory() as tmp:
            e = dict(env, WOOLLY_KERNEL_CACHE=os.path.join(tmp, "k"), WOOLLY_COMPILE_CACHE=os.path.join(tmp, "j"),
                     WOOLLY_WEIGHTS_CACHE=os.path.join(tmp, "w")) if a.cold else env
            f, t, c = _timed(cmd, e)
        first.append(round(f, 3))
        total.append(round(t, 3))
        cpu.append(round(c, 3))
    imp = [round(_timed([sys.executable, "-c", "import woolly.cli; print(1)"], env)[0], 3) for _ in range(a.runs)]

    def median(xs):
        return sorted(xs)[len(xs) // 2]
    print(json.dumps({"model": a.model, "residency": a.residency, "cold": a.cold, "kv": a.kv or "default", "prompt": a.prompt,
                      "first_token_s": first, "exit_s": total, "cpu_s": cpu, "import_woolly_cli_s": imp,
                      "median_first_token_s": median(first), "median_cpu_s": median(cpu),
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
