"""A 16-bit KV cache (EngineConfig.kv_cache_type, llama.cpp's --cache-type-k/v f16): half the
cache's bytes, logits close to the f32 cache's and the same greedy text, on a tiny model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.engine.config import EngineConfig
from woolly.model_file import Model
from woolly.runtime.runner import Runner

PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [2, 40, 41, 42], [3, 7, 11, 60, 61, 62, 63, 64, 65, 66]]
# Relative to the largest |logit|: an f16 cache rounds K and V to 11 significant bits, bf16 to 8.
TOLERANCE = {"f16": 2e-3, "bf16": 2e-2}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("kv") / "tiny.gguf", arch="llama", n_layers=2)
    m = Model.from_file(path)
    yield m
    m.close()


def _logits(runner: Runner, prompt: list[int], steps: list[int]) -> np.ndarray:
    """Prefill `prompt`, then decode `steps` teacher-forced -> f32 [1 + len(steps), V]."""
    out = [np.asarray(runner.prefill(prompt))]
    for i, t in enumerate(steps):
        out.append(np.asarray(runner.decode([t], [len(prompt) + i]))[0])
    return np.stack([o.reshape(-1) for o in out])


@pytest.mark.parametrize("kind", ["f16", pytest.param("bf16", marks=pytest.mark.slow)])
def test_16_bit_cache_matches_the_f32_cache(model, kind):
    base = Runner(model, slots=1, cache_length=64, compile_cache=False)
    half = Runner(model, slots=1, cache_length=64, compile_cache=False, params=base.params, kv_cache_type=kind)
    assert half.cache.k[0].dtype == {"f16": jnp.float16, "bf16": jnp.bfloat16}[kind]
    nbytes = lambda c: sum(a.nbytes for a in jax.tree_util.tree_leaves(c))   # noqa: E731
    assert nbytes(half.cache) * 2 == nbytes(base.cache)
    for prompt in PROMPTS:
        want = base.generate([prompt], max_tokens=12)[0]
        got = half.generate([prompt], max_tokens=12)[0]
        assert got == want, f"greedy text differs for {prompt}"
        ref = _logits(base, prompt, want[:-1])
        out = _logits(half, prompt, want[:-1])
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        assert err < TOLERANCE[kind], (kind, err)
        assert err > 0   # the cache really is 16-bit


def test_kv_cache_type_is_checked():
    assert EngineConfig(kv_cache_type="f16").kv_cache_type == "f16"
    assert EngineConfig.builder().kv_cache_type("bf16").build().kv_cache_type == "bf16"
    with pytest.raises(ValueError):
        EngineConfig(kv_cache_type="q4_0")


def test_kv_cache_type_from_the_environment():
    from woolly.config import load_config
    assert load_config(env={"WOOLLY_KV_CACHE_TYPE": "f16"}).inference.kv_cache_type == "f16"
    assert load_config(env={"WOOLLY_KV_CACHE_TYPE": "f32"}).inference.kv_cache_type == "f32"
    assert load_config(env={}).inference.kv_cache_type == "f16"   # llama.cpp's default


def test_f16_is_the_default():
    assert EngineConfig().kv_cache_type == "f16"
    assert EngineConfig.default().kv_cache_type == "f16"


@pytest.mark.real
@pytest.mark.oracle
def test_f16_cache_moves_logits_as_little_as_llama_cpps_own(tmp_path):
    """The default f16 cache against llama.cpp, whose default is f16 too. On an F32 copy of
    SmolLM2 (no activation quantization on either side), over a 300-token prefill and 12 decode
    steps: Woolly f16 stays as close to llama.cpp f16 as the f32 pair is close to each other
    plus what llama.cpp's own f16-vs-f32 switch moves (measured here, printed), and Woolly's own
    f16-vs-f32 difference is no larger than llama.cpp's."""
    from pathlib import Path

    from oracle import llama_cpp_model
    from woolly.quantize import quantize_model

    name = "smollm2-135m-instruct"
    f32_path = str(quantize_model(name, tmp_path / "f32.gguf", "F32"))
    model = Model.from_file(name)
    text = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
    llm = {kv: llama_cpp_model(f32_path, logits_all=True, n_ctx=512, **({} if kv == "f16" else dict(type_k=0, type_v=0)))
           for kv in ("f16", "f32")}
    tokens = llm["f32"].tokenize(text.encode())[:312]
    ref = {}
    for kv, l in llm.items():
        l.reset()
        l.eval(tokens)
        ref[kv] = np.array(l.scores[:len(tokens)])[299:]                                 # [13, V]
    base = Runner(model, cache_length=512, kv_cache_type="f32")   # dense: exact f32 weights
    mine = {}
    for kv in ("f32", "f16"):
        r = base if kv == "f32" else Runner(model, cache_length=512, params=base.params, kv_cache_type="f16")
        rows = [np.asarray(r.prefill(tokens[:300]))]
        rows += [np.asarray(r.decode([tokens[p]], [p])[0]) for p in range(300, 312)]
        mine[kv] = np.stack(rows)

    def err(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())
    llama_switch, woolly_switch = err(ref["f16"], ref["f32"]), err(mine["f16"], mine["f32"])
    pair_f32, pair_f16 = err(mine["f32"], ref["f32"]), err(mine["f16"], ref["f16"])
    print(f"relative max logit differences: llama.cpp f16 vs f32 KV {llama_switch:.2e}; woolly f16 vs f32 "
          f"{woolly_switch:.2e}; woolly vs llama.cpp with f32 KV {pair_f32:.2e}, with f16 KV {pair_f16:.2e}")
    assert woolly_switch > 0                      # the cache really is 16-bit
    assert woolly_switch <= max(llama_switch, 1e-3)
    assert pair_f16 <= pair_f32 + llama_switch + woolly_switch
    assert (mine["f16"].argmax(-1) == ref["f16"].argmax(-1)).mean() >= 12 / 13
