"""Decode ms/step against the cache length: does decode attention read only the live rows?

SmolLM2 quantized, 19 prompt tokens (`--prompt`) prefilled into slot 0, then 30 timed one-token decode
steps (best of `--runs`), for cache lengths 256 and 1024, with 1 slot and with 8 slots of
which one is active (idle slots at position -1). With the decode-attention kernel the time
should not grow with the cache length or the idle slots; without it (the masked
jnp attention over the whole cache: `--no-attention-kernel`, or `--xla` for no C++ kernel
at all) it does.

    .venv/bin/python scripts/probe_attention.py [--model PATH] [--runs 3] [--lengths 256,1024]
        [--slots 1,8] [--no-attention-kernel | --xla | --paired ROUNDS] [--dtype f32|bf16|f16]

`--paired 10`: before and after in one process, alternating, for a machine shared with others.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

# Steady-state decode is what is timed; an ahead-of-time export cached on disk would also
# ignore --no-attention-kernel (a trace-time switch), so trace here.
os.environ.setdefault("WOOLLY_AOT", "0")

import jax
import jax.numpy as jnp
import numpy as np

from woolly.model_file import Model
from woolly.ops import attention, cpu_kernels
from woolly.runtime.cache import new_cache
from woolly.runtime.runner import Runner

PROMPT = 19   # tokens prefilled before the timed steps (--prompt)
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def time_decode(runner: Runner, slots: int, steps: int, runs: int) -> float:
    """Best-of-runs ms per decode step with slot 0 active from position PROMPT + 1."""
    best = float("inf")
    for r in range(runs):
        runner.cache = new_cache(runner.cfg, slots, runner.cache_length, runner.cache.k[0].dtype)
        runner.prefill(list(range(1, PROMPT + 1)), slot=0).block_until_ready()
        tokens = np.full(slots, 5, np.int32)
        positions = np.full(slots, -1, np.int32)
        positions[0] = PROMPT
        runner.decode(tokens, positions).block_until_ready()       # compile / warm
        t0 = time.perf_counter()
        for i in range(steps):
            positions[0] = PROMPT + 1 + i
            runner.decode(tokens, positions).block_until_ready()
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


def paired(runner: Runner, slots: int, steps: int, rounds: int) -> tuple[float, float]:
    """Before and after in one process: two decode steps, traced with the masked jnp attention
    and with the kernel, timed in alternating blocks of `steps` (so both see the same load on a
    shared machine) -> best block's ms/step for (jnp, kernel)."""
    from woolly.runtime import entry

    fns, caches = [], []
    for use in (False, True):
        attention.USE_KERNEL = use
        f = jax.jit(lambda p, c, t, q: entry.decode_logits(p, c, t, q, runner.cfg), donate_argnums=(1,))
        cache = new_cache(runner.cfg, slots, runner.cache_length, runner.cache.k[0].dtype)
        runner.cache = cache
        runner.prefill(list(range(1, PROMPT + 1)), slot=0).block_until_ready()
        tokens = jnp.full((slots,), 5, jnp.int32)
        positions = np.full(slots, -1, np.int32)
        positions[0] = PROMPT
        out, cache = f(runner.params, runner.cache, tokens, jnp.asarray(positions))   # trace now, with `use`
        out.block_until_ready()
        fns.append(f)
        caches.append(cache)
    attention.USE_KERNEL = True
    best = [float("inf"), float("inf")]
    for r in range(rounds):
        for v in (0, 1):
            positions = np.full(slots, -1, np.int32)
            t0 = time.perf_counter()
            for i in range(steps):
                positions[0] = PROMPT + 1 + i
                out, caches[v] = fns[v](runner.params, caches[v], tokens, jnp.asarray(positions))
                out.block_until_ready()
            best[v] = min(best[v], (time.perf_counter() - t0) / steps * 1e3)
    return best[0], best[1]


def main() -> None:
    global PROMPT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/woolly/models/smollm2-135m-instruct.gguf"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--xla", action="store_true", help="trace without the C++ kernels (matmul ones too)")
    ap.add_argument("--no-attention-kernel", action="store_true",
                    help="decode attention through the masked jnp attend (the matmul kernel stays)")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="time jnp attention and the kernel in one process, alternating blocks, ROUNDS rounds")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="tokens prefilled into slot 0 first")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    args = ap.parse_args()
    PROMPT = args.prompt
    if args.no_attention_kernel:
        attention.USE_KERNEL = False
    model = Model.from_file(args.model)
    params = None
    ctx = cpu_kernels.xla_only() if args.xla else contextlib.nullcontext()
    print(f"{os.path.basename(args.model)}  quantized  kv={args.dtype}  {'xla only' if args.xla else 'kernels'}"
          f"  attention: {'jnp' if args.xla or args.no_attention_kernel else 'kernel'}"
          f"  jax {jax.__version__}")
    with ctx:
        for slots in (int(s) for s in args.slots.split(",")):
            for S in (int(s) for s in args.lengths.split(",")):
                runner = Runner(model, residency="quantized", slots=slots, cache_length=S, params=params)
                params = runner.params
                runner.cache = new_cache(runner.cfg, slots, runner.cache_length, DTYPES[args.dtype])
                if args.paired:
                    before, after = paired(runner, slots, args.steps, args.paired)
                    print(f"slots={slots} (1 active)  S={S:5d}  jnp {before:6.2f}  kernel {after:6.2f} ms/step"
                          f"  ({before / after:.2f}x)", flush=True)
                    continue
                ms = time_decode(runner, slots, args.steps, args.runs)
                print(f"slots={slots} (1 active)  S={S:5d}  {ms:6.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
