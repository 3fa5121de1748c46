"""Batched decode equals decoding alone; quantized-resident weights equal dense; embeddings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.formats.quants import QuantizationType
from woolly.model_file import Model
from woolly.ops import qmatmul
from woolly.runtime import Runner, SamplingParams, entry
from woolly.runtime.params import load_params


def batched_vs_alone(model: Model, prompts: list[list[int]], n: int, **sampling):
    """Tokens of the prompts completed together (plus one idle slot) and each alone."""
    params = load_params(model, "dense")
    cache_length = max(map(len, prompts)) + n
    B = len(prompts) + 1
    together = Runner(model, params=params, slots=B, cache_length=cache_length)
    alone = Runner(model, params=params, slots=1, cache_length=cache_length)
    seeds = list(range(10, 10 + len(prompts)))
    both = together.generate(prompts, max_tokens=n, sampling=SamplingParams.make(B, **sampling), seed=seeds)
    each = [alone.generate([p], max_tokens=n, sampling=SamplingParams.make(1, **sampling), seed=s)[0]
            for p, s in zip(prompts, seeds)]
    return both, each


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_batched_decode_equals_alone(tmp_path, arch):
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch=arch, qtype="Q4_0", n_layers=6))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.config.vocab_size, k).tolist() for k in (3, 17, 40)]
    together, alone = batched_vs_alone(model, prompts, 24)
    assert together == alone


def test_tiny_seeded_sampling_independent_of_batch(tmp_path):
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="llama", qtype="Q8_0"))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.config.vocab_size, k).tolist() for k in (4, 9)]
    together, alone = batched_vs_alone(model, prompts, 20, temperature=1.5, top_k=40, top_p=0.95,
                                       repeat_penalty=1.1)
    assert together == alone
    assert together[0] != together[1]


def test_tiny_chained_steps_equal_host_packed_steps(tmp_path):
    """`Runner.chain_step` (the next step's inputs made on device) draws what host-packed steps
    draw, with a penalty window kept to 3 and budgets of 6 and 3 (after which a slot goes idle)."""
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="llama", qtype="Q8_0"))
    params = load_params(model, "quantized")
    W, B = 8, 2
    sampling = {"temperature": np.full(B, 1.3, np.float32), "top_p": np.ones(B, np.float32),
                "min_p": np.zeros(B, np.float32), "repeat_penalty": np.full(B, 1.5, np.float32),
                "presence_penalty": np.full(B, 0.5, np.float32), "frequency_penalty": np.zeros(B, np.float32),
                "top_k": np.zeros(B, np.int32)}
    seeds, keep, budget = np.array([7, 8], np.uint32), np.array([3, 3], np.int32), np.array([6, 3])
    prompts = [[5, 9, 11], [3, 4, 5, 6, 7]]
    host, chained = (Runner(model, "quantized", params=params, slots=B, cache_length=64) for _ in range(2))
    for r in (host, chained):
        for slot, p in enumerate(prompts):
            r.prefill(p[:-1], slot=slot)
    # the host's bookkeeping, as the scheduler keeps it
    tokens = np.array([p[-1] for p in prompts], np.int32)
    positions = np.array([len(p) - 1 for p in prompts], np.int32)
    recent = [list(p[-3:]) for p in prompts]
    drawn_host = [[], []]
    for step in range(6):
        window = np.full((B, W), -1, np.int32)
        for i in range(B):
            window[i, W - len(recent[i]):] = recent[i]
        live = [i for i in range(B) if step < budget[i]]
        pos = np.where([i in live for i in range(B)], positions, -1).astype(np.int32)
        out, _ = host.step(tokens, pos, seeds, np.full(B, step, np.int32), sampling, window)
        for i in live:
            drawn_host[i].append(int(out[i]))
            tokens[i], positions[i] = out[i], positions[i] + 1
            recent[i] = (recent[i] + [int(out[i])])[-3:]
    window = np.full((B, W), -1, np.int32)
    for i, p in enumerate(prompts):
        window[i, W - 3:] = p[-3:]
    pending = chained.dispatch_step(np.array([p[-1] for p in prompts], np.int32),
                                    np.array([len(p) - 1 for p in prompts], np.int32), seeds, np.zeros(B, np.int32),
                                    sampling, window, keep, budget)
    drawn_chained = [[], []]
    for step in range(6):
        nxt = chained.chain_step(pending) if step < 5 else None
        out = np.asarray(pending.tokens)
        for i in range(B):
            if step < budget[i]:
                drawn_chained[i].append(int(out[i]))
        if nxt is not None:
            pending = nxt
    assert drawn_chained == drawn_host
    assert np.asarray(pending.next_ints)[:, 1].tolist() == [-1, -1]   # both budgets spent: idle
    for a, b in zip(host.cache.k, chained.cache.k):   # the KV of every drawn token, the same
        np.testing.assert_array_equal(np.asarray(a)[:, :, :8], np.asarray(b)[:, :, :8])


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_batched_decode_equals_alone(name):
    model = Model.from_file(name)
    prompts = [[1, 504, 3575, 282, 4649, 314], [28, 1030, 5, 77, 3212, 9, 1001, 41, 650, 12, 4, 9999, 30],
               [2, 818, 5279, 529]]
    together, alone = batched_vs_alone(model, prompts, 16)
    print(name, together)
    assert together == alone


@pytest.mark.parametrize("activations, tolerance", [("f32", 1e-5), ("q8", 3e-2)])
@pytest.mark.parametrize("qtype", [t for t in QuantizationType if t.is_quantized])
def test_tiny_quantized_resident_equals_dense(tmp_path, qtype, activations, tolerance, monkeypatch):
    """With f32 activations quantized residency is the dense model exactly; with int8 activations
    (the default, llama.cpp's way) it differs by their rounding only (~0.4% of an activation)."""
    monkeypatch.setattr(qmatmul, "ACTIVATIONS", activations)
    jax.clear_caches()
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="llama", qtype=qtype))
    tokens = jnp.asarray([np.random.default_rng(4).integers(0, model.config.vocab_size, 20)])
    dense = np.asarray(entry.all_logits(load_params(model, "dense"), tokens, cfg=model.config))
    quantized = np.asarray(entry.all_logits(load_params(model, "quantized"), tokens, cfg=model.config))
    err = np.abs(dense - quantized).max() / np.abs(dense).max()
    print(f"{qtype.name} ({activations}): quantized-resident vs dense, max relative logit difference {err:.2e}")
    assert err < tolerance


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_quantized_resident_same_greedy_tokens(name, monkeypatch):
    """Residency alone changes nothing: with f32 activations the quantized weights are the dense
    model exactly (int8 activations are checked against llama.cpp in test_runtime_oracle)."""
    monkeypatch.setattr(qmatmul, "ACTIVATIONS", "f32")
    jax.clear_caches()
    model = Model.from_file(name)
    prompts = [[1, 504, 3575, 282, 4649, 314, 7042, 30], [2, 818, 5279, 529, 7001, 563]]
    out = {}
    for residency in ("dense", "quantized"):
        runner = Runner(model, residency=residency, slots=2, cache_length=64)
        out[residency] = runner.generate(prompts, max_tokens=24)
    print(name, out)
    assert out["quantized"] == out["dense"]


