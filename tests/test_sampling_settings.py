"""The sampling settings are declared once (woolly.sampling_settings): the library, the HTTP
schemas and the CLI take and refuse the same values, and the device's columns are settings.

Every bound is read from the declaration, and every surface is checked against it: a bound
changed in one place only would fail here. (The live server's 400s: tests/http/test_sampling_bounds.py.)
"""
from __future__ import annotations

import typing

import msgspec
import pytest

from woolly import sampling_settings as settings
from woolly.cli import build_parser, main
from woolly.engine import DefaultSampler, GenerationParams
from woolly.errors import InvalidRequest
from woolly.http import schemas as S
from woolly.runtime.device_sampling import OFF, SamplingParams
from woolly.sampling_settings import RECENT_WINDOW

NUMERIC = [n for n in settings.NAMES if n not in ("seed", "stop")]


def bounds(name: str) -> msgspec.Meta:
    tp = settings.FIELDS[name].type
    assert typing.get_origin(tp) is typing.Annotated
    return next(m for m in typing.get_args(tp)[1:] if isinstance(m, msgspec.Meta))


def edge_cases(name: str) -> tuple[list, list]:
    """(values at the declared bounds, values just past them) of a numeric setting."""
    m = bounds(name)
    step = 1 if settings.base_type(name) is int else 0.5
    ok, bad = [], []
    if m.ge is not None:
        ok.append(m.ge)
        bad.append(m.ge - step)
    if m.gt is not None:
        ok.append(m.gt + step / 8)
        bad.append(m.gt)
    ok.append(m.le)
    bad.append(m.le + step)
    return ok, bad


CASES = [(n, v, True) for n in NUMERIC for v in edge_cases(n)[0]] + \
        [(n, v, False) for n in NUMERIC for v in edge_cases(n)[1]] + [
    ("repeat_last_n", 300, False), ("repeat_last_n", RECENT_WINDOW, True), ("repeat_last_n", RECENT_WINDOW + 1, False),
    ("seed", settings.MAX_SEED, True), ("seed", settings.MIN_SEED, True), ("seed", settings.MAX_SEED + 1, False),
    ("seed", settings.MIN_SEED - 1, False), ("stop", ["x" * settings.MAX_STOP_CHARS], True),
    ("stop", ["x" * (settings.MAX_STOP_CHARS + 1)], False), ("stop", [""], False),
    ("stop", ["a"] * settings.MAX_STOPS, True),
]


def api_contract_narrows(surface: str, name: str, value) -> bool:
    """Where an API's own documented contract is narrower than the declaration (and says so)."""
    if name == "max_tokens" and value == 0:
        return surface != "library"   # the API refuses a request for nothing (reliability.md)
    narrower = {"temperature": 2.0, "presence_penalty": 2.0, "frequency_penalty": 2.0}   # OpenAI's documented bounds
    return surface == "openai" and name in narrower and abs(value) > narrower[name]


def library_accepts(name, value) -> bool:
    try:
        GenerationParams.from_kwargs(**{name: value})
    except InvalidRequest as e:
        assert name in str(e) and e.details.get("field") == name, e
        return False
    return True


REQUIRED = {S.GenerateRequest: {"prompt": "p"}, S.ChatRequest: {"messages": [{"role": "user", "content": "p"}]},
            S.CompletionRequest: {"prompt": "p"}}


def http_accepts(struct: type, name: str, value, wire_name: str | None = None) -> bool:
    try:
        msgspec.json.decode(msgspec.json.encode({**REQUIRED.get(struct, {}), wire_name or name: value}), type=struct)
    except msgspec.ValidationError as e:
        assert (wire_name or name) in str(e), e
        return False
    return True


def cli_accepts(name, value, capsys) -> bool:
    if name == "stop":
        args = [a for s in value for a in ("--stop", s)]
    else:
        args = [f"--{name.replace('_', '-')}", str(value)]
    try:
        build_parser().parse_args(["run", "model", "prompt", *args])
    except SystemExit as e:
        assert e.code == 2
        assert name in capsys.readouterr().err
        return False
    return True


