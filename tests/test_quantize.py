"""quantize_model: outputs load in Woolly and llama.cpp, keep metadata, match llama.cpp's quantizer.

Every target runs on a tiny F32 model (K-quant sized); SmolLM2 is re-quantized to a few
representative types. The RMS error of the weights against the source is printed as a
table per type, and its ordering across types is asserted.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from oracle import llama_cpp_model, open_llama_cpp
from test_malformed_gguf import BOOL, F32, F64, I8, I16, I32, I64, STR, U8, U16, U32, U64, gstr, kv, kv_array, u32, u64, valid_gguf
from tiny_models import write_tiny_model
from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from woolly.formats.gguf_file import GGUFFile
from woolly.formats.quants import QuantizationType as Q
from woolly.model_file import Model
from woolly.quantize import FILE_TYPE, TARGETS, fallback_type, quantize_model

SMOLLM2_TYPES = [Q.Q8_0, Q.Q4_0]
RMS_TABLE: dict[str, dict[str, tuple[float, float]]] = {"tiny": {}, "smollm2": {}}  # type -> (rms error, relative)
CHANGED_KEYS = {"general.file_type", "general.quantization_version"}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> Path:
    """A tiny F32 llama model whose rows all divide into 256-weight blocks."""
    return write_tiny_model(tmp_path_factory.mktemp("src") / "tiny-f32.gguf", qtype=Q.F32, d_model=256,
                            ffn_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)


def run_quantize(src, out: Path, qtype) -> list[float]:
    fractions: list[float] = []
    result = quantize_model(src, out, qtype, progress_callback=fractions.append)
    assert result == out and out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"
    return fractions


def assert_progress(fractions: list[float]) -> None:
    assert len(fractions) >= 3 and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), "progress went backwards"


def assert_metadata_kept(src: GGUFFile, out: GGUFFile, qtype: Q) -> None:
    for key, f in src.fields.items():
        if key in CHANGED_KEYS:
            continue
        g = out.fields[key]
        assert (g.vtype, g.element_type) == (f.vtype, f.element_type), key
        if isinstance(f.value, np.ndarray):
            floats = f.value.dtype.kind == "f"
            assert g.value.dtype == f.value.dtype and np.array_equal(g.value, f.value, equal_nan=floats), key
        else:
            assert g.value == f.value or (isinstance(f.value, float) and math.isnan(f.value) and math.isnan(g.value)), key
    assert [k for k in out.fields if k not in CHANGED_KEYS] == [k for k in src.fields if k not in CHANGED_KEYS]
    ftype = out.fields["general.file_type"]
    assert ftype.value == FILE_TYPE[qtype] and ftype.vtype == U32
    if qtype.is_quantized:
        assert out.fields["general.quantization_version"].value == 2


def weight_rms_error(src: Model, out: Model) -> tuple[float, float]:
    """RMS error over every matrix weight, and that relative to the RMS of the weights."""
    err2 = ref2 = n = 0.0
    for name, info in src.tensors.items():
        if len(info.dims) < 2:
            continue
        a = src.tensor(name).ravel()
        d = a - out.tensor(name).ravel()
        err2 += float(np.dot(d, d))
        ref2 += float(np.dot(a, a))
        n += a.size
    return math.sqrt(err2 / n), math.sqrt(err2 / ref2)


def llama_cpp_last_logits(path: Path, text: bytes = b"The capital of France is", cached: bool = False) -> np.ndarray:
    import llama_cpp

    ll = llama_cpp_model(str(path)) if cached else open_llama_cpp(str(path), n_ctx=64)
    try:
        tokens = ll.tokenize(text, add_bos=True)
        ll.reset()
        ll.eval(tokens)
        ptr = llama_cpp.llama_get_logits_ith(ll._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(ll.n_vocab(),)).copy()
    finally:
        if not cached:
            ll.close()


def check_output(src_path: Path, out_path: Path, qtype: Q, fractions: list[float]) -> tuple[float, float]:
    assert_progress(fractions)
    src, out = Model.from_file(src_path), Model.from_file(out_path)
    out.validate()
    assert_metadata_kept(src.gguf, out.gguf, qtype)
    assert list(out.tensors) == list(src.tensors)
    for name, info in out.tensors.items():
        assert info.dims == src.tensors[name].dims, name
        if len(info.dims) == 1:
            assert info.qtype == Q.F32, name
        else:
            assert info.qtype == fallback_type(qtype, info.dims[0]), name
    return weight_rms_error(src, out)


# -- every target on the tiny model -----------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TARGETS, ids=lambda t: t.name)
def test_every_target_on_a_tiny_model(tmp_path, tiny_f32, qtype):
    out = tmp_path / f"tiny-{qtype.name}.gguf"
    fractions = run_quantize(tiny_f32, out, qtype)
    RMS_TABLE["tiny"][qtype.name] = check_output(tiny_f32, out, qtype, fractions)
    logits = llama_cpp_last_logits(out)
    assert np.isfinite(logits).all() and logits.std() > 0


LLAMA_FTYPE = {Q.Q2_K: 10, Q.Q3_K: 12, Q.Q4_K: 14, Q.Q5_K: 16, Q.Q6_K: 18, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q5_0: 8, Q.Q5_1: 9,
               Q.Q8_0: 7}


def llama_cpp_quantize(src: Path, out: Path, qtype: Q) -> Path:
    """llama.cpp's `llama-quantize --pure --allow-requantize SRC OUT TYPE`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.allow_requantize, params.nthread = LLAMA_FTYPE[qtype], True, True, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", list(LLAMA_FTYPE), ids=lambda t: t.name)