def test_embeddings_are_unit_mean_pooled_and_padding_free(tmp_path):
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="llama", qtype="Q8_0"))
    runner = Runner(model, compile_cache=False)
    short, long = [5, 9, 11], list(range(3, 40))
    both = runner.embed([short, long])                                                   # [2, D]
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(runner.embed([short])[0], both[0], atol=1e-5)            # padding ignored
    # mean of the final hidden states, computed here from per-position states
    from woolly.models import forward_hidden
    from woolly.runtime.cache import new_cache
    h, _ = forward_hidden(runner.params, jnp.asarray([short]), jnp.arange(3)[None], new_cache(model.config, 1, 3),
                          model.config)
    mean = np.asarray(h[0]).mean(0)
    np.testing.assert_allclose(both[0], mean / np.linalg.norm(mean), atol=1e-5)


def _prefill_batched_vs_alone(model: Model, prompts: dict[int, list[int]], slots: int):
    params = load_params(model, "quantized")   # the kernel's int8 path where it runs
    together = Runner(model, "quantized", params=params, slots=slots, cache_length=64)
    logits = np.asarray(together.prefill_rows({i: (p, 0) for i, p in prompts.items()}))
    for i, p in prompts.items():
        alone = Runner(model, "quantized", params=params, slots=slots, cache_length=64)
        own = np.asarray(alone.prefill(p, slot=i))
        np.testing.assert_array_equal(logits[i], own)
        for a, b in zip(together.cache.k + together.cache.v, alone.cache.k + alone.cache.v):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b[i]))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_batched_prefill_equals_alone(tmp_path, arch):
    """Prompts admitted together are prefilled in one pass; each slot's KV rows and logits are
    bit for bit those of its prompt prefilled alone (what keeps seeded text batch-independent)."""
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch=arch, qtype="Q4_0", n_layers=4))
    rng = np.random.default_rng(8)
    prompts = {0: rng.integers(0, model.config.vocab_size, 5).tolist(),
               2: rng.integers(0, model.config.vocab_size, 19).tolist(),
               3: rng.integers(0, model.config.vocab_size, 2).tolist()}
    _prefill_batched_vs_alone(model, prompts, slots=4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_projections_give_the_same_logits_bit_for_bit(tmp_path, monkeypatch, arch):
    """Quantized layers load with wq/wk/wv and w_gate/w_up fused (runtime/params.fuse_layer)
    where the CPU kernel runs; prefill and decode logits equal the unfused model's exactly."""
    from woolly.runtime import params as params_mod

    if not qmatmul.kernel_groups_weights():
        pytest.skip("the grouped int8 kernel path is not in use here")
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch=arch, qtype="Q4_0", n_layers=2))
    fused = load_params(model, "quantized")
    assert {"wqkv", "w_gate_up"} <= fused["layers"][0].keys() and "wq" not in fused["layers"][0]
    monkeypatch.setattr(params_mod, "FUSED", {})
    plain = load_params(model, "quantized")
    assert "wq" in plain["layers"][0] and plain["layers"][0]["wq"].grouped
    out = []
    for params in (fused, plain):
        r = Runner(model, "quantized", params=params, slots=2, cache_length=64)
        out.append((np.asarray(r.prefill([5, 9, 11, 3, 2, 8])), np.asarray(r.decode([4, 7], [6, -1]))))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_prefill_without_logits_writes_the_same_cache(tmp_path):
    """What the scheduler's admission runs (its logits are never read): no output projection,
    and the cache bit for bit what the prefill with logits writes, alone and batched."""
    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="gemma3", qtype="Q4_0", n_layers=2))
    params = load_params(model, "quantized")
    rows = {0: ([5, 9, 11, 3, 2], 0), 2: (list(range(3, 22)), 0)}
    runs = {}
    for logits in (True, False):
        alone = Runner(model, "quantized", params=params, slots=4, cache_length=64)
        out_alone = alone.prefill(rows[2][0], slot=2, logits=logits)
        batched = Runner(model, "quantized", params=params, slots=4, cache_length=64)
        out_batched = batched.prefill_rows(rows, logits=logits)
        assert (out_alone is None) == (out_batched is None) == (not logits)
        runs[logits] = [np.asarray(c) for c in alone.cache.k + alone.cache.v + batched.cache.k + batched.cache.v]
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_batched_prefill_equals_alone(name):
    model = Model.from_file(name)
    prompts = {1: [1, 504, 3575, 282, 4649, 314], 2: [28, 1030, 5, 77, 3212, 9, 1001, 41, 650, 12, 4, 9999, 30],
               5: [2, 818, 5279, 529]}
    _prefill_batched_vs_alone(model, prompts, slots=8)
