"""Generation parameters, and the `Sampler` protocol for samplers that run on the host.

`DefaultSampler` is what on-device sampling does (woolly.runtime.device_sampling): its settings
travel to the batched step as per-slot arrays. A sampler with state across steps
(`MirostatSampler`) runs on the host, over that slot's logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from woolly.errors import InvalidRequest

MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1   # any 64-bit seed, signed or unsigned (taken mod 2**64)


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
    """llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature; greedy at 0."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
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


@dataclass(frozen=True)
class GenerationParams:
    """One request's settings, validated once; what the scheduler needs per slot."""

    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    sampler: object | None = None    # a host-side Sampler; None: on-device DefaultSampler chain
    logprobs: int = 0                # top alternatives to report per token (0: none)
    grammar: object | None = None    # a woolly.engine.grammar.Grammar the output must match

    def __post_init__(self):
        def bad(msg):
            raise InvalidRequest(msg)

        if not isinstance(self.max_tokens, int) or not 0 <= self.max_tokens <= 1 << 20:
            bad(f"max_tokens must be an integer between 0 and {1 << 20}")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number")
        if self.temperature < 0 or self.temperature > 100:
            bad("temperature must be between 0 and 100")
        if not 0 <= self.top_p <= 1 or not 0 <= self.min_p <= 1:
            bad("top_p and min_p must be between 0 and 1")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= 1 << 20:
            bad("top_k must be an integer >= 0")
        if self.repeat_penalty <= 0 or self.repeat_penalty > 100:
            bad("repeat_penalty must be in (0, 100]")
        if abs(self.presence_penalty) > 100 or abs(self.frequency_penalty) > 100:
            bad("presence_penalty and frequency_penalty must be within [-100, 100]")
        if not isinstance(self.repeat_last_n, int) or not 0 <= self.repeat_last_n <= 4096:
            bad("repeat_last_n must be between 0 and 4096")
        if self.seed is not None and (not isinstance(self.seed, int) or not MIN_SEED <= self.seed <= MAX_SEED):
            bad(f"seed must be a 64-bit integer (between {MIN_SEED} and {MAX_SEED})")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            bad("logprobs must be between 0 and 20")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s or len(s) > 512 for s in self.stop):
            bad("stop must be at most 16 non-empty strings of at most 512 characters")
        if self.sampler is not None and not isinstance(self.sampler, Sampler):
            bad("sampler must have a sample(logits, temperature, top_p, top_k) method")
        if self.grammar is not None and not hasattr(self.grammar, "compiled"):
            bad("grammar must be a woolly.engine.grammar.Grammar")

    @classmethod
    def from_kwargs(cls, **kw) -> "GenerationParams":
        """Keyword arguments of `Session.generate`; unknown names are an error, None means default."""
        known = set(cls.__dataclass_fields__)
        unknown = set(kw) - known
        if unknown:
            raise InvalidRequest(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        kw = {k: v for k, v in kw.items() if v is not None}
        if isinstance(kw.get("stop"), str):
            kw["stop"] = (kw["stop"],)
        if "stop" in kw:
            kw["stop"] = tuple(kw["stop"])
        sampler = kw.get("sampler")
        if isinstance(sampler, DefaultSampler):  # its settings go to the device chain
            for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                         "presence_penalty", "frequency_penalty", "seed"):
                if getattr(sampler, name) is not None:
                    kw.setdefault(name, getattr(sampler, name))
            kw["sampler"] = None
        return cls(**kw)