def test_bytes_match_llama_cpp_quantize(tmp_path, tiny_f32, qtype):
    """Every matrix is byte-identical to llama.cpp's `llama-quantize --pure` output."""
    ours = tmp_path / "ours.gguf"
    quantize_model(tiny_f32, ours, qtype)
    theirs = llama_cpp_quantize(tiny_f32, tmp_path / "theirs.gguf", qtype)
    a, b = Model.from_file(ours), Model.from_file(theirs)
    matrices = [n for n, t in a.tensors.items() if len(t.dims) == 2]
    assert matrices
    for name in matrices:
        assert b.tensors[name].qtype == a.tensors[name].qtype == qtype, name
        assert np.array_equal(a.raw(name), b.raw(name)), f"{name} differs from llama.cpp's {qtype.name}"


# -- SmolLM2 for a few representative types ------------------------------------------------------
@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("qtype", SMOLLM2_TYPES, ids=lambda t: t.name)
def test_smollm2_requantized(tmp_path, smollm2_path, qtype):
    out = tmp_path / f"smollm2-{qtype.name}.gguf"
    fractions = run_quantize(smollm2_path, out, qtype)
    RMS_TABLE["smollm2"][qtype.name] = check_output(Path(smollm2_path), out, qtype, fractions)
    assert Model.from_file(out).metadata.quantization == qtype.name
    # llama.cpp runs it, and its next-token logits stay close to the source model's. Q4_0 is
    # "pure" (the tied Q8_0 embeddings become Q4_0 too, on top of the source's Q4_1 error).
    ours, source = llama_cpp_last_logits(out), llama_cpp_last_logits(Path(smollm2_path), cached=True)
    cosine = float(ours @ source / (np.linalg.norm(ours) * np.linalg.norm(source)))
    assert cosine > {Q.F16: 0.999, Q.Q8_0: 0.99, Q.Q4_0: 0.7}[qtype], cosine
    if qtype != Q.Q4_0:
        assert int(np.argmax(ours)) == int(np.argmax(source))
    if qtype in LLAMA_FTYPE:  # and the bytes are what llama.cpp's own re-quantization writes
        theirs = llama_cpp_quantize(Path(smollm2_path), tmp_path / "theirs.gguf", qtype)
        a, b = Model.from_file(out), Model.from_file(theirs)
        for name, info in a.tensors.items():
            if len(info.dims) == 2:
                assert np.array_equal(a.raw(name), b.raw(name)), name


# -- fallbacks -----------------------------------------------------------------------------
@pytest.mark.oracle
def test_rows_that_do_not_divide_fall_back_like_llama_cpp(tmp_path):
    src = write_tiny_model(tmp_path / "odd.gguf", qtype=Q.F32, d_model=64, ffn_dim=256, n_heads=4, n_kv_heads=2)
    out = tmp_path / "odd-q4k.gguf"
    quantize_model(src, out, Q.Q4_K)
    m = Model.from_file(out)
    m.validate()
    assert m.tensors["blk.0.ffn_down.weight"].qtype == Q.Q4_K  # rows of 256
    assert m.tensors["blk.0.attn_q.weight"].qtype == Q.Q5_0     # rows of 64: llama.cpp's Q4_K fallback
    assert m.tensors["token_embd.weight"].qtype == Q.Q5_0
    assert np.isfinite(llama_cpp_last_logits(out)).all()


