"""`woolly info | list | quantize`, in process through `main([...])` and as a real subprocess.

An error is one line on stderr (`woolly: error: ...`), no traceback, exit status 1.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import write_tiny_model
from woolly.cli import main
from woolly.formats.quants import QuantizationType as Q
from woolly.model_file import Model

WOOLLY = [sys.executable, "-m", "woolly.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", arch="gemma3", qtype=Q.Q8_0)


def run_cli(*args: str, env_models: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_models is not None:
        env["WOOLLY_MODELS_DIR"] = str(env_models)
    return subprocess.run(WOOLLY + list(args), capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 1
    assert err.startswith("woolly: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and fragment in err, err


def info_fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


# -- info ---------------------------------------------------------------------------------------
def test_info_on_a_path(tiny, capsys):
    assert main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    f = info_fields(out)
    m = Model.from_file(tiny)
    assert f["name"] == "tiny-gemma3-q8_0" and f["architecture"] == "gemma3" and f["quantization"] == "Q8_0"
    assert f["vocabulary"] == str(m.vocabulary.size)
    assert f["parameters"].replace(",", "") == str(m.metadata.parameters)
    assert "layers 2, d 64, heads 4/2, head dim 16, ffn 128" in out


def test_info_on_a_pulled_name(models, capsys):
    write_tiny_model(models / "tiny-llama.gguf")
    assert main(["info", "tiny-llama"]) == 0
    assert info_fields(capsys.readouterr().out)["architecture"] == "llama"


@pytest.mark.real
def test_info_on_the_real_models(capsys):
    assert main(["info", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert info_fields(out)["quantization"] == "Q4_1" and "layers 30, d 576" in out
    assert main(["info", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert info_fields(out)["vocabulary"] == "262144" and "layers 18, d 640" in out


@pytest.mark.real
def test_info_says_base_or_instruct_on_the_real_models(capsys):
    """smollm2-135m-instruct carries its chat template; gemma3-270m is Google's base 270M
    (general.name 'Gemma 3 270m', no finetune, no template): it chats through the built-in one."""
    assert main(["info", "smollm2-135m-instruct"]) == 0
    f = info_fields(capsys.readouterr().out)
    assert f["kind"].startswith("instruct") and f["chat template"].startswith("the file's")
    assert main(["info", "gemma3-270m"]) == 0
    f = info_fields(capsys.readouterr().out)
    assert f["kind"].startswith("base") and f["chat template"].startswith("built-in gemma3 fallback")


def test_info_says_base_or_instruct_on_tiny_models(tmp_path, tiny, capsys):
    assert main(["info", str(tiny)]) == 0   # gemma3, no template in the file
    f = info_fields(capsys.readouterr().out)
    assert f["kind"] == "base (no chat template in the file and no instruct/chat in its name)"
    assert f["chat template"] == "built-in gemma3 fallback (the file has none)"
    assert main(["info", str(write_tiny_model(tmp_path / "chatml.gguf"))]) == 0   # llama with a ChatML template
    f = info_fields(capsys.readouterr().out)
    assert f["kind"] == "instruct (the file carries a chat template)"
    assert f["chat template"] == "the file's (tokenizer.chat_template)"


def metadata_only_gguf(path: Path, **fields) -> Path:
    """A GGUF with metadata and no tensors: enough for what `model_kind` reads."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key.replace("__", "."), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fields,kind", [
    ({"general__name": "Llama 3.2 1B Instruct"}, "instruct"),
    ({"general__name": "Gemma 3 270m", "general__finetune": "it"}, "instruct"),
    ({"general__name": "Qwen2.5 0.5B", "general__finetune": "base", "tokenizer__chat_template": "{{x}}"}, "base"),
    ({"general__name": "Smollm2 135M", "tokenizer__chat_template": "{{x}}"}, "instruct"),
    ({"general__name": "Mistral 7B v0.1"}, "base"),
    ({"general__name": "Italian Pretrained"}, "base"),   # 'it' only as a whole word
])
def test_model_kind_reads_finetune_name_then_template(tmp_path, fields, kind):
    from woolly.chat_template import model_kind

    m = Model.from_file(metadata_only_gguf(tmp_path / "m.gguf", **fields))
    assert model_kind(m)[0] == kind


