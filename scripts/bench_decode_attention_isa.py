"""SmolLM2 decode step CPU time per kernel build, single-threaded: how much of the AVX2 build's
decode step the attention kernel takes, before (`--old DIR`: another attention.cc) and after.

Child processes interleaved (WOOLLY_CPU_ISA per variant, XLA single-threaded, so the kernels run
on the calling thread and process time is the step's work): quantized residency, f16 KV cache
of 2048 rows, 1 and 8 slots, every slot at position `ctx` (16 and 1000), 16 timed steps each
(no prefill: a step's work does not depend on what the cache rows hold).
`--old DIR` must hold the other kernels' sources too (qmatvec.cc, the headers), else they fall
back to XLA there.

    python scripts/bench_decode_attention_isa.py [--rounds 3] [--old DIR]
"""
from __future__ import annotations

import argparse
import json

from isa_rounds import rounds

_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("WOOLLY_AOT", "0")
import numpy as np, jax
from woolly.ops import attention, cpu_kernels
kdir = sys.argv[1]
if kdir:
    cpu_kernels.KERNEL_DIR = kdir
attention.KERNEL_MIN_PARALLEL = 1 << 62
assert attention.kernel_available(), attention.kernel_error()
from woolly.model_file import Model
from woolly.model_store import resolve_model_path
from woolly.runtime import Runner
m = Model.from_file(str(resolve_model_path("smollm2-135m-instruct")))
params = None
res = {}
for slots in (1, 8):
    r = Runner(m, "quantized", slots=slots, cache_length=2048, params=params, kv_cache_type="f16")
    params = r.params
    for ctx in (16, 1000):
        jax.block_until_ready(r.decode([5] * slots, [ctx] * slots))
        t = time.process_time()
        for i in range(16):
            out = r.decode([5] * slots, [ctx + 1 + i] * slots)
        jax.block_until_ready(out)
        res[f"slots{slots}-ctx{ctx}"] = (time.process_time() - t) / 16 * 1e3
print(json.dumps({"isa": cpu_kernels.isa(), "ms": res}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old", default="", help="a kernels directory holding the 'before' attention.cc")
    a = ap.parse_args()
    variants = [("avx512", "auto", ""), ("avx2", "avx2", "")]
    if a.old:
        variants.insert(0, ("old-avx2", "avx2", a.old))
    med = rounds(_CHILD, [(name, isa, [kdir]) for name, isa, kdir in variants], a.rounds, "ms",
                 xla_flags="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    keys = list(med[variants[0][0]])
    names = [v[0] for v in variants]
    print("ms per step     " + "".join(f"{n:>10}" for n in names))
    for k in keys:
        print(f"{k:<16}" + "".join(f"{med[n][k]:>10.2f}" for n in names))
    print(json.dumps(med))


if __name__ == "__main__":
    main()
