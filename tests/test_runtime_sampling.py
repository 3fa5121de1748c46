"""Sampling on device: each filter against a direct numpy statement of what it keeps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from woolly.runtime.device_sampling import SamplingParams, apply_penalties, sample

V = 12
LOGITS = jnp.asarray(np.random.default_rng(0).normal(0, 2, (1, V)), jnp.float32)   # [1, V]
NO_RECENT = jnp.full((1, 4), -1, jnp.int32)


@jax.jit
def _draw_many(logits, keys, params, recent):
    B = logits.shape[0]
    return jax.vmap(lambda k: sample(logits, jax.random.split(k, B), params, recent))(keys)   # [n, B]


def draws(params: SamplingParams, n: int = 400, logits=LOGITS, recent=NO_RECENT) -> np.ndarray:
    """n independent draws -> [n] for one slot, [n, B] for several."""
    out = np.asarray(_draw_many(logits, jax.random.split(jax.random.PRNGKey(0), n), params, recent))
    return out[:, 0] if out.shape[1] == 1 else out


def test_greedy_is_argmax():
    assert set(draws(SamplingParams.make(1))) == {int(LOGITS.argmax())}


def test_temperature_one_follows_softmax():
    counts = np.bincount(draws(SamplingParams.make(1, temperature=1.0), n=4000), minlength=V) / 4000
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    print("max |frequency - p| =", np.abs(counts - probs).max())
    assert np.abs(counts - probs).max() < 0.03


def test_top_k_keeps_the_k_best():
    best3 = set(np.argsort(-np.asarray(LOGITS[0]))[:3].tolist())
    got = set(draws(SamplingParams.make(1, temperature=5.0, top_k=3)).tolist())
    assert got == best3


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    order = np.argsort(-probs)
    cum_before = np.cumsum(probs[order]) - probs[order]
    for top_p in (0.3, 0.6, 0.9):
        keep = set(order[cum_before < top_p].tolist())
        for top_k in (0, 100):  # 0: whole-vocabulary sort; 100 > V: the candidate path
            got = set(draws(SamplingParams.make(1, temperature=5.0, top_p=top_p, top_k=top_k)).tolist())
            assert got == keep, (top_p, top_k)


def test_min_p_keeps_tokens_near_the_best():
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    keep = set(np.flatnonzero(probs >= 0.2 * probs.max()).tolist())
    assert set(draws(SamplingParams.make(1, temperature=5.0, min_p=0.2)).tolist()) == keep


def test_penalties_follow_llama_cpp():
    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.5]])
    recent = jnp.asarray([[0, 1, 1, -1]])
    out = apply_penalties(logits, recent, SamplingParams.make(1, repeat_penalty=2.0, presence_penalty=0.25,
                                                              frequency_penalty=0.5))
    # token 0 seen once: 2/2 - 0.5 - 0.25; token 1 seen twice: -2*2 - 1.0 - 0.25; others untouched
    np.testing.assert_allclose(np.asarray(out[0]), [0.25, -5.25, 1.0, 0.5])


def test_slots_sample_independently():
    logits = jnp.concatenate([LOGITS, -LOGITS])                                        # [2, V]
    params = SamplingParams.make(2, temperature=jnp.asarray([0.0, 5.0]), top_k=jnp.asarray([0, 2]))
    got = draws(params, logits=logits, recent=jnp.full((2, 4), -1, jnp.int32))           # [n, 2]
    assert set(got[:, 0].tolist()) == {int(LOGITS.argmax())}                             # greedy
    assert set(got[:, 1].tolist()) == set(np.argsort(np.asarray(LOGITS[0]))[:2].tolist())  # top 2 of -LOGITS


def test_blocked_argmax_and_top_k_equal_xla_with_ties():
    """The blocked search over a large vocabulary gives lax.top_k's and argmax's exact answers,
    ties (lower id first) included."""
    from woolly.runtime import device_sampling as S

    rng = np.random.default_rng(3)
    for V in (49152, 262144 // 4, 1000, 4096 * 3):
        x = rng.standard_normal((4, V)).astype(np.float32)
        x[1] = np.round(x[1] * 4) / 4             # many ties everywhere
        x[2, ::7] = x[2].max()                     # ties at the maximum
        x[3, :] = 1.0                              # all equal
        x = jnp.asarray(x)
        np.testing.assert_array_equal(np.asarray(S.argmax(x)), np.asarray(jnp.argmax(x, -1)))
        v1, i1 = S.top_k(x, 128)
        v2, i2 = jax.lax.top_k(x, 128)
        np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
        np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
