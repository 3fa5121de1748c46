"""Batch-1 decode step time with an f32 vs f16 KV cache, interleaved in one process.

    python benchmarks/kv_decode.py [MODEL] [--rounds 15]

SmolLM2 by default, quantized residency, one slot, a 2048-row cache (what `woolly run` uses),
the cache filled to 16 and to 1000 positions. Each round times 32 decode steps per cache type,
alternating, so both see the same machine state; prints median and min ms per step.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from woolly.model_file import Model
from woolly.runtime import Runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    m = Model.from_file(a.model)
    base = Runner(m, "quantized", slots=1, cache_length=2048, kv_cache_type="f32")
    runners = {"f32": base,
               "f16": Runner(m, "quantized", slots=1, cache_length=2048, params=base.params, kv_cache_type="f16")}
    ms: dict = {k: {} for k in runners}
    for ctx in (16, 1000):
        prompt = np.random.default_rng(0).integers(0, 1000, ctx).tolist()
        for r in runners.values():
            r.prefill(prompt, logits=False)
            jax.block_until_ready(r.decode([5], [ctx]))
        for _ in range(a.rounds):
            for k, r in runners.items():
                t = time.perf_counter()
                for i in range(32):
                    out = r.decode([5], [ctx + 1 + i])
                jax.block_until_ready(out)
                ms[k].setdefault(ctx, []).append((time.perf_counter() - t) / 32 * 1e3)
    print(json.dumps({k: {str(c): {"median_ms": round(float(np.median(v)), 2), "min_ms": round(min(v), 2)}
                          for c, v in d.items()} for k, d in ms.items()}))


if __name__ == "__main__":
    main()
