"""The sampling settings, declared once: each one's name, type, default (llama.cpp's) and bounds.

Everything else is derived from `SamplingSettings`: the HTTP request fields (woolly.http.schemas,
all optional), `GenerationParams`' validation (woolly.engine.samplers), the CLI's flags
(woolly.cli) and, for the settings the device applies, the scheduler's packed step columns
(woolly.runtime.device_sampling.SamplingParams names those). A bound is changed here or nowhere.
"""
from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from woolly.errors import InvalidRequest

MAX_TOKENS = 1 << 20
RECENT_WINDOW = 256   # tokens of history the device keeps per slot for the penalties: repeat_last_n's top
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1   # any 64-bit seed, signed or unsigned (taken mod 2**64)
MAX_STOPS, MAX_STOP_CHARS = 16, 512

Seed = Annotated[int, Meta(ge=MIN_SEED, description="a 64-bit seed, signed or unsigned; none: a random one")]
# (msgspec's bounds stop at int64's: the unsigned top is checked in __post_init__, `check_seed`)
Stop = Annotated[tuple[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)], ...],
                 Meta(max_length=MAX_STOPS)]


def check_seed(seed: int | None) -> None:
    """In a struct's __post_init__: msgspec reports the ValueError as a validation error."""
    if seed is not None and seed > MAX_SEED:
        raise ValueError(f"seed must be at most 2**64-1 ({MAX_SEED}), got {seed}")


class SamplingSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One request's sampling settings, with llama.cpp's defaults."""

    max_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS, description="tokens to generate at most")] = 128
    temperature: Annotated[float, Meta(ge=0.0, le=100.0, description="softmax temperature; 0: greedy")] = 0.8
    top_p: Annotated[float, Meta(ge=0.0, le=1.0, description="nucleus: smallest set with this mass; 1: off")] = 0.95
    top_k: Annotated[int, Meta(ge=0, le=MAX_TOKENS, description="the k likeliest tokens only; 0: off")] = 40
    min_p: Annotated[float, Meta(ge=0.0, le=1.0, description="drop tokens below min_p times the top one's "
                                                              "probability; 0: off")] = 0.05
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=100.0, description="divide recent tokens' logits by "
                                                                        "this; 1: off")] = 1.0
    repeat_last_n: Annotated[int, Meta(ge=0, le=RECENT_WINDOW, description="recent tokens the penalties "
                                                                           "look at; 0: none")] = 64
    presence_penalty: Annotated[float, Meta(ge=-100.0, le=100.0, description="subtracted from recent "
                                                                             "tokens' logits; 0: off")] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-100.0, le=100.0, description="subtracted per recent "
                                                                              "occurrence; 0: off")] = 0.0
    seed: Seed | None = None
    stop: Stop | str = ()

    def __post_init__(self):
        check_seed(self.seed)


NAMES: tuple[str, ...] = SamplingSettings.__struct_fields__
DEFAULTS = SamplingSettings()
FIELDS: dict[str, msgspec.structs.FieldInfo] = {f.name: f for f in msgspec.structs.fields(SamplingSettings)}


def _meta(name: str) -> tuple[type, Meta | None]:
    """A setting's base type (int, float, ...) and its bounds, through Optional and Annotated."""
    tp = FIELDS[name].type
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Annotated:
        base, *extra = typing.get_args(tp)
        return base, next((m for m in extra if isinstance(m, Meta)), None)
    return tp, None


def base_type(name: str) -> type:
    """int, float, ... (stop: str, one of its strings)."""
    return str if name == "stop" else _meta(name)[0]


def expectation(name: str) -> str:
    """What a setting must be, in words from its declaration ("an integer from 0 to 256")."""
    if name == "seed":
        return f"a 64-bit integer, from {MIN_SEED} to {MAX_SEED}"
    if name == "stop":
        return f"a string or at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"
    base, meta = _meta(name)
    kind = "an integer" if base is int else "a number"
    if meta is None:
        return kind
    def num(x):
        return str(int(x)) if float(x).is_integer() else f"{x:g}"
    lo = f"above {num(meta.gt)}" if meta.gt is not None else f"from {num(meta.ge)}" if meta.ge is not None else ""
    hi = f"to {num(meta.le)}" if meta.le is not None else f"below {num(meta.lt)}" if meta.lt is not None else ""
    if meta.gt is not None and meta.le is not None:
        return f"{kind} {lo} and at most {num(meta.le)}"
    return " ".join(w for w in (kind, lo, hi) if w)


def description(name: str) -> str:
    _, meta = _meta(name)
    return meta.description if meta is not None and meta.description else {"stop": "a stop string"}.get(name, name)


_AT = re.compile(r"at `\$\.(\w+)")


def validate(values: dict[str, Any]) -> SamplingSettings:
    """values (any subset of the settings, None meaning the default) -> SamplingSettings, its stop a
    tuple; a bad value or an unknown name is an InvalidRequest naming the setting."""
    given = values = {k: v for k, v in values.items() if v is not None}
    if isinstance(values.get("stop"), str):
        values = dict(values)
        values["stop"] = (values["stop"],)
    unknown = set(values) - set(NAMES)
    if unknown:
        raise InvalidRequest(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
    seed = values.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed > MAX_SEED:   # past msgspec's int64 bounds
        raise InvalidRequest(f"seed must be {expectation('seed')} (got {seed})", details={"field": "seed"})
    try:
        return msgspec.convert(values, SamplingSettings)
    except msgspec.ValidationError as e:
        m = _AT.search(str(e))
        name = m.group(1) if m else None
        if name not in FIELDS:
            raise InvalidRequest(f"invalid sampling settings: {e}") from None
        got = repr(given[name])
        got = got if len(got) <= 60 else got[:57] + "..."
        raise InvalidRequest(f"{name} must be {expectation(name)} (got {got})",
                             details={"field": name}) from None


def optional_fields(overrides: dict[str, Any] | None = None, rename: dict[str, str] | None = None,
                    names: tuple[str, ...] = NAMES) -> list[tuple]:
    """The settings as msgspec.defstruct fields of a request body: each optional (None: the engine's
    default), with its declared type unless overrides gives another; rename: the name a setting
    has on the wire (Ollama's num_predict)."""
    overrides, rename = overrides or {}, rename or {}
    out = []
    for name in names:
        tp = overrides.get(name, FIELDS[name].type)
        out.append((name, typing.Optional[tp], msgspec.field(default=None, name=rename.get(name))))
    return out
