"""Samplers and GenerationParams without a model: greedy, filters, seeds, Mirostat's control, validation."""
import math

import numpy as np
import pytest

from woolly.engine import DefaultSampler, GenerationParams, MirostatSampler, Sampler
from woolly.errors import InvalidRequest

RNG = np.random.default_rng(7)
LOGITS = RNG.normal(0, 3, 1000)


def zipf_logits(n=1000, s=1.1):
    return -s * np.log(np.arange(1, n + 1)) + RNG.normal(0, 0.01, n)


def test_both_samplers_satisfy_the_protocol():
    assert isinstance(DefaultSampler(), Sampler) and isinstance(MirostatSampler(), Sampler)


def test_temperature_zero_is_argmax():
    assert DefaultSampler(seed=1).sample(LOGITS, 0.0, 0.9, 40) == int(np.argmax(LOGITS))


def test_top_k_one_and_tiny_top_p_always_pick_argmax():
    s = DefaultSampler(seed=3, min_p=0.0)
    best = int(np.argmax(LOGITS))
    assert {s.sample(LOGITS, 1.5, 1.0, 1) for _ in range(50)} == {best}
    assert {s.sample(LOGITS, 1.5, 1e-6, 0) for _ in range(50)} == {best}


def test_top_k_restricts_draws_to_the_k_best():
    s = DefaultSampler(seed=4, min_p=0.0)
    top5 = set(np.argsort(-LOGITS)[:5].tolist())
    draws = {s.sample(LOGITS, 5.0, 1.0, 5) for _ in range(300)}
    assert draws <= top5 and len(draws) > 1


def test_min_p_drops_tokens_below_its_share_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = DefaultSampler(seed=5, min_p=0.2)        # keeps p >= 0.1
    assert {s.sample(logits, 1.0, 1.0, 0) for _ in range(400)} == {0, 1, 2}


def test_unfiltered_draws_follow_the_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    s = DefaultSampler(seed=6, min_p=0.0)
    n = 4000
    freq = np.bincount([s.sample(logits, 1.0, 1.0, 0) for _ in range(n)], minlength=4) / n
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_a_seed_reproduces_the_draws():
    sa, sb = DefaultSampler(seed=11), DefaultSampler(seed=11)
    a = [sa.sample(LOGITS, 1.0, 0.95, 40) for _ in range(30)]
    assert a == [sb.sample(LOGITS, 1.0, 0.95, 40) for _ in range(30)]
    assert len(set(a)) > 1


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_holds_surprise_near_tau(version):
    tau = 4.0
    s = MirostatSampler(tau=tau, eta=0.1, version=version, seed=0)
    assert s.mu == 2 * tau
    logits = zipf_logits()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    draws = [s.sample(logits) for _ in range(3000)]
    surprise = -np.log2(p[draws[1000:]])
    assert all(0 <= d < len(logits) for d in draws)
    assert abs(surprise.mean() - tau) < 1.0, surprise.mean()
    # the unconstrained distribution's surprise is far from tau, so the control is doing the work
    assert abs(float(-(p * np.log2(p)).sum()) - tau) > 1.0


def test_mirostat_v2_adapts_mu_and_is_reproducible_with_a_seed():
    a, b = MirostatSampler(seed=9), MirostatSampler(seed=9)
    logits = zipf_logits()
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]
    assert a.mu != 10.0


def test_mirostat_rejects_an_unknown_version():
    with pytest.raises(InvalidRequest):
        MirostatSampler(version=3)


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": -1}, {"max_tokens": 1.5}, {"temperature": math.nan}, {"temperature": -0.1},
    {"top_p": math.inf}, {"top_p": 1.5}, {"min_p": -0.1}, {"top_k": -1}, {"repeat_penalty": 0.0},
    {"repeat_last_n": -1}, {"presence_penalty": math.nan}, {"seed": "1"}, {"stop": [""]},
    {"stop": ["x"] * 17}, {"logprobs": 21}, {"sampler": object()}, {"unknown_option": 1},
])
def test_invalid_generation_options_raise_invalid_request(kwargs):
    with pytest.raises(InvalidRequest):
        GenerationParams.from_kwargs(**kwargs)


def test_none_means_default_and_a_single_stop_string_is_a_list():
    p = GenerationParams.from_kwargs(temperature=None, stop="\n")
    assert p.temperature == GenerationParams().temperature and p.stop == ("\n",)


def test_a_default_sampler_becomes_the_device_chain_settings():
    p = GenerationParams.from_kwargs(sampler=DefaultSampler(temperature=0.3, top_k=7, seed=5))
    assert p.sampler is None and (p.temperature, p.top_k, p.seed) == (0.3, 7, 5)
    assert GenerationParams.from_kwargs(sampler=MirostatSampler()).sampler is not None
