"""The decode-attention kernel alone, per build: CPU µs per call on one thread (process time, so a
shared machine's other work counts less), child processes interleaved.

Shapes: SmolLM2's (N=9 query heads, K=3 kv heads, H=64), f16 cache, each slot's query at
position ctx-1 of a ctx-row cache, batch 1 and 8. Each variant is a child process with
WOOLLY_CPU_ISA set and the kernel built from a source directory (`--old DIR`: another
attention.cc, e.g. `git show REV:woolly/ops/kernels/attention.cc` with the headers beside it,
timed as `old-avx2`). The calls run in a jitted fori_loop (no dispatch in the time) on the
calling thread only (KERNEL_MIN_PARALLEL raised, XLA single-threaded).

    python scripts/bench_attention_isa.py [--rounds 5] [--old DIR] [--ctx 64,512,2048] [--batch 1,8]
"""
from __future__ import annotations

import argparse
import json

from isa_rounds import rounds

_CHILD = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax import lax
from woolly.ops import attention, cpu_kernels
kdir, ctxs, batches, reps = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
if kdir:
    cpu_kernels.KERNEL_DIR = kdir
attention.KERNEL_MIN_PARALLEL = 1 << 62
assert attention.kernel_available(), attention.kernel_error()
N, K, H = 9, 3, 64
rng = np.random.default_rng(0)
res = {}
for B in batches:
    for S in ctxs:
        q = jnp.asarray(rng.standard_normal((B, 1, N, H)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float16)
        v = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float16)
        pos = jnp.full((B, 1), S - 1, jnp.int32)
        n = max(8, min(2000, 400000 // (B * S)))
        def loop(q, k, v, pos):
            def body(i, qc):
                return qc + 1e-30 * attention._kernel_call(qc, k, v, pos, 0, 0.125)
            return lax.fori_loop(0, n, body, q)
        f = jax.jit(loop)
        f(q, k, v, pos).block_until_ready()
        best = []
        for _ in range(reps):
            t = time.process_time()
            f(q, k, v, pos).block_until_ready()
            best.append((time.process_time() - t) / n * 1e6)
        res[f"B{B}-ctx{S}"] = float(np.median(best))
print(json.dumps({"isa": cpu_kernels.isa(), "us": res}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--old", default="", help="a kernels directory holding the 'before' attention.cc")
    ap.add_argument("--ctx", default="64,512,2048")
    ap.add_argument("--batch", default="1,8")
    a = ap.parse_args()
    variants = [("avx512", "auto", ""), ("avx2", "avx2", "")]
    if a.old:
        variants.insert(0, ("old-avx2", "avx2", a.old))
    ctxs = json.dumps([int(x) for x in a.ctx.split(",")])
    batches = json.dumps([int(x) for x in a.batch.split(",")])
    med = rounds(_CHILD, [(name, isa, [kdir, ctxs, batches, str(a.reps)]) for name, isa, kdir in variants], a.rounds,
                 "us", xla_flags="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    keys = list(med[variants[0][0]])
    names = [v[0] for v in variants]
    print("shape        " + "".join(f"{n:>12}" for n in names) + "   avx2/avx512" + ("   old/avx2" if a.old else ""))
    for k in keys:
        row = f"{k:<13}" + "".join(f"{med[n][k]:>10.1f}us" for n in names)
        row += f"{med['avx2'][k] / med['avx512'][k]:>13.2f}x"
        if a.old:
            row += f"{med['old-avx2'][k] / med['avx2'][k]:>10.2f}x"
        print(row)
    print(json.dumps(med))


if __name__ == "__main__":
    main()