def test_chat_with_a_base_model_warns_on_stderr(tiny, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))   # Ctrl-D at the first prompt
    assert main(["chat", str(tiny), "--ctx", "64"]) == 0
    err = capsys.readouterr().err
    assert "woolly: warning: tiny looks like a base model (no chat template in the file" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", str(write_tiny_model(tmp_path / "chatml.gguf")), "--ctx", "64"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_server_logs_a_base_model_chat_once(tiny, tmp_path, caplog):
    """`chat_prompt_ids` is what /api/chat and /v1/chat/completions both render through."""
    from woolly.http.chat import chat_prompt_ids
    from woolly.http.schemas import ChatMessage

    messages = [ChatMessage(role="user", content="hi")]
    base = Model.from_file(tiny)
    with caplog.at_level("WARNING", logger="woolly"):
        chat_prompt_ids(base, messages)
        chat_prompt_ids(base, messages)
        chat_prompt_ids(Model.from_file(write_tiny_model(tmp_path / "chatml.gguf")), messages)
    warned = [r.getMessage() for r in caplog.records if "looks like a base model" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("tiny looks like a base model")


@pytest.mark.parametrize("spec,fragment", [
    ("missing.gguf", "model file not found: missing.gguf"),
    ("../escape", "invalid model name"),
    ("/etc/passwd", "invalid model name"),
    ("no-such-model", "'no-such-model' is not available"),
])
def test_info_errors_are_one_line(models, capsys, spec, fragment):
    code = main(["info", spec])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_info_on_a_malformed_file_is_one_line(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny.read_bytes()[:1000])
    assert_one_line_error(main(["info", str(bad)]), capsys.readouterr().err, "more than the file could hold")


# -- list ---------------------------------------------------------------------------------------
def test_list(models, capsys):
    write_tiny_model(models / "mine.gguf")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "SIZE", "STATUS"]
    assert any(line.startswith("mine ") and line.rstrip().endswith("pulled") for line in out.splitlines())


# -- quantize -------------------------------------------------------------------------------------
def test_quantize(tmp_path, tiny, capsys):
    out = tmp_path / "q4.gguf"
    assert main(["quantize", str(tiny), str(out), "--type", "q4_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    m = Model.from_file(out)
    m.validate()
    assert m.metadata.quantization == "Q4_0" and m.tensors["blk.0.attn_q.weight"].qtype == Q.Q4_0


@pytest.mark.parametrize("qtype,fragment", [("Q9_9", "unknown quantization type 'Q9_9'"),
                                            ("IQ2_XXS", "unknown quantization type 'IQ2_XXS'"), ("", "unknown quantization type")])
def test_quantize_bad_type_is_one_line(tmp_path, tiny, capsys, qtype, fragment):
    code = main(["quantize", str(tiny), str(tmp_path / "o.gguf"), "-t", qtype])
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not (tmp_path / "o.gguf").exists()


def test_quantize_missing_input_is_one_line(tmp_path, capsys):
    code = main(["quantize", str(tmp_path / "in.gguf"), str(tmp_path / "o.gguf"), "-t", "Q8_0"])
    assert_one_line_error(code, capsys.readouterr().err, "model file not found: in.gguf")


# -- as a subprocess ------------------------------------------------------------------------------
def test_subprocess_info_and_quantize(tmp_path, tiny, models):
    r = run_cli("info", str(tiny), env_models=models)
    assert r.returncode == 0 and info_fields(r.stdout)["architecture"] == "gemma3", r.stderr
    out = tmp_path / "q2k.gguf"
    r = run_cli("quantize", str(tiny), str(out), "--type", "Q2_K", env_models=models)
    assert r.returncode == 0 and out.is_file(), r.stderr
    # tiny's rows of 64 cannot hold 256-weight blocks: llama.cpp's fallback for Q2_K applies
    assert Model.from_file(out).tensors["blk.0.attn_q.weight"].qtype == Q.Q4_0


def test_subprocess_error_is_one_line_exit_1(tmp_path, models):
    r = run_cli("info", str(tmp_path / "nope.gguf"), env_models=models)
    assert_one_line_error(r.returncode, r.stderr, "model file not found: nope.gguf")
    assert r.stdout == ""
    r = run_cli("quantize", str(tmp_path / "nope.gguf"), str(tmp_path / "o.gguf"), "-t", "bogus", env_models=models)
    assert_one_line_error(r.returncode, r.stderr, "unknown quantization type 'bogus'")


def test_subprocess_list(models):
    write_tiny_model(models / "listed.gguf")
    r = run_cli("list", env_models=models)
    assert r.returncode == 0 and "listed" in r.stdout and "smollm2-135m-instruct" in r.stdout


def test_an_unusable_models_directory_is_one_line(tmp_path):
    """An OSError from a path the user gave (here WOOLLY_MODELS_DIR under a file) is one line too."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("pull", "smollm2-135m-instruct", env_models=blocker / "models")
    assert_one_line_error(r.returncode, r.stderr, "Not a directory")


def test_parallel_settings_from_env_and_yaml(tmp_path):
    from woolly.config import load_config
    from woolly.errors import InvalidRequest

    cfg = load_config(env={"WOOLLY_TENSOR_PARALLEL": "2", "WOOLLY_DATA_PARALLEL": "3"})
    assert (cfg.inference.tensor_parallel, cfg.inference.data_parallel) == (2, 3)
    y = tmp_path / "w.yaml"
    y.write_text("inference:\n  tensor_parallel: 4\n")
    assert load_config(y, env={}).inference.tensor_parallel == 4
    with pytest.raises(InvalidRequest, match="tensor_parallel"):
        load_config(env={"WOOLLY_TENSOR_PARALLEL": "0"})
