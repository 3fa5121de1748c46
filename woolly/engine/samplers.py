"""Generation parameters, and the `Sampler` protocol for samplers that run on the host.

`DefaultSampler` is what on-device sampling does (woolly.runtime.device_sampling): its settings
travel to the batched step as per-slot arrays. A sampler with state across steps
(`MirostatSampler`) runs on the host, over that slot's logits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import msgspec
import numpy as np

from woolly.sampling_settings import DEFAULTS, MAX_SEED, MIN_SEED, NAMES, SamplingSettings, validate
from woolly.errors import InvalidRequest

__all__ = ["DefaultSampler", "GenerationParams", "MAX_SEED", "MIN_SEED", "MirostatSampler", "Sampler", "seed32"]


def seed32(seed: int) -> int:
    """A 64-bit seed -> the u32 the device's PRNG keys are made from: its low 32 bits, XORed with a
    bijective mix of its high 32 bits, so seeds that differ only in their high bits draw differently
    (and seeds below 2**32 keep the keys they always had)."""
    s = seed & 0xFFFF_FFFF_FFFF_FFFF
    h = s >> 32                                   # murmur3's finalizer: a bijection on u32 with 0 -> 0
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return (s & 0xFFFFFFFF) ^ (h ^ (h >> 16))


@runtime_checkable
class Sampler(Protocol):
    def sample(self, logits, temperature: float, top_p: float, top_k: int) -> int: ...


@dataclass
class DefaultSampler:
    """llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature; greedy at 0.
    (Given as `sampler=`, its settings become the request's: `GenerationParams.from_kwargs`.)"""

    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    min_p: float = DEFAULTS.min_p
    repeat_penalty: float = DEFAULTS.repeat_penalty
    repeat_last_n: int = DEFAULTS.repeat_last_n
    presence_penalty: float = DEFAULTS.presence_penalty
    frequency_penalty: float = DEFAULTS.frequency_penalty
    seed: int | None = None
    _rng: np.random.Generator = field(default=None, repr=False)

    def sample(self, logits, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None) -> int:
        """Host reference of the on-device chain (no penalties: they need the history)."""
        t = self.temperature if temperature is None else temperature
        p = self.top_p if top_p is None else top_p
        k = self.top_k if top_k is None else top_k
        x = np.asarray(logits, np.float64)
        if t <= 0:
            return int(np.argmax(x))
        order = np.argsort(-x, kind="stable")
        if k > 0:
            order = order[:k]
        probs = np.exp(x[order] - x[order[0]])
        probs /= probs.sum()
        keep = (np.cumsum(probs) - probs) < p
        keep[0] = True
        keep &= probs >= self.min_p * probs[0]
        order = order[keep]
        z = x[order] / t
        w = np.exp(z - z.max())
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return int(order[self._rng.choice(len(order), p=w / w.sum())])


@dataclass
class MirostatSampler:
    """Mirostat (v2 by default, v1 with `version=1`): keeps surprise near `tau` by adapting mu."""

    tau: float = 5.0
    eta: float = 0.1
    mu: float | None = None
    version: int = 2
    m: int = 100          # v1: tokens used to estimate s_hat
    seed: int | None = None
    _rng: np.random.Generator = field(default=None, repr=False)

    def __post_init__(self):
        if self.mu is None:
            self.mu = 2.0 * self.tau
        if self.version not in (1, 2):
            raise InvalidRequest("mirostat version must be 1 or 2")

    def sample(self, logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> int:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        x = np.asarray(logits, np.float64) / max(temperature, 1e-6)
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        if self.version == 2:
            surprise = -np.log2(np.maximum(p, 1e-300))
            n = max(1, int(np.sum(surprise <= self.mu)))
        else:
            m = min(self.m, len(p) - 1)
            t = np.log(np.arange(2, m + 2) / np.arange(1, m + 1))
            b = np.log(p[:m] / np.maximum(p[1:m + 1], 1e-300))
            s_hat = float(np.sum(t * b) / np.sum(t * t))
            eps = s_hat - 1
            k = ((eps * 2 ** self.mu) / (1 - len(p) ** -eps)) ** (1 / s_hat)
            n = int(min(max(k, 1), len(p)))
        q = p[:n] / p[:n].sum()
        i = int(self._rng.choice(n, p=q))
        observed = -math.log2(max(q[i] if self.version == 2 else p[i], 1e-300))
        self.mu -= self.eta * (observed - self.tau)
        return int(order[i])


class GenerationParams(SamplingSettings, kw_only=True, frozen=True):
    """One request's settings, validated on construction; what the scheduler needs per slot.

    The sampling settings, their defaults and bounds are `SamplingSettings`' (one declaration for
    the library, the HTTP API and the CLI); a bad value is an InvalidRequest naming it. None for
    a setting means its default; a single stop string is a one-element tuple.
    """

    sampler: Any = None      # a host-side Sampler; None: on-device DefaultSampler chain
    logprobs: int = 0        # top alternatives to report per token (0: none)
    grammar: Any = None      # a woolly.engine.grammar.Grammar the output must match

    def __post_init__(self):
        settings = validate({n: getattr(self, n) for n in NAMES})
        for n in NAMES:   # the validated values: None -> the default, a stop string -> (string,), 1 -> 1.0
            msgspec.structs.force_setattr(self, n, getattr(settings, n))
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            raise InvalidRequest("logprobs must be an integer from 0 to 20", details={"field": "logprobs"})
        if self.sampler is not None and not isinstance(self.sampler, Sampler):
            raise InvalidRequest("sampler must have a sample(logits, temperature, top_p, top_k) method",
                                 details={"field": "sampler"})
        if self.grammar is not None and not hasattr(self.grammar, "compiled"):
            raise InvalidRequest("grammar must be a woolly.engine.grammar.Grammar", details={"field": "grammar"})

    @classmethod
    def from_kwargs(cls, **kw) -> "GenerationParams":
        """Keyword arguments of `Session.generate`; unknown names are an error, None means default."""
        unknown = set(kw) - set(cls.__struct_fields__)
        if unknown:
            raise InvalidRequest(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        kw = {k: v for k, v in kw.items() if v is not None}
        sampler = kw.get("sampler")
        if isinstance(sampler, DefaultSampler):  # its settings go to the device chain
            for f in dataclasses.fields(DefaultSampler):
                if f.name in NAMES and getattr(sampler, f.name) is not None:
                    kw.setdefault(f.name, getattr(sampler, f.name))
            kw["sampler"] = None
        return cls(**kw)
