"""The C++ attention kernel (woolly/ops/kernels/attention.cc) against the jnp `attend`.

The kernel reads only each query's live rows (s <= p, within the sliding window); `attend`
reads the whole cache and masks. They must agree on every active query; an idle one
(position -1) gets zeros from the kernel. Decode has one query per slot, prefill T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from woolly.ops import attention, cpu_kernels
from woolly.ops.attention import attend, attention_mask, cached_attend

pytestmark = pytest.mark.skipif(not attention.kernel_available(),
                                reason=f"decode-attention kernel unavailable: {attention.kernel_error()}")


def _inputs(B, K, G, S, H, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, 1, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, K, S, H)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((B, K, S, H)), dtype)
    return q, k, v


def _reference(q, k, v, positions, window, scale):
    return attend(q, k, v, attention_mask(positions, k.shape[2], window), scale)


def _kernel(q, k, v, positions, window, scale):
    return jax.jit(lambda *a: attention._kernel_attend(*a, window, scale))(q, k, v, positions)


def _check(q, k, v, pos, window, scale, tol):
    positions = jnp.asarray(pos, jnp.int32).reshape(-1, 1)
    got = np.asarray(_kernel(q, k, v, positions, window, scale))
    ref = np.asarray(_reference(q, k, v, positions, window, scale))
    for b, p in enumerate(pos):
        if p < 0:
            assert np.all(got[b] == 0), "an idle slot's output is zeros"
        else:
            np.testing.assert_allclose(got[b], ref[b], rtol=tol, atol=tol, err_msg=f"slot {b} at {p}")


S = 80   # not a multiple of 16: the last block of rows is partial


@pytest.mark.parametrize("H", [64, 256])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("window", [0, 5, 33])
def test_kernel_matches_attend(H, G, window):
    B, K = 3, 2
    q, k, v = _inputs(B, K, G, S, H, seed=H + G + window)
    for pos in ([-1, 0, S - 1], [S - 1, 17, -1], [1, -1, 40]):
        _check(q, k, v, pos, window, H ** -0.5, 1e-5)


@pytest.mark.parametrize("H", [64, 256])
@pytest.mark.parametrize("G", [1, 3])
def test_kernel_batch_one(H, G):
    q, k, v = _inputs(1, 3, G, S, H, seed=7)
    for p in (0, 15, 16, S - 1):
        for window in (0, 16):
            _check(q, k, v, [p], window, 0.125, 1e-5)


def test_long_cache_splits_over_threads():
    """Enough rows that the kernel cuts each (slot, kv head) into chunks on XLA's pool
    and merges their partial softmaxes."""
    B, K, G, S_, H = 3, 1, 4, 4096, 64
    q, k, v = _inputs(B, K, G, S_, H, seed=3)
    _check(q, k, v, [S_ - 1, 1000, -1], 0, 0.125, 1e-5)
    _check(q, k, v, [S_ - 1, 3000, 2047], 1024, 0.125, 1e-5)
    q, k, v = _inputs(1, 3, 3, S_, H, seed=4)
    _check(q, k, v, [S_ - 2], 0, 0.125, 1e-5)


def test_head_dim_48_and_all_idle():
    q, k, v = _inputs(2, 2, 2, 40, 48, seed=5)
    _check(q, k, v, [39, 3], 0, 0.2, 1e-5)
    _check(q, k, v, [-1, -1], 0, 0.2, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_cache(dtype):
    """f16 / bf16 caches: the kernel widens each value to f32 (attend computes in the cache's type)."""
    q, k, v = _inputs(3, 2, 3, S, 64, seed=6, dtype=dtype)
    positions = jnp.asarray([[S - 1], [-1], [30]], jnp.int32)
    got = np.asarray(_kernel(q, k, v, positions, 0, 0.125))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = np.asarray(_reference(q, f32(k), f32(v), positions, 0, 0.125))
    np.testing.assert_allclose(got[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
    assert np.all(got[1] == 0)


def test_cached_attend_dispatch():
    """cached_attend uses the kernel on CPU, and the masked attend inside xla_only()."""
    q, k, v = _inputs(2, 1, 4, 32, 64, seed=8)
    positions = jnp.asarray([[10], [-1]], jnp.int32)
    f = lambda *a: cached_attend(*a, 0.125, 0)  # noqa: E731
    assert "woolly_decode_attention" in jax.jit(f).lower(q, k, v, positions).as_text()
    with cpu_kernels.xla_only():
        text = jax.jit(lambda *a: cached_attend(*a, 0.125, 0)).lower(q, k, v, positions).as_text()
    assert "woolly_decode_attention" not in text
    np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k, v, positions))[0],
                               np.asarray(_reference(q, k, v, positions, 0, 0.125))[0], rtol=1e-5, atol=1e-5)


