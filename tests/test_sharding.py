"""Tensor and data parallelism (woolly.runtime.sharding) on 4 forced CPU devices.

JAX sees 4 host devices only when XLA_FLAGS is set before it is imported, so the sharded
checks run in a child process (this file run as a script: `python test_sharding.py CASE`),
which asserts and prints one JSON line of facts; the rules themselves are checked in-process
on abstract meshes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
DEVICES = 4


def run_child(case: str, *args: str, timeout: int = 600) -> dict:
    """Run this file as a script with 4 forced CPU devices -> the JSON its last line holds."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), case, *args], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"child {case} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- in-process: the rules, on abstract meshes ----------------------------------------------------------
def abstract_mesh(tp: int, dp: int = 1):
    from jax.sharding import AbstractMesh, AxisType
    return AbstractMesh((dp, tp), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def fake_layer(cfg, quantized: bool = False) -> dict:
    """Shape-only stand-ins for one layer's matrices ([O, I]; quantized: sub-blocks of 32)."""
    import jax
    import jax.numpy as jnp

    from woolly.ops.qmatmul import QuantizedWeight

    def mat(O, I):
        if quantized:
            s = jax.ShapeDtypeStruct
            return QuantizedWeight(s((O // 2, I), jnp.uint8), s((O, I // 32), jnp.float32), None, "nib", 32, 8)
        return jax.ShapeDtypeStruct((O, I), jnp.float32)

    D, F, q, kv = cfg.d_model, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn_norm": jax.ShapeDtypeStruct((D,), jnp.float32), "wq": mat(q, D), "wk": mat(kv, D),
            "wv": mat(kv, D), "wo": mat(D, q), "w_gate": mat(F, D), "w_up": mat(F, D), "w_down": mat(D, F)}


def real_config(name: str):
    """The two real models' shapes (what the rules read), without their files."""
    from woolly.arch import ModelConfig
    common = dict(context_length=2048, rms_eps=1e-6, rope_base=1e4, rope_neox=False, tied_output=True)
    if name == "smollm2":
        return ModelConfig("llama", 30, 576, 9, 3, 64, 1536, 49152, **common)
    return ModelConfig("gemma3", 18, 640, 4, 1, 256, 2048, 262144, **common)


@pytest.mark.parametrize("quantized", [False, True])
def test_plan_replicates_heads_that_do_not_divide(quantized):
    from woolly.runtime.sharding import COLUMN, ROW, layer_plan, split_heads

    smol, gemma = real_config("smollm2"), real_config("gemma3")
    for tp in (2, 4):
        mesh = abstract_mesh(tp)
        # SmolLM2: 9 Q heads, 3 KV heads: attention replicated, MLP split.
        assert split_heads(smol, mesh) == (False, False)
        plan = layer_plan(fake_layer(smol, quantized), smol, mesh)
        assert plan == {"wq": None, "wk": None, "wv": None, "wo": None,
                        "w_gate": COLUMN, "w_up": COLUMN, "w_down": ROW}
        # Gemma-3-270M: 4 Q heads split, its one KV head replicated.
        assert split_heads(gemma, mesh) == (True, False)
        plan = layer_plan(fake_layer(gemma, quantized), gemma, mesh)
        assert plan == {"wq": COLUMN, "wk": None, "wv": None, "wo": ROW,
                        "w_gate": COLUMN, "w_up": COLUMN, "w_down": ROW}
    # Nothing is split over a model axis of one; 3 devices split SmolLM2's heads.
    assert set(layer_plan(fake_layer(smol), smol, abstract_mesh(1, 4)).values()) == {None}
    assert split_heads(smol, abstract_mesh(3)) == (True, True)


def test_unpack_nibbles_is_exact():
    from woolly.formats.quantizers import quantize_rows
    from woolly.formats.quants import QuantizationType
    from woolly.ops.qmatmul import prepare_weight
    from woolly.runtime.sharding import unpack_nibbles

    w = np.random.default_rng(0).normal(0, 0.02, (8, 64)).astype(np.float32)
    for qt in (QuantizationType.Q4_0, QuantizationType.Q4_1):
        qw = prepare_weight(quantize_rows(w, qt), qt, (8, 64), "quantized")
        assert qw.kind == "nib"
        u = unpack_nibbles(qw)
        assert u.kind == "i8" and u.q.shape == (8, 64)
        np.testing.assert_array_equal(np.asarray(u.dequantize()), np.asarray(qw.dequantize()))


def test_engine_config_mesh_defaults():
    from woolly.engine import EngineConfig

    assert EngineConfig().make_mesh() is None     # no mesh: exactly the single-device path
    assert EngineConfig(tensor_parallel=1, data_parallel=1).make_mesh() is None
    assert EngineConfig(data_parallel=None).make_mesh() is None   # one device here
    with pytest.raises(ValueError):
        EngineConfig(tensor_parallel=0)
    with pytest.raises(ValueError):
        EngineConfig(tensor_parallel=2).make_mesh()              # one device here
    cfg = EngineConfig.builder().tensor_parallel(2).data_parallel(None).build()
    assert (cfg.tensor_parallel, cfg.data_parallel) == (2, None)


# -- 4 devices, in a child process -------------------------------------------------------------------------
def test_tiny_sharded_equals_one_device():
    facts = run_child("tiny")
    assert facts["devices"] == DEVICES
    assert facts["qwen3moe-quantized"] == "ok"
    assert facts["kernel_separate"] is True


def test_tiny_data_parallel_engine():
    facts = run_child("engine")
    assert facts["slots_spec"][0] == "data"


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_greedy_tensor_parallel_equals_one_device(name):
    from woolly.model_store import resolve_model_path
    facts = run_child("real", str(resolve_model_path(name)))
    print(name, facts)
    assert facts["equal"] == {"2": True, "4": True}
    assert facts["logprob_err"] < 1e-3


# -- the child ---------------------------------------------------------------------------------------
def _spec(a) -> list:
    """a's PartitionSpec as a list, trailing Nones dropped ([]: replicated)."""
    a = getattr(a, "q", a)   # a QuantizedWeight: its codes
    spec = [None if p is None else str(p) for p in a.sharding.spec]
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def _tiny(tmp: Path, arch: str, qtype: str):
    from tiny_models import write_tiny_model
    from woolly.model_file import Model
    # 8 Q heads over 2 KV heads, head dim 16 x 8 = 128, vocabulary of 324 / 360: all divide 4.
    return Model.from_file(write_tiny_model(tmp / f"{arch}-{qtype}.gguf", arch=arch, qtype=qtype, n_layers=2,
                                            d_model=128, n_heads=8, n_kv_heads=2, ffn_dim=256, n_merges=65))


def child_tiny(tmp: Path) -> dict:
    """Logits of prefill + decode steps with tp 2, 4 and 2x2 equal one device's; shardings as the rules say;
    the single-device entry points keep the C++ kernel while the sharded ones never trace it."""
    import jax
    import jax.numpy as jnp

    from woolly.ops.qmatmul import kernel_available
    from woolly.runtime import Runner, SamplingParams, entry, sharding
    from woolly.runtime.params import load_params

    facts = {"devices": len(jax.devices())}
    rng = np.random.default_rng(0)
    for arch, qtype, residency in (("llama", "Q4_0", "dense"), ("gemma3", "Q4_0", "quantized"),
                                   ("qwen3moe", "Q4_0", "quantized")):
        model = _tiny(tmp, arch, qtype)
        params = load_params(model, residency)
        V = model.config.vocab_size
        prompts = [rng.integers(0, V, n).tolist() for n in (5, 11)]
        steps = [rng.integers(0, V, 2).tolist() for _ in range(3)]

        def logits_of(runner):
            out = [np.asarray(runner.prefill(p, slot=i)) for i, p in enumerate(prompts)]
            pos = [len(p) for p in prompts]
            for t in steps:
                out.append(np.asarray(runner.decode(t, pos)))
                pos = [p + 1 for p in pos]
            return out

        # Quantized: compare with one device without the kernel (its q8 activations round).
        ref_mesh = sharding.make_mesh(1, 1) if residency == "quantized" else None
        ref = logits_of(Runner(model, params=params, slots=2, cache_length=32, mesh=ref_mesh))
        for tp, dp in ((2, 1), (4, 1), (2, 2)):
            mesh = sharding.make_mesh(tp, dp)
            r = Runner(model, params=params, slots=2, cache_length=32, mesh=mesh)
            got = logits_of(r)
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=f"{arch} {residency} tp={tp} dp={dp}")
            lp = r.params["layers"][0]
            wq, wk = lp["wq"], lp["wk"]
            assert _spec(wq) == ["model"], (tp, _spec(wq))                 # 8 Q heads: split
            assert _spec(wk) == (["model"] if tp == 2 else []), (tp, _spec(wk))   # 2 KV heads: 4 replicates
            if arch == "qwen3moe":                                               # experts: replicated
                assert all(_spec(e) == [] for e in lp["w_down_exps"])
                continue
            assert _spec(lp["w_down"]) == [None, "model"]                        # row-parallel
            if residency == "quantized":
                assert lp["wq"].kind == "i8" and lp["w_down"].kind == "nib"     # column split unpacks nibbles
            assert _spec(r.params["embed"]) == ["model"]                   # vocabulary split
            assert _spec(r.cache.k[0]) == (["data" if dp > 1 else None, "model"] if tp == 2 else
                                           ["data"] if dp > 1 else []), (tp, dp, _spec(r.cache.k[0]))
            assert len(r.cache.k[0].sharding.device_set) == tp * dp
        if residency == "dense":   # whole completions (seeded sampling), prompts prefilled at once over "data"
            sp = SamplingParams.make(2, temperature=0.8)
            want = Runner(model, params=params, slots=2, cache_length=32).generate(prompts, 10, sp, seed=[3, 4])
            got = Runner(model, params=params, slots=2, cache_length=32, mesh=sharding.make_mesh(2, 2)).generate(
                prompts, 10, sp, seed=[3, 4])
            assert got == want and got[0] != got[1], (got, want)
        facts[f"{arch}-{residency}"] = "ok"

    # A sharded trace never shares a jit cache entry with the single-device one.
    model = _tiny(tmp, "llama", "Q4_0")
    params = load_params(model, "quantized")
    from woolly.runtime.cache import new_cache
    tokens, positions = jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)

    def hlo(fn, p, cache):
        return fn.lower(p, cache, tokens, positions, cfg=model.config).as_text()

    plain_before = hlo(entry.decode_step, params, new_cache(model.config, 2, 32))
    mesh = sharding.make_mesh(4, 1)
    sharded = hlo(sharding.entry_points(mesh).decode_step, sharding.shard_params(params, model.config, mesh),
                  sharding.new_cache(model.config, mesh, 2, 32))
    plain_after = hlo(entry.decode_step, params, new_cache(model.config, 2, 32))
    assert "woolly_qmatvec" not in sharded
    if kernel_available():
        assert "woolly_qmatvec" in plain_before and "woolly_qmatvec" in plain_after
    facts["kernel_separate"] = True

    # Data-parallel prefill moves no KV between devices (the slot-slicing prefill gathered the whole cache).
    mesh = sharding.make_mesh(1, 4)
    r = Runner(model, params=params, slots=4, cache_length=32, mesh=mesh)
    z = jnp.zeros((4, 16), jnp.int32)
    text = sharding.entry_points(mesh).prefill_rows.lower(r.params, r.cache, z, z, z[:, 0], cfg=model.config)
    cache_shape = "f32[{},{},{},{}]".format(*r.cache.k[0].shape)
    assert cache_shape not in " ".join(re.findall(r"= (\S+) all-gather", text.compile().as_text()))
    # Nor does reading one slot for the prefix cache, which still equals the single-device read.
    r.prefill([5, 6, 7, 8, 9], slot=2)
    text = sharding.entry_points(mesh).read_slot.lower(r.cache, jnp.int32(2)).compile().as_text()
    assert cache_shape not in " ".join(re.findall(r"= (\S+) all-gather", text))
    got, want = r.read_slot(2), entry.read_slot(jax.device_get(r.cache), jnp.int32(2))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert np.abs(np.asarray(got.k[0])).sum() > 0
    return facts


def child_engine(tmp: Path) -> dict:
    """Engine.generate_batch and Engine.perplexity over 4 data-parallel devices equal one device's."""
    from woolly.engine import Engine, EngineConfig

    path = _tiny(tmp, "llama", "Q8_0").path
    prompts = ["Hello world", "The quick brown fox", "the end", "There is the thing", "dog sleeps"]
    text = " ".join(["The quick brown fox jumps over the lazy dog, then it says hello."] * 12)
    out = {}
    # dense, the exact mode: sharded traces multiply in f32 (xla_only), one device's kernel rounds activations to int8
    for name, cfg in (("one", EngineConfig(max_batch_size=4, max_sequence_length=128, residency="dense")),
                      ("dp4", EngineConfig(max_batch_size=4, max_sequence_length=128, data_parallel=4,
                                           residency="dense"))):
        eng = Engine(cfg)
        eng.load_model(path)
        res = eng.generate_batch(prompts, max_tokens=12, temperature=0.8, seed=7)
        again = eng.generate_batch(prompts[:2], max_tokens=12, temperature=0.8, seed=7)   # prefix-cache hits
        assert [r.token_ids for r in again] == [r.token_ids for r in res[:2]]
        assert all(r.cached_prompt_tokens > 0 for r in again), again
        out[name] = {"tokens": [r.token_ids for r in res],
                     "ppl": eng.perplexity(text, n_ctx=32)}
        if name == "dp4":
            out["slots_spec"] = _spec(eng._runner.cache.k[0])
            out["slots"] = eng._runner.slots
        eng.unload_model()
    assert out["dp4"]["tokens"] == out["one"]["tokens"], out
    assert abs(out["dp4"]["ppl"] - out["one"]["ppl"]) <= 1e-5 * out["one"]["ppl"], out
    return {"slots_spec": out["slots_spec"], "ppl": out["one"]["ppl"]}


def child_real(path: str) -> dict:
    """Greedy completions with tensor_parallel 4 and 2 equal one device's (dense weights)."""
    import time

    from woolly.model_file import Model
    from woolly.runtime import Runner, sharding
    from woolly.runtime.params import load_params

    model = Model.from_file(path)
    cfg = model.config
    tok = model.tokenizer
    prompts = [tok.tokenize(t) for t in ("The capital of France is", "def fibonacci(n):",
                                         "Once upon a time, in a small village")]
    params = load_params(model, "dense")
    t0 = time.time()
    one = Runner(model, params=params, slots=3, cache_length=64).generate(prompts, max_tokens=16)
    facts = {"equal": {}, "seconds": {"1": round(time.time() - t0, 1)}}
    q, kv = sharding.split_heads(cfg, sharding.make_mesh(4, 1))
    for tp in (4, 2):
        t0 = time.time()
        mesh = sharding.make_mesh(tp, 1)
        r = Runner(model, params=params, slots=3, cache_length=64, mesh=mesh)
        got = r.generate(prompts, max_tokens=16)
        facts["equal"][str(tp)] = got == one
        facts["seconds"][str(tp)] = round(time.time() - t0, 1)
        lp = r.params["layers"][0]
        assert _spec(lp["w_gate"]) == ["model"] and _spec(lp["w_down"]) == [None, "model"]
        heads = sharding.split_heads(cfg, mesh)
        assert _spec(lp["wq"]) == (["model"] if heads[0] else [])
        assert _spec(lp["wk"]) == (["model"] if heads[1] else [])
        assert _spec(r.cache.k[0]) == ([None, "model"] if heads[1] else [])
        assert _spec(r.params["embed"]) == ["model"]
        if got != one:
            facts[f"tp{tp}"] = [tok.decode(g) for g in got]
    facts["one"] = [tok.decode(g) for g in one]
    facts["heads_split_at_4"] = [q, kv]

    # Log-probs of 4 chunks (perplexity's measure) on a 2 x 2 mesh: rows over "data", heads and MLP over "model".
    t0 = time.time()
    ids = tok.tokenize("The quick brown fox jumps over the lazy dog. " * 16)[:128]
    chunks = np.array(ids, np.int32).reshape(4, 32)
    want = Runner(model, params=params, slots=1, cache_length=32).token_logprobs(chunks)
    got = Runner(model, params=params, slots=4, cache_length=32, mesh=sharding.make_mesh(2, 2)).token_logprobs(chunks)
    facts["logprob_err"] = float(np.abs(got - want).max())
    facts["seconds"]["logprobs 2x2"] = round(time.time() - t0, 1)
    return facts


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    case = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        if case == "tiny":
            result = child_tiny(Path(d))
        elif case == "engine":
            result = child_engine(Path(d))
        elif case == "real":
            result = child_real(sys.argv[2])
        else:
            raise SystemExit(f"unknown case {case!r}")
    print(json.dumps(result))
