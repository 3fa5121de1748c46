"""Cache consistency: one full-sequence forward == prefill (in two chunks) + token-by-token decode.

Tiny random models of every block format (dense and quantized-resident), and both real models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.formats.quants import QuantizationType
from woolly.model_file import Model
from woolly.ops import qmatmul
from woolly.runtime import entry
from woolly.runtime.cache import bucket, new_cache
from woolly.runtime.params import load_params

ALL_TYPES = [t.name for t in QuantizationType]
TOLERANCE = 2e-4   # relative to the largest |logit|: the two paths differ only in f32 summation order


@pytest.fixture(autouse=True)
def f32_activations(monkeypatch):
    """Compare like with like: with int8 activations (quantized residency's default) a summation-
    order difference can move an activation across a rounding step, a 1e-3 effect that says
    nothing about the cache. The int8 path is held to llama.cpp in test_runtime_oracle."""
    monkeypatch.setattr(qmatmul, "ACTIVATIONS", "f32")
    jax.clear_caches()


def cache_consistency_error(model: Model, residency: str, tokens: list[int], split: tuple[int, int],
                            cache_length: int = 64) -> tuple[float, float]:
    """Max |logits| difference between the full forward and prefill(split) + decode, and the logit scale."""
    cfg = model.config
    params = load_params(model, residency)
    full = np.asarray(entry.all_logits(params, jnp.asarray([tokens], jnp.int32), cfg=cfg))[0]   # [T, V]
    cache = new_cache(cfg, 1, cache_length)
    worst = 0.0
    start = 0
    for end in split:  # two prefill chunks: the second continues at a nonzero start
        chunk = np.zeros(bucket(end - start), np.int32)
        chunk[:end - start] = tokens[start:end]
        logits, cache = entry.prefill(params, cache, jnp.asarray(chunk), jnp.int32(start), jnp.int32(end - start),
                                      jnp.int32(0), cfg=cfg)
        worst = max(worst, float(np.abs(np.asarray(logits) - full[end - 1]).max()))
        start = end
    for pos in range(start, len(tokens)):
        logits, cache = entry.decode_step(params, cache, jnp.asarray([tokens[pos]], jnp.int32),
                                          jnp.asarray([pos], jnp.int32), cfg=cfg)
        worst = max(worst, float(np.abs(np.asarray(logits[0]) - full[pos]).max()))
    return worst, float(np.abs(full).max())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_tiny_model_cache_consistency(tmp_path, arch, qtype):
    # gemma3: 6 layers so the global layer runs too; 48 tokens so the 32-token window slides.
    path = write_tiny_model(tmp_path / "tiny.gguf", arch=arch, qtype=qtype, n_layers=6 if arch == "gemma3" else 2)
    model = Model.from_file(path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model.config.vocab_size, 48).tolist()
    for residency in ("dense", "quantized"):
        err, scale = cache_consistency_error(model, residency, tokens, split=(13, 20))
        print(f"{arch} {qtype} {residency}: max |full - cached| = {err:.3g} (logit scale {scale:.3g})")
        assert err <= TOLERANCE * max(scale, 1.0)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_cache_consistency(name):
    model = Model.from_file(name)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 20000, 40).tolist()
    err, scale = cache_consistency_error(model, "dense", tokens, split=(9, 30), cache_length=64)
    print(f"{name} dense: max |full - cached| = {err:.3g} (logit scale {scale:.3g})")
    assert err <= TOLERANCE * scale