@pytest.mark.parametrize("name,value,ok", CASES)
def test_the_library_the_http_schemas_and_the_cli_agree(name, value, ok, capsys):
    assert library_accepts(name, value) == (ok and not api_contract_narrows("library", name, value))
    for struct in (S.SamplingFields, S.GenerateRequest, S.ChatRequest):   # the reference's and Ollama's top level
        assert http_accepts(struct, name, value) == (ok and not api_contract_narrows("http", name, value))
    wire = "num_predict" if name == "max_tokens" else name
    assert http_accepts(S.OllamaOptions, name, value, wire) == (ok and not api_contract_narrows("http", name, value))
    assert http_accepts(S.CompletionRequest, name, value) == (ok and not api_contract_narrows("openai", name, value)
                                                         and not api_contract_narrows("http", name, value))
    if name != "stop" or len(value) == 1:   # (a flag holds one stop string; 16 flags: the next test)
        assert cli_accepts(name, value, capsys) == ok


def test_repeat_last_n_past_the_window_is_refused_with_the_same_words_by_library_and_cli(capsys):
    with pytest.raises(InvalidRequest) as lib:
        GenerationParams.from_kwargs(repeat_last_n=RECENT_WINDOW + 44)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m", "p", "--repeat-last-n", str(RECENT_WINDOW + 44)])
    err = capsys.readouterr().err
    assert str(lib.value) in err and f"from 0 to {RECENT_WINDOW}" in str(lib.value)


def test_too_many_stop_flags_are_refused_before_a_model_loads(capsys):
    flags = [a for _ in range(settings.MAX_STOPS + 1) for a in ("--stop", "x")]
    assert main(["run", "no-such-model-file.gguf", "p", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("woolly: error: stop must be") and "no-such-model" not in err


def test_every_setting_has_a_cli_flag_with_the_declared_default_in_its_help():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {a.dest: a for a in run._actions}
    for name in settings.NAMES:
        assert name in flags, name
        if name not in ("seed", "stop", "max_tokens"):   # max_tokens: the CLI's own default, 256
            assert f"default {getattr(settings.DEFAULTS, name)}" in flags[name].help
    args = parser.parse_args(["run", "m", "p"])
    assert args.max_tokens == 256 and all(getattr(args, n) is None for n in settings.NAMES if n != "max_tokens")


def test_every_setting_is_an_http_field_and_an_ollama_option():
    for struct in (S.SamplingFields, S.OpenAIFields, S.OllamaOptions):
        assert set(settings.NAMES) <= set(struct.__struct_fields__), struct
    assert "num_predict" in S.OllamaOptions.__struct_encode_fields__
    body = msgspec.json.decode(b'{"prompt": "p", "top_k": 3, "options": {"num_predict": 5, "top_k": 9, "repeat_last_n": 7}}',
                               type=S.GenerateRequest)
    assert body.options() == {"max_tokens": 5, "top_k": 3, "repeat_last_n": 7}   # the top level wins


def test_defaults_are_llama_cpps_and_the_default_sampler_shares_them():
    p = GenerationParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n) == (0.8, 40, 0.95, 0.05, 1.0, 64)
    sampler = DefaultSampler()
    for name in settings.NAMES:
        if hasattr(sampler, name):
            assert getattr(sampler, name) == getattr(settings.DEFAULTS, name), name


def test_the_device_columns_are_settings_and_their_off_values_are_in_bounds():
    assert set(SamplingParams._fields) <= set(settings.NAMES)
    assert set(OFF) == set(SamplingParams._fields)
    settings.validate(OFF)   # idle slots' values are legal settings
    made = SamplingParams.make(2, top_k=5)
    assert [int(v) for v in made.top_k] == [5, 5] and float(made.repeat_penalty[0]) == 1.0
    with pytest.raises(TypeError):
        SamplingParams.make(1, max_tokens=3)


def test_generation_params_normalizes_like_the_declaration():
    p = GenerationParams(temperature=1, stop="\n", top_k=None)
    assert p.temperature == 1.0 and isinstance(p.temperature, float) and p.stop == ("\n",) and p.top_k == 40
    with pytest.raises(InvalidRequest, match="unknown generation option"):
        GenerationParams.from_kwargs(repeat_last=3)
