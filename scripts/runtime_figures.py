"""Runtime figures: prefill and decode tokens/s, and compile times, for both real models in
both weight residencies, next to llama.cpp's (measured live with --llama-cpp, else peers.md's).

    .venv/bin/python scripts/runtime_figures.py [--models smollm2-135m-instruct gemma3-270m]
        [--residency dense quantized] [--prompt 512] [--steps 32] [--batch 8] [--llama-cpp]

Compiles go to a fresh temporary cache so compile times are cold ones.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

# llama.cpp 0.3.36, 2 threads, measured on this kind of machine (shared/reference/peers.md).
PEERS = {"smollm2-135m-instruct": ("220-300", "96-110"), "gemma3-270m": ("140-210", "55-71")}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def figures(name: str, residency: str, prompt_len: int, steps: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from woolly.model import Model
    from woolly.runtime import Runner, SamplingParams, entry

    model = Model.from_file(name)
    runner, load_s = timed(lambda: Runner(model, residency=residency, slots=batch, cache_length=prompt_len + 2 * steps))
    V, cfg = model.config.vocab_size, model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, prompt_len).tolist()
    block = lambda x: jax.block_until_ready(x)  # noqa: E731
    _, prefill_compile = timed(lambda: block(runner.prefill(prompt)))
    prefill_s = min(timed(lambda: block(runner.prefill(prompt)))[1] for _ in range(2))

    # Batch-1 decode, one jitted step per token from Python (what a streaming engine does).
    positions = [prompt_len] + [-1] * (batch - 1)
    tokens = [1] * batch
    one = Runner(model, residency=residency, slots=1, cache_length=prompt_len + 2 * steps, params=runner.params)
    one.prefill(prompt)
    _, step_compile = timed(lambda: block(one.decode([1], [prompt_len])))
    t = time.perf_counter()
    for i in range(steps):
        logits = one.decode([1], [prompt_len + 1 + i])
    block(logits)
    decode_tps = steps / (time.perf_counter() - t)

    # Whole completion in the on-device loop (batch 1, greedy), compile excluded.
    gen = lambda: one.generate([prompt[:16]], max_tokens=steps)  # noqa: E731
    _, loop_compile = timed(gen)
    loop_tps = steps / min(timed(gen)[1] for _ in range(2))

    # Batched decode: `batch` slots stepping together.
    for slot in range(batch):
        runner.prefill(prompt[:32], slot=slot)
    positions = [32] * batch
    block(runner.decode(tokens, positions))
    t = time.perf_counter()
    for i in range(steps):
        logits = runner.decode(tokens, [32 + 1 + i] * batch)
    block(logits)
    batch_tps = batch * steps / (time.perf_counter() - t)
    return dict(load_s=load_s, prefill_tps=prompt_len / prefill_s, decode_tps=decode_tps, loop_tps=loop_tps,
                batch_tps=batch_tps, prefill_compile_s=prefill_compile, step_compile_s=step_compile,
                loop_compile_s=loop_compile)


def llama_cpp_figures(name: str, prompt_len: int, steps: int) -> tuple[str, str]:
    from woolly.bench import import_llama_cpp   # plain CPU buffers: AMX/repacked ones segfault on this CPU
    from woolly.model_store import resolve_model_path

    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(resolve_model_path(name)), n_ctx=prompt_len + steps + 8, n_threads=2,
                          n_batch=512, verbose=False)
    prompt = np.random.default_rng(0).integers(10, 1000, prompt_len).tolist()
    llm.reset()
    _, s = timed(lambda: llm.eval(prompt))
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([5])
    return f"{prompt_len / s:.0f}", f"{steps / (time.perf_counter() - t):.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(PEERS))
    ap.add_argument("--residency", nargs="+", default=["dense", "quantized"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--llama-cpp", action="store_true", help="measure llama.cpp here instead of quoting peers.md")
    args = ap.parse_args()
    os.environ["WOOLLY_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="woolly-figures-")

    print(f"prompt {args.prompt} tokens, {args.steps} decode steps, batched decode at {args.batch} slots")
    head = (f"{'model':24} {'residency':10} {'load s':>6} {'prefill t/s':>11} {'decode t/s':>10} {'loop t/s':>8} "
            f"{'batch t/s':>9} {'compile s (prefill/step/loop)':>30}  llama.cpp prefill / decode t/s")
    print(head)
    for name in args.models:
        peer = llama_cpp_figures(name, args.prompt, args.steps) if args.llama_cpp else PEERS.get(name, ("?", "?"))
        for residency in args.residency:
            f = figures(name, residency, args.prompt, args.steps, args.batch)
            print(f"{name:24} {residency:10} {f['load_s']:6.1f} {f['prefill_tps']:11.0f} {f['decode_tps']:10.1f} "
                  f"{f['loop_tps']:8.1f} {f['batch_tps']:9.1f} "
                  f"{f['prefill_compile_s']:10.1f} /{f['step_compile_s']:5.1f} /{f['loop_compile_s']:5.1f}      "
                  f"{peer[0]} / {peer[1]}{'' if args.llama_cpp else ' (peers.md)'}", flush=True)


if __name__ == "__main__":
    main()