def test_grad_through_kernel():
    B, K, G, S_, H = 3, 2, 3, 40, 64
    q, k, v = _inputs(B, K, G, S_, H, seed=9)
    positions = jnp.asarray([[S_ - 1], [12], [-1]], jnp.int32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, K * G, H)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    kern = loss(lambda q, k, v: cached_attend(q, k, v, positions, 0.125, 0))
    ref = loss(lambda q, k, v: attention._masked_reference(q, k, v, positions, 0, 0.125))
    assert "woolly_decode_attention" in jax.jit(kern).lower(q, k, v).as_text()
    got = jax.jit(jax.grad(kern, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[1]).sum()) > 0


# -- the real model: greedy decode through the kernel ------------------------------------------
def _greedy(runner, prompt, n, use_kernel):
    """Greedy tokens and each step's logits, decoded one step at a time in slot 0 (slot 1 idle),
    through a fresh jit (so the trace sees `attention.USE_KERNEL` and qmatmul's settings now)."""
    from woolly.runtime import entry
    from woolly.runtime.cache import new_cache

    cfg = runner.cfg
    old, attention.USE_KERNEL = attention.USE_KERNEL, use_kernel
    try:
        step = jax.jit(lambda p, c, t, q: entry.decode_logits(p, c, t, q, cfg))
        cache = new_cache(cfg, 2, runner.cache_length)
        padded = np.zeros(16, np.int32)
        padded[:len(prompt)] = prompt
        logits, cache = entry.prefill(runner.params, cache, jnp.asarray(padded), jnp.int32(0),
                                      jnp.int32(len(prompt)), jnp.int32(0), cfg=cfg)
        tok, out, rows = int(np.argmax(logits)), [], []
        for i in range(n):
            out.append(tok)
            logits, cache = step(runner.params, cache, jnp.asarray([tok, 0], jnp.int32),
                                 jnp.asarray([len(prompt) + i, -1], jnp.int32))
            rows.append(np.asarray(logits[0]))
            tok = int(np.argmax(rows[-1]))
        return out, np.stack(rows)
    finally:
        attention.USE_KERNEL = old


