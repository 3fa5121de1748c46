"""Time the CPU qmatvec kernel built for each instruction set (cpu_kernels.isa) on SmolLM2's
weight shapes: a child process per build (the ISA is chosen once per process), run round-robin
so both see the same machine load. Each child times a jitted chain of N dependent `qm.linear`
calls on N distinct weights (as a decode step's matmuls) and prints the median us per call.

    PYTHONPATH=. .venv/bin/python scripts/probe_isa.py                 # avx512 vs avx2, rows 1 and 8
    PYTHONPATH=. .venv/bin/python scripts/probe_isa.py --rounds 5 --rows 1 8 64 600
"""
from __future__ import annotations

import argparse
import json

from isa_rounds import rounds

# (label, qtype, [O, I], copies in the chain)
SHAPES = [("gate 1536x576 Q4_1", "Q4_1", (1536, 576), 8), ("down 576x1536 Q4_1", "Q4_1", (576, 1536), 8),
          ("q 576x576 Q8_0", "Q8_0", (576, 576), 8), ("k 192x576 Q6_K", "Q6_K", (192, 576), 8),
          ("out 49152x576 Q8_0", "Q8_0", (49152, 576), 1)]

CHILD = r"""
import json, sys, time, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "tests")
from test_qmatmul import random_raw
from woolly.formats.quants import QuantizationType as Q
from woolly.ops import cpu_kernels, qmatmul as qm
shapes, rows_list, reps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
assert qm.kernel_available(), qm.kernel_error()
out = {}
for label, qt, (O, I), n in shapes:
    qt = Q[qt]
    ws = [qm.prepare_weight(random_raw(qt, (O, I), seed=i), qt, (O, I), "quantized") for i in range(n)]
    @jax.jit
    def chain(x, ws):
        for w in ws:
            y = qm.linear(x, w)
            x = x + 1e-6 * y[:, :1]
        return x
    for rows in rows_list:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, I)), jnp.float32)
        chain(x, ws).block_until_ready()
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); chain(x, ws).block_until_ready(); ts.append(time.perf_counter() - t)
        out[f"{label} R={rows}"] = 1e6 * float(np.median(ts)) / n
print(json.dumps({"isa": cpu_kernels.isa(), "us": out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--isas", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="+", help="labels' first words to keep (gate down q k out)")
    a = ap.parse_args()
    shapes = [s for s in SHAPES if not a.shapes or s[0].split()[0] in a.shapes]
    med = rounds(CHILD, [(isa, isa, [json.dumps(shapes), json.dumps(a.rows), str(a.reps)]) for isa in a.isas],
                 a.rounds, "us", timeout=1200)
    keys = list(med[a.isas[0]])
    print(f"{'us per call (median of rounds)':34}" + "".join(f"{i:>10}" for i in a.isas)
          + (f"{a.isas[1] + '/' + a.isas[0]:>14}" if len(a.isas) == 2 else ""))
    for k in keys:
        m = [med[i][k] for i in a.isas]
        print(f"{k:34}" + "".join(f"{x:10.1f}" for x in m) + (f"{m[1] / m[0]:14.2f}" if len(m) == 2 else ""))


if __name__ == "__main__":
    main()