@pytest.mark.oracle
def test_rows_shorter_than_a_block_fall_back_to_f16(tmp_path):
    src = write_tiny_model(tmp_path / "odd48.gguf", qtype=Q.F32, d_model=48, ffn_dim=96, n_heads=4, n_kv_heads=2)
    out = tmp_path / "odd48-q8.gguf"
    quantize_model(src, out, Q.Q8_0)
    m = Model.from_file(out)
    m.validate()
    assert m.tensors["blk.0.attn_q.weight"].qtype == Q.F16        # 48 is not a multiple of 32
    assert m.tensors["blk.0.ffn_down.weight"].qtype == Q.Q8_0     # 96 is
    assert np.isfinite(llama_cpp_last_logits(out)).all()


def test_fallback_rule():
    assert fallback_type(Q.Q4_K, 512) == Q.Q4_K
    assert fallback_type(Q.Q4_K, 96) == Q.Q5_0
    assert fallback_type(Q.Q5_K, 96) == Q.Q5_1
    assert fallback_type(Q.Q6_K, 96) == Q.Q8_0
    assert fallback_type(Q.Q2_K, 96) == Q.Q4_0
    assert fallback_type(Q.Q6_K, 48) == Q.F16
    assert fallback_type(Q.Q4_0, 48) == Q.F16
    assert fallback_type(Q.F16, 7) == Q.F16


# -- metadata of every GGUF type survives ----------------------------------------------------------
def test_every_metadata_type_is_copied_exactly(tmp_path):
    extra = [
        kv("test.u8", U8, 255), kv("test.i8", I8, -128), kv("test.u16", U16, 65535), kv("test.i16", I16, -32768),
        kv("test.u32", U32, 2**32 - 1), kv("test.i32", I32, -2**31), kv("test.f32", F32, float("nan")),
        kv("test.bool", BOOL, True), kv("test.u64", U64, 2**64 - 1), kv("test.i64", I64, -2**63),
        kv("test.f64", F64, 1e300), kv("test.str", STR, ""),
        ("test.bad_utf8", gstr("test.bad_utf8") + u32(STR) + gstr(b"\xff\xfe\xfd")),
        kv_array("test.empty", I32, []), kv_array("test.empty_str", STR, []),
        kv_array("test.bools", BOOL, [True, False]), kv_array("test.u64s", U64, [0, 2**64 - 1]),
        kv_array("test.f64s", F64, [0.5, -1e-300]), kv_array("test.strs", STR, ["", "é", "a b"]),
        ("test.bad_utf8_list", gstr("test.bad_utf8_list") + u32(9) + u32(STR) + u64(1) + gstr(b"\xc0")),
    ]
    g = valid_gguf()
    g.kvs = g.kvs[:2] + extra + g.kvs[2:]
    src = tmp_path / "types.gguf"
    src.write_bytes(g.build())
    out = tmp_path / "types-q8.gguf"
    quantize_model(src, out, Q.Q8_0)
    a, b = GGUFFile(src), GGUFFile(out)
    assert_metadata_kept(a, b, Q.Q8_0)
    assert b.fields["test.bad_utf8"].value.encode("utf-8", "surrogateescape") == b"\xff\xfe\xfd"
    assert len(b.fields["test.empty"].value) == 0 and b.fields["test.empty"].element_type == I32
    Model.from_file(out).validate()


def test_alignment_is_kept(tmp_path):
    g = valid_gguf()
    g.alignment = 64
    g.kvs = g.kvs + [kv("general.alignment", U32, 64)]
    src = tmp_path / "a64.gguf"
    src.write_bytes(g.build())
    out = tmp_path / "a64-q4.gguf"
    quantize_model(src, out, "q4_0")
    m = Model.from_file(out)
    m.validate()
    assert m.gguf.alignment == 64 and all(t.offset % 64 == 0 for t in m.tensors.values())