@pytest.mark.real
def test_smollm2_greedy_tokens_unchanged(smollm2_path, monkeypatch):
    """SmolLM2's greedy tokens are the same through the kernel as through the masked jnp
    attention (and the on-device generate loop agrees); with exact f32 activations in the
    matmuls (the default int8 ones amplify the two attentions' rounding differences) the
    decode logits agree to 1e-4 of their scale."""
    from woolly.model_file import Model
    from woolly.ops import qmatmul
    from woolly.runtime import Runner

    model = Model.from_file(smollm2_path)
    runner = Runner(model, residency="quantized", slots=2, cache_length=128)
    prompt = [504, 3575, 282, 4649, 314, 1530, 30, 378, 3575, 282, 4520, 314]   # token ids
    n = 24
    mine, _ = _greedy(runner, prompt, n, use_kernel=True)
    ref, _ = _greedy(runner, prompt, n, use_kernel=False)
    assert mine == ref
    generated = runner.generate([prompt], max_tokens=n)[0]
    assert generated == mine[:len(generated)]
    monkeypatch.setattr(qmatmul, "ACTIVATIONS", "f32")
    _, got = _greedy(runner, prompt, 4, use_kernel=True)
    _, want = _greedy(runner, prompt, 4, use_kernel=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


# -- the f16 / bf16 cache write ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_cache_write(dtype):
    """The in-place kernel write rounds exactly as astype (to nearest even), drops position -1,
    and serves prefill (T > 1) too."""
    from woolly.ops.attention import write_cache

    B, K, S_, H, T = 3, 2, 24, 32, 5
    rng = np.random.default_rng(11)
    cache = jnp.asarray(rng.standard_normal((B, K, S_, H)), dtype)
    new = rng.standard_normal((B, T, K, H)).astype(np.float32) * 3
    new[0, 0, 0, :3] = [np.nan, np.inf, 1 + 2 ** -9]   # a NaN, an infinity, a tie to even (bf16)
    new = jnp.asarray(new)
    positions = jnp.asarray([[0, 1, 2, -1, -1], [-1, -1, -1, -1, -1], [S_ - 1, 7, 3, 4, S_]], jnp.int32)
    fn = jax.jit(write_cache)
    assert "woolly_cache_write" in fn.lower(cache, new, positions).as_text()
    got = np.asarray(fn(cache, new, positions))
    want = np.asarray(attention._write_reference(cache, new, positions))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    one = jax.jit(write_cache)(cache, new[:, :1], positions[:, :1])     # the decode shape
    np.testing.assert_array_equal(np.asarray(one).view(np.uint16),
                                  np.asarray(attention._write_reference(cache, new[:, :1], positions[:, :1])).view(np.uint16))
    g = jax.grad(lambda n: jnp.sum(write_cache(cache, n, positions).astype(jnp.float32)))(new)
    g_ref = jax.grad(lambda n: jnp.sum(attention._write_reference(cache, n, positions).astype(jnp.float32)))(new)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    assert float(g.sum()) == 7 * K * H   # the rows written: 3 of slot 0, 4 of slot 2 (position S is dropped)


@pytest.mark.parametrize("window", [0, 7])
def test_several_queries_per_slot(window):
    """Prefill-shaped calls: q [B, T, N, H] at positions [B, T] (padding -1) read their own
    slot's rows s <= p; each query's result is the same as when it is alone."""
    B, T, K, G, H, S_ = 2, 6, 2, 3, 64, 48
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((B, T, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, K, S_, H)) * 2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, K, S_, H)), jnp.float32)
    positions = jnp.asarray([[10, 11, 12, 13, -1, -1], [0, 1, 2, 3, 4, 5]], jnp.int32)
    got = np.asarray(_kernel(q, k, v, positions, window, 0.125))
    ref = np.asarray(_reference(q, k, v, positions, window, 0.125))
    live = np.asarray(positions) >= 0
    np.testing.assert_allclose(got[live], ref[live], rtol=1e-5, atol=1e-5)
    assert np.all(got[~live] == 0)
    for b, t in ((0, 2), (1, 5)):   # one query alone against its own slot: bit for bit the same
        alone = np.asarray(_kernel(q[b:b + 1, t:t + 1], k[b:b + 1], v[b:b + 1], positions[b:b + 1, t:t + 1],
                                   window, 0.125))
        np.testing.assert_array_equal(alone[0, 0], got[b, t])


def test_cached_attend_uses_the_kernel_for_prefill():
    q = jnp.zeros((1, 8, 4, 64), jnp.float32)
    k = v = jnp.zeros((1, 2, 32, 64), jnp.float32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    text = jax.jit(lambda *a: cached_attend(*a, 0.125, 0)).lower(q, k, v, positions).as_text()
    assert "woolly_decode_attention" in text
