"""The Pallas quantized matmul on a real GPU: exactness natively (not interpret), then its
throughput against XLA's dequantize-then-matmul, for the prepared device check of issue 9.

1. Exactness: every block format (random GGUF bytes -> `prepare_weight`), rows 1, 3, 16, 128,
   f32 activations against numpy float64 x @ W.T (|err| <= 1e-5 * |x| @ |W|.T), and bf16
   activations for rows 1 and 128 in Q4_0/Q8_0/Q4_K/Q6_K (bound 1e-2: bf16 output, bf16
   weights in the dot path).
2. Throughput: SmolLM2 and Gemma layer shapes at rows 1, 8, 128, x in bf16, `pallas_linear` vs
   `w.dequantize(jnp.bfloat16)` then `x @ W.T` (what XLA does without the kernel). Each cell
   jits a dependent chain over C distinct copies of the weight (C = copies for ~64 MB, 1..8:
   amortizes dispatch; the small layers are launch-bound and may sit in L2 either way, the
   output layers are not) and reports the best of 5 runs per matmul: us, GB/s of resident
   weight bytes (codes + scales + biases), and tokens/s-equivalent (rows / time). Weights are
   random codes in the format's layout (K-quant layouts only where I % 256 == 0, as in a
   real file).

    python scripts/gpu_pallas_check.py --output benchmarks/gpu-pallas-qmatmul.json
    python scripts/gpu_pallas_check.py --budget-s 200 --formats Q4_0,Q8_0

Stops starting new throughput cells after --budget-s seconds (the JSON says what ran).
Exit status: 0 all exact, 1 an exactness failure, 2 no GPU present (nothing checked).

Without a GPU, --offline-triton PYTHON checks the rest of the GPU toolchain: it lowers every
kernel path (both kinds, GEMV and dot, f32 and bf16) to Triton IR here, then has PYTHON (an
interpreter with PyPI's `triton`, e.g. `python -m venv /tmp/tv && /tmp/tv/bin/pip install
triton`) compile each to sm_90a cubin, and prints ptxas's registers and spills per kernel.
Exit status 1 if any fails to compile.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = [  # (label, O, I)
    ("smollm2 q/o", 576, 576), ("smollm2 gate/up", 1536, 576), ("smollm2 down", 576, 1536),
    ("smollm2 output", 49152, 576),
    ("gemma q/o", 640, 640), ("gemma gate/up", 2048, 640), ("gemma down", 640, 2048),
    ("gemma output", 262144, 640),
]
ROWS = (1, 8, 128)
EXACT_ROWS_F32 = (1, 3, 16, 128)
EXACT_ROWS_BF16 = (1, 128)
EXACT_BF16_FORMATS = ("Q4_0", "Q8_0", "Q4_K", "Q6_K")
TARGET_BYTES = 64 << 20
MAX_COPIES = 8
REPS = 5


def _gpu_or_exit() -> str:
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        devs = []
    if not devs:
        print(f"gpu_pallas_check: no GPU present (JAX backend: {jax.default_backend()}, jax {jax.__version__});"
              " nothing checked. Run it on a machine with a GPU and jax[cuda].", file=sys.stderr)
        sys.exit(2)
    return f"{devs[0].device_kind} (x{len(devs)})"


def _short(e: BaseException) -> str:
    lines = [ln for ln in traceback.format_exception_only(type(e), e) if ln.strip()]
    return " ".join(lines)[-600:].strip()


def exactness(formats) -> list[dict]:
    from test_qmatmul import random_raw
    from woolly.formats.quants import dequantize
    from woolly.ops import qmatmul as qm
    from woolly.ops.pallas_qmatmul import pallas_linear, pallas_supported

    f = jax.jit(pallas_linear)
    out = []
    rng = np.random.default_rng(0)
    for qtype in formats:
        shape = (1536, 576) if qtype.block_size == 32 else (640, 2048)
        raw = random_raw(qtype, shape, seed=1)
        W = dequantize(raw, qtype, shape).astype(np.float64)
        w = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=False)
        if not pallas_supported(w, shape[1]):
            out.append(dict(format=qtype.name, shape=list(shape), ok=False, error="not pallas_supported"))
            continue
        cases = [(r, jnp.float32, 1e-5) for r in EXACT_ROWS_F32]
        if qtype.name in EXACT_BF16_FORMATS:
            cases += [(r, jnp.bfloat16, 1e-2) for r in EXACT_ROWS_BF16]
        for rows, dt, rtol in cases:
            rec = dict(format=qtype.name, kind=w.kind, sub=w.sub, bias=w.bias is not None, shape=list(shape),
                       rows=rows, dtype=jnp.dtype(dt).name, rtol=rtol)
            try:
                x = jnp.asarray(rng.standard_normal((rows, shape[1])), dt)
                y = np.asarray(f(x, w).astype(jnp.float32), np.float64)
                x64 = np.asarray(x.astype(jnp.float32), np.float64)
                err = np.abs(y - x64 @ W.T) / (np.abs(x64) @ np.abs(W).T + 1e-30)
                rec.update(max_rel_err=float(err.max()), ok=bool(err.max() <= rtol))
            except Exception as e:  # noqa: BLE001  (report every case, keep going)
                rec.update(ok=False, error=_short(e))
            out.append(rec)
            status = "ok" if rec["ok"] else "FAIL"
            print(f"  exact {qtype.name:5s} {w.kind:3s} rows={rows:3d} {rec['dtype']:8s} "
                  f"{status} {rec.get('max_rel_err', rec.get('error'))}", flush=True)
    return out


def _layout(qtype):
    """(kind, sub, off, has_bias) of a format, as prepare_weight lays it out for an even O."""
    from test_qmatmul import random_raw
    from woolly.ops import qmatmul as qm

    shape = (32, qtype.block_size)
    w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized", grouped=False)
    return w.kind, w.sub, w.off, w.bias is not None


def _random_weight(key, O: int, I: int, layout):
    from woolly.ops.qmatmul import QuantizedWeight

    kind, sub, off, has_bias = layout
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "nib":
        q = jax.random.randint(k1, (O // 2, I), 0, 256, jnp.int32).astype(jnp.uint8)
    else:
        q = jax.random.randint(k1, (O, I), -128, 128, jnp.int32).astype(jnp.int8)
    scale = jax.random.normal(k2, (O, I // sub), jnp.float32) * 0.01
    bias = jax.random.normal(k3, (O, I // sub), jnp.float32) * 0.01 if has_bias else None
    return QuantizedWeight(q, scale, bias, kind, sub, off)


def _chain(apply):
    """f(x, ws): x_{i+1} = x_i + 0 * y_i[0, 0] over the copies (a true dependency, as in a
    decode step), returning the last y."""
    def f(x, ws):
        y = None
        for w in ws:
            y = apply(x, w)
            x = x + (y[0, 0] * 0.0).astype(x.dtype)
        return y
    return jax.jit(f)


def _time(f, *args) -> float:
    jax.block_until_ready(f(*args))                       # compile + warm
    best = math.inf
    for _ in range(REPS):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def throughput(formats, budget_s: float, t0: float) -> list[dict]:
    from woolly.ops.pallas_qmatmul import pallas_linear, pallas_supported
    from woolly.ops.qmatmul import resident_nbytes

    pallas = _chain(pallas_linear)
    xla = _chain(lambda x, w: x @ w.dequantize(jnp.bfloat16).T)
    layouts = {q.name: _layout(q) for q in formats}
    out = []
    key = jax.random.PRNGKey(0)
    for rows in ROWS:
        for label, O, I in SHAPES:
            for qtype in formats:
                if qtype.block_size == 256 and I % 256 != 0:
                    continue
                rec = dict(layer=label, O=O, I=I, format=qtype.name, rows=rows)
                if time.perf_counter() - t0 > budget_s:
                    rec["error"] = "skipped: time budget spent"
                    out.append(rec)
                    continue
                try:
                    w0 = _random_weight(key, O, I, layouts[qtype.name])
                    nbytes = resident_nbytes(w0)
                    copies = max(1, min(MAX_COPIES, -(-TARGET_BYTES // nbytes)))
                    ws = [w0] + [_random_weight(jax.random.fold_in(key, c), O, I, layouts[qtype.name])
                                 for c in range(1, copies)]
                    x = jax.random.normal(key, (rows, I), jnp.float32).astype(jnp.bfloat16)
                    rec.update(copies=copies, weight_bytes=nbytes)
                    if pallas_supported(w0, I):
                        tp = _time(pallas, x, ws) / copies
                        rec.update(pallas_us=tp * 1e6, pallas_gbs=nbytes / tp / 1e9, pallas_tok_s=rows / tp)
                    else:
                        rec["pallas_error"] = "not pallas_supported"
                    tx = _time(xla, x, ws) / copies
                    rec.update(xla_us=tx * 1e6, xla_gbs=nbytes / tx / 1e9, xla_tok_s=rows / tx)
                    if "pallas_us" in rec:
                        rec["speedup"] = tx / (rec["pallas_us"] * 1e-6)
                    del ws
                except Exception as e:  # noqa: BLE001
                    rec["error"] = _short(e)
                out.append(rec)
                print(f"  {label:16s} {O:6d}x{I:<5d} {qtype.name:5s} rows={rows:3d} "
                      + (f"pallas {rec['pallas_us']:9.1f} us  " if "pallas_us" in rec else "")
                      + (f"xla {rec['xla_us']:9.1f} us" if "xla_us" in rec else rec.get("error", "")), flush=True)
    return out


def markdown(results: dict) -> str:
    lines = [f"### Pallas quantized matmul on {results['device']} (jax {results['jax']})", "",
             "Exactness (native): " + results["exact_summary"], "",
             "| layer | O x I | format | rows | pallas us | XLA us | speedup | pallas GB/s | XLA GB/s "
             "| pallas tok/s | XLA tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        def g(k, fmt):
            return fmt.format(r[k]) if k in r else "-"
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['O']}x{r['I']} | {r['format']} | {r['rows']} | "
                         f"{r['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {r['layer']} | {r['O']}x{r['I']} | {r['format']} | {r['rows']} | {g('pallas_us', '{:.1f}')} "
                     f"| {g('xla_us', '{:.1f}')} | {g('speedup', '{:.2f}x')} | {g('pallas_gbs', '{:.1f}')} "
                     f"| {g('xla_gbs', '{:.1f}')} | {g('pallas_tok_s', '{:.3g}')} | {g('xla_tok_s', '{:.3g}')} |")
    return "\n".join(lines)


_OFFLINE_COMPILE = r'''
import glob, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compile as tcompile
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = [os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")]   # newer first
ptxas = next((p for p in ptxas if os.path.exists(p)), None)
out = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.ttir"))):
    nw = int(re.search(r"_nw(\d+)", f).group(1))
    rec = {"kernel": os.path.basename(f)[:-5]}
    try:
        opts = dict(num_warps=nw, num_stages=int(sys.argv[2]))
        k = tcompile(f, target=GPUTarget("cuda", 90, 32), options=opts)
        rec["smem"] = k.metadata.shared
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as t:
            t.write(k.asm["ptx"])
        if ptxas:
            r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", t.name, "-o", os.devnull],
                               capture_output=True, text=True)
            m = re.search(r"Used (\d+) registers", r.stderr)
            sp = re.search(r"(\d+) bytes spill stores", r.stderr)
            rec.update(ptxas_rc=r.returncode, registers=int(m.group(1)) if m else None,
                       spill_bytes=int(sp.group(1)) if sp else None)
        rec["ok"] = True
    except Exception as e:
        rec.update(ok=False, error=str(e)[-500:])
    out.append(rec)
print(json.dumps(out))
'''


def offline_triton(python: str) -> int:
    """Lower every kernel path to Triton IR here; compile each with `python`'s triton."""
    import subprocess
    import tempfile

    from jax._src.pallas.triton import pallas_call_registration as reg
    from test_qmatmul import random_raw
    from woolly.formats.quants import QuantizationType as Q
    from woolly.ops import pallas_qmatmul as pq
    from woolly.ops import qmatmul as qm

    tmp = tempfile.mkdtemp(prefix="woolly-ttir-")
    lower = reg.lowering.lower_jaxpr_to_triton_module
    cur = {}

    def dump(*a, **k):
        r = lower(*a, **k)
        with open(os.path.join(tmp, cur["name"] + ".ttir"), "w") as fh:
            fh.write(r.module.operation.get_asm(enable_debug_info=False))
        return r

    reg.lowering.lower_jaxpr_to_triton_module = dump
    try:
        cases = [(Q.Q4_0, (576, 576)), (Q.Q4_1, (1536, 576)), (Q.Q8_0, (49152, 576)), (Q.Q3_K, (512, 256)),
                 (Q.Q4_K, (2048, 1536)), (Q.Q6_K, (640, 2048))]
        for qtype, shape in cases:
            w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized", grouped=False)
            for rows in (1, 3, 8, 16, 128):
                for dt in (jnp.float32, jnp.bfloat16):
                    nw = pq._num_warps(2 if w.kind == "nib" else 1, rows <= pq.GEMV_MAX_ROWS, dt == jnp.bfloat16)
                    cur["name"] = f"{qtype.name}_{shape[0]}x{shape[1]}_r{rows}_{jnp.dtype(dt).name}_nw{nw}"
                    jax.clear_caches()
                    x = jax.ShapeDtypeStruct((rows, shape[1]), dt)
                    jax.jit(pq.pallas_linear).trace(x, w).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = lower
    r = subprocess.run([python, "-c", _OFFLINE_COMPILE, tmp, str(pq._NUM_STAGES)], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_DEFAULT_FP_FUSION="1"))
    if r.returncode != 0:
        print(f"offline triton compile failed to run:\n{r.stderr[-2000:]}", file=sys.stderr)
        return 1
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    print("| kernel | compiled | registers | spill bytes | smem |\n|---|---|---|---|---|")
    for rec in recs:
        print(f"| {rec['kernel']} | {'yes' if rec['ok'] else 'NO: ' + rec['error'][:80]} | "
              f"{rec.get('registers', '-')} | {rec.get('spill_bytes', '-')} | {rec.get('smem', '-')} |")
    bad = [rec for rec in recs if not rec["ok"]]
    print(f"\n{len(recs) - len(bad)}/{len(recs)} kernels compile for sm_90a (Triton IR in {tmp})")
    return 1 if bad or not recs else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K,Q6_K", help="throughput formats (comma-separated)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no throughput cell after this many seconds")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--offline-triton", metavar="PYTHON",
                    help="no GPU needed: compile every kernel path with this interpreter's triton for sm_90a")
    args = ap.parse_args(argv)
    if args.offline_triton:
        return offline_triton(args.offline_triton)
    t0 = time.perf_counter()
    device = _gpu_or_exit()

    from woolly.formats.quants import QuantizationType as Q
    from woolly.ops import pallas_qmatmul

    print(f"gpu_pallas_check: {device}, jax {jax.__version__}", flush=True)
    all_formats = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    exact = [] if args.skip_exact else exactness(all_formats)
    bad = [r for r in exact if not r["ok"]]
    f32_errs = [r["max_rel_err"] for r in exact if r.get("dtype") == "float32" and "max_rel_err" in r]
    summary = f"{len(exact) - len(bad)}/{len(exact)} cases within tolerance"
    if f32_errs:
        summary += f"; worst f32 rel err {max(f32_errs):.2g}"
    print(f"exactness: {summary}", flush=True)
    bench = throughput([Q[n.strip()] for n in args.formats.split(",") if n.strip()], args.budget_s, t0)
    pq = pallas_qmatmul
    tiles = dict(gemv_max_rows=pq.GEMV_MAX_ROWS, gemv_bo_bk=[pq._GEMV_BO, pq._GEMV_BK],
                 gemv_min_programs=pq.GEMV_MIN_PROGRAMS, dot_bo_br=[pq._DOT_BO, pq._DOT_BR], dot_bk=pq._DOT_BK,
                 f32_dot=pq.F32_DOT, num_warps=pq._NUM_WARPS, num_stages=pq._NUM_STAGES)
    results = dict(device=device, jax=jax.__version__, exact_summary=summary, exactness=exact, throughput=bench,
                   tiles=tiles,
                   method=f"best of {REPS}; dependent chain over distinct weight copies (~{TARGET_BYTES >> 20} MB, "
                          f"<= {MAX_COPIES}); x bf16; XLA path = w.dequantize(bf16) then x @ W.T",
                   elapsed_s=time.perf_counter() - t0)
    print()
    print(markdown(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"\nwrote {args.output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
