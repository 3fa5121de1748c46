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
    assert load_config(env={}).inference.kv_cache_type == "f32"