def test_output_gets_the_usual_file_mode(tmp_path, tiny_f32):
    """Written through a temporary file, but with the mode a plain open() gives (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "mode.gguf"
    quantize_model(tiny_f32, out, Q.Q8_0)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_same_type_tensors_are_copied_byte_for_byte(tmp_path):
    src = write_tiny_model(tmp_path / "q8.gguf", qtype=Q.Q8_0)
    out = tmp_path / "q8-again.gguf"
    quantize_model(src, out, Q.Q8_0)
    a, b = Model.from_file(src), Model.from_file(out)
    for name in a.tensors:
        assert np.array_equal(a.raw(name), b.raw(name)), name


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_target_is_an_invalid_request(tmp_path, tiny_f32):
    with pytest.raises(InvalidRequest, match="unknown quantization type 'Q9_9'"):
        quantize_model(tiny_f32, tmp_path / "o.gguf", "Q9_9")


def test_every_block_format_is_a_target():
    assert set(TARGETS) == set(Q)


def test_a_type_without_an_encoder_is_an_invalid_request(tmp_path, tiny_f32, monkeypatch):
    monkeypatch.setattr("woolly.quantize.TARGETS", tuple(t for t in TARGETS if t != Q.Q3_K))
    with pytest.raises(InvalidRequest, match="cannot quantize to Q3_K"):
        quantize_model(tiny_f32, tmp_path / "o.gguf", Q.Q3_K)
    assert not (tmp_path / "o.gguf").exists()


def test_missing_input_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound):
        quantize_model(tmp_path / "missing.gguf", tmp_path / "o.gguf", Q.Q8_0)


def test_output_directory_must_exist(tmp_path, tiny_f32):
    with pytest.raises(InvalidRequest, match="does not exist"):
        quantize_model(tiny_f32, tmp_path / "no" / "such" / "o.gguf", Q.Q8_0)
    with pytest.raises(InvalidRequest, match="is a directory"):
        quantize_model(tiny_f32, tmp_path, Q.Q8_0)


def test_malformed_input_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "in" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(valid_gguf().build()[:200])
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(ModelLoadFailed):
        quantize_model(bad, outdir / "o.gguf", Q.Q8_0)
    assert list(outdir.iterdir()) == []


def test_failure_while_writing_keeps_the_old_output(tmp_path, tiny_f32, monkeypatch):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("woolly.quantize.quantize_rows", broken)
    with pytest.raises(Exception) as ei:
        quantize_model(tiny_f32, out, Q.Q4_0)
    assert getattr(ei.value, "code", None) == "INTERNAL_ERROR" and "No space left" in str(ei.value)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]


# -- the table (last, so a full run has both columns) ---------------------------------------
def test_rms_error_ordering_and_table(tmp_path, tiny_f32, capsys):
    """Prints the weight RMS error per type (SmolLM2 column filled when its tests ran first);
    more bits never means more error."""
    tiny = RMS_TABLE["tiny"]
    for qtype in TARGETS:
        if qtype.name not in tiny:
            out = tmp_path / f"{qtype.name}.gguf"
            quantize_model(tiny_f32, out, qtype)
            tiny[qtype.name] = weight_rms_error(Model.from_file(tiny_f32), Model.from_file(out))
    with capsys.disabled():
        print("\n\nweight RMS error against the source (relative to the weights' RMS)")
        print(f"{'type':<6} {'tiny (F32 source)':>24} {'SmolLM2 (Q4_1 source)':>26}")
        for t in TARGETS:
            cells = [f"{c[0]:.3e} ({c[1]:6.2%})" if c else "-" for c in (RMS_TABLE[k].get(t.name) for k in ("tiny", "smollm2"))]
            print(f"{t.name:<6} {cells[0]:>24} {cells[1]:>26}")
    rel = {k: v[1] for k, v in tiny.items()}
    assert rel["F32"] == 0.0
    chain = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    assert all(rel[a] < rel[b] for a, b in zip(chain, chain[1:])), rel
    assert rel["Q5_0"] < rel["Q4_0"] and rel["Q5_1"] < rel["Q4_1"] and rel["Q4_K"] < rel["Q4_0"]
    limits = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q5_1": 0.06, "Q5_K": 0.06,
              "Q4_0": 0.12, "Q4_1": 0.12, "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.45}
    for t, limit in limits.items():
        assert rel[t] < limit, (t, rel[t])
