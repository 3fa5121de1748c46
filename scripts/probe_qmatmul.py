"""Time each candidate weight-matmul formulation on SmolLM2 and Gemma weight shapes.

For every weight shape of a model (real GGUF bytes, layer i's tensor for copy i) and every
row count, each candidate multiplies x [rows, I] by 30 distinct copies of the weight in a
dependent chain (x_{i+1} = x_i + 1e-6 * y_i[:, :1], as a decode step's matmuls depend on each
other), all in one jitted function. Candidates are timed round-robin in the same run and
reported as the median ms per 30 layers and as GB/s of resident weight bytes read. The
output projection ([V, D], once per step) is timed with one copy. A last section times all
of one decode step's matmuls (7 per layer and the output) through the shipped
`woolly.ops.qmatmul.linear`, for both residencies.

    .venv/bin/python scripts/probe_qmatmul.py                   # both models, rows 1, 8, 128
    .venv/bin/python scripts/probe_qmatmul.py --models smollm2 --rows 1 --reps 15

The machine is shared: read the numbers as ratios between candidates of one cell (the
minimum over repetitions is the least disturbed by other processes; GB/s uses it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from woolly.formats.quants import QuantizationType, decode_blocks, dequantize  # noqa: E402
from woolly.model_file import Model  # noqa: E402
from woolly.ops import qmatmul as qm  # noqa: E402

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma3-270m"}
# (label, tensor suffix under blk.{i}., matmuls of this shape per layer)
LAYER_SHAPES = {
    "smollm2": [("q/o 576x576", "attn_q.weight", 2), ("k/v 192x576", "attn_k.weight", 2),
                ("gate/up 1536x576", "ffn_gate.weight", 2), ("down 576x1536", "ffn_down.weight", 1)],
    "gemma": [("q 1024x640", "attn_q.weight", 1), ("k/v 256x640", "attn_k.weight", 2),
              ("o 640x1024", "attn_output.weight", 1), ("gate/up 2048x640", "ffn_gate.weight", 2),
              ("down 640x2048", "ffn_down.weight", 1)],
}
STEP_TENSORS = {
    "smollm2": ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
    "gemma": ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
}

ob = jax.lax.optimization_barrier


# -- candidates: prep(raw, qtype, shape) -> pytree of device arrays; apply(x, w) -> y --------

def _affine(raw, qtype, shape):
    O, I = shape
    q, s, b = decode_blocks(np.ascontiguousarray(raw).reshape(-1, qtype.type_size), qtype)
    sub = q.shape[1] // s.shape[1]
    return q.reshape(O, I), s.reshape(O, I // sub), None if b is None else b.reshape(O, I // sub), sub


def prep_dense(raw, qtype, shape):
    return jnp.asarray(dequantize(raw, qtype, shape))


def prep_i8(raw, qtype, shape):
    q, s, b, sub = _affine(raw, qtype, shape)
    return qm.QuantizedWeight(jnp.asarray(q), jnp.asarray(s), None if b is None else jnp.asarray(b), "i8", sub, 0)


def prep_shipped(raw, qtype, shape):
    return qm.prepare_weight(raw, qtype, shape, "quantized")


def xla_dot(x, w):
    if isinstance(w, qm.QuantizedWeight):
        w = w.dequantize()
    return x @ w.T


def xla_dot_barrier(x, w):
    return ob(xla_dot(x, w))


def xla_blocked(x, w):
    """Scale after a blocked dot: y = sum_b s[o,b] * (q[o,b,:] . x[b,:]) (+ bias[o,b] * sum x[b,:])."""
    R, I = x.shape
    O, sub = w.shape[0], w.sub
    c = w.codes().reshape(O, I // sub, sub).astype(jnp.float32)
    xb = x.reshape(R, I // sub, sub)
    p = jnp.einsum("rbj,obj->rob", xb, c)
    y = jnp.einsum("rob,ob->ro", p, w.scale)
    if w.bias is not None:
        y = y + xb.sum(-1) @ w.bias.T
    return y


def xla_reduce(x, w):
    """One fused multiply-reduce over dequantized codes (no dot)."""
    R, I = x.shape
    O, sub = w.shape[0], w.sub
    wd = w.dequantize()
    return jnp.sum(wd[None] * x[:, None, :], axis=-1)


def kernel(x, w):
    return qm._kernel_call(x, w)


def kernel_deq_dot(x, w):
    return x @ qm._kernel_dequantize(w).T


CANDIDATES = {
    # name: (prep, apply, needs kernel)
    "f32 dense, XLA x@W.T": (prep_dense, xla_dot, False),
    "f32 dense, XLA +barrier": (prep_dense, xla_dot_barrier, False),
    "f32 dense, kernel": (prep_dense, kernel, True),
    "int8, XLA deq+dot": (prep_i8, xla_dot, False),
    "int8, XLA deq+dot +barrier": (prep_i8, xla_dot_barrier, False),
    "int8, XLA blocked scale-after": (prep_i8, xla_blocked, False),
    "int8, XLA mul+reduce": (prep_i8, xla_reduce, False),
    "shipped layout, XLA deq+dot +barrier": (prep_shipped, xla_dot_barrier, False),
    "int8, kernel": (prep_i8, kernel, True),
    "shipped layout, kernel": (prep_shipped, kernel, True),
    "shipped layout, kernel dequant + XLA dot": (prep_shipped, kernel_deq_dot, True),
    "shipped linear()": (prep_shipped, qm.linear, False),
}


def chain(apply, n):
    def f(x, ws):
        for i in range(n):
            y = apply(x, ws[i])
            x = x + 1e-6 * y[:, :1]
        return x
    return jax.jit(f)


def time_round_robin(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for k, (f, args) in fns.items():
        jax.block_until_ready(f(*args))
    for _ in range(reps):
        for k, (f, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t)
    return {k: (float(np.median(v)) * 1e3, float(np.min(v)) * 1e3) for k, v in times.items()}


def probe_cell(m: Model, tensors: list[str], rows: int, reps: int, cands: list[str], label: str):
    shape = tuple(m.tensors[tensors[0]].shape)
    qnames = "/".join(sorted({m.tensors[t].qtype.name for t in tensors}))
    n = len(tensors)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, shape[1])).astype(np.float32))
    fns, nbytes = {}, {}
    for name in cands:
        prep, apply, needs_kernel = CANDIDATES[name]
        if needs_kernel and not qm.kernel_available():
            continue
        if name in ("int8, XLA mul+reduce", "int8, XLA blocked scale-after") and (rows > 8 or shape[0] > 65536):
            continue  # 10-100x slower than the rest wherever measured: skip where it would take minutes
        ws = [prep(m.raw(t), m.tensors[t].qtype, shape) for t in tensors]
        nbytes[name] = qm.resident_nbytes(ws) / n
        fns[name] = (chain(apply, n), (x, ws))
    ms = time_round_robin(fns, reps)
    for name in fns:
        med, lo = ms[name]
        gbs = n * nbytes[name] / (lo * 1e-3) / 1e9
        print(f"| {label} | {qnames} | {rows} | {name} | {med:.2f} | {lo:.2f} | {gbs:.1f} |", flush=True)
    fns.clear()


def probe_step(m: Model, key: str, rows: int, reps: int):
    """All matmuls of one decode step through the shipped linear(), both residencies."""
    cfg_layers = sum(1 for t in m.tensors if t.endswith("attn_q.weight"))
    names = [f"blk.{i}.{s}.weight" for i in range(cfg_layers) for s in STEP_TENSORS[key]]
    out = "output.weight" if "output.weight" in m.tensors else "token_embd.weight"
    names.append(out)
    D = m.tensors[names[0]].shape[1]
    fns = {}
    for residency in qm.RESIDENCIES:
        ws = [qm.prepare_weight(m.raw(t), m.tensors[t].qtype, tuple(m.tensors[t].shape), residency) for t in names]

        def f(x, ws):
            h = x
            for w in ws:
                y = qm.linear(h if w.shape[1] == D else jnp.broadcast_to(h[:, :1], (h.shape[0], w.shape[1])), w)
                h = h + 1e-6 * y[:, :1]
            return h
        x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, D)).astype(np.float32))
        fns[residency] = (jax.jit(f), (x, ws))
        fns[residency + " bytes"] = qm.resident_nbytes(ws)
    ms = time_round_robin({k: v for k, v in fns.items() if not k.endswith("bytes")}, reps)
    for residency in qm.RESIDENCIES:
        b = fns[residency + " bytes"]
        med, t = ms[residency]
        print(f"| {key} step matmuls | rows {rows} | {residency} | median {med:.2f} ms, min {t:.2f} ms | "
              f"{b / t / 1e6:.1f} GB/s | {1000 / t * rows:.0f} tok/s if matmuls were all |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma")
    ap.add_argument("--rows", default="1,8,128")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=30, help="copies per shape (the 30-layer equivalent)")
    ap.add_argument("--candidates", default="", help="comma-separated substrings of candidate names")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape labels")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--no-output", action="store_true")
    a = ap.parse_args()
    cands = [c for c in CANDIDATES if not a.candidates or any(s in c for s in a.candidates.split(","))]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, kernel {qm.kernel_available()} "
          f"{qm.kernel_error() or ''}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows_list = [int(r) for r in a.rows.split(",")]
    for key in a.models.split(","):
        m = Model.from_file(MODELS[key])
        n_layers = sum(1 for t in m.tensors if t.endswith("attn_q.weight"))
        print(f"\n## {MODELS[key]}: ms per {a.layers} dependent matmuls (a {a.layers}-layer equivalent)\n")
        print("| shape | type | rows | candidate | median ms | min ms | GB/s (at min) |\n|---|---|---|---|---|---|---|")
        for label, suffix, _ in LAYER_SHAPES[key]:
            if a.shapes and not any(t in label for t in a.shapes.split(",")):
                continue
            tensors = [f"blk.{i % n_layers}.{suffix}" for i in range(a.layers)]
            for rows in rows_list:
                probe_cell(m, tensors, rows, a.reps, cands, label)
        if not a.no_output:
            out = "output.weight" if "output.weight" in m.tensors else "token_embd.weight"
            V, D = m.tensors[out].shape
            for rows in rows_list:
                probe_cell(m, [out], rows, a.reps, cands, f"output {V}x{D} (x1)")
        if not a.no_step:
            print(f"\n## {MODELS[key]}: every matmul of one decode step via linear()\n")
            for rows in rows_list:
                if rows <= 16:
                    probe_step(m, key, rows, a.reps)


if __name__ == "__main__":
    main()
