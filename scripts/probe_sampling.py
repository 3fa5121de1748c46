"""Time sampling's blocked argmax and top-k against XLA's own over [8, V] logits (V = 262144,
Gemma-3's vocabulary; `--vocab` for another), best of 20, and check they agree.

    .venv/bin/python scripts/probe_sampling.py [--vocab 49152]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from woolly.runtime import device_sampling as sampling

ap = argparse.ArgumentParser()
ap.add_argument("--vocab", type=int, default=262144)
V = ap.parse_args().vocab
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, V)).astype(np.float32))
cases = {"argmax, blocked": jax.jit(sampling.argmax), "argmax, XLA": jax.jit(lambda x: jnp.argmax(x, -1)),
         "top-k 128, blocked": jax.jit(lambda x: sampling.top_k(x, 128)),
         "top-k 128, XLA": jax.jit(lambda x: jax.lax.top_k(x, 128))}
for name, f in cases.items():
    jax.block_until_ready(f(x))
    best = min((lambda t: (jax.block_until_ready(f(x)), time.perf_counter() - t)[1])(time.perf_counter())
               for _ in range(20))
    print(f"{name}: {best * 1e3:.2f} ms over [8, {V}]")
assert np.array_equal(sampling.argmax(x), jnp.argmax(x, -1))
assert all(np.array_equal(a, b) for a, b in zip(sampling.top_k(x, 128), jax.lax.top_k(x, 128)))
print("blocked results equal XLA's")
