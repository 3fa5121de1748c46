"""The tiny test models: every block format writes, opens, validates and reads back."""
from __future__ import annotations

import numpy as np
import pytest

from tiny_models import K_QUANTS, write_tiny_model
from woolly.formats.quants import QuantizationType
from woolly.model_file import Model

ALL_TYPES = list(QuantizationType)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_tiny_model_opens_and_validates(tmp_path, arch, qtype):
    path = write_tiny_model(tmp_path / f"{arch}-{qtype.name}.gguf", arch=arch, qtype=qtype)
    m = Model.from_file(path)
    m.validate()
    c = m.config
    assert (c.arch, c.n_layers, c.vocab_size) == (arch, 2, m.vocabulary.size)
    assert c.d_model == (256 if qtype in K_QUANTS else 64)
    assert c.tied_output and "output.weight" not in m.tensors
    for name, t in m.tensors.items():
        expected = QuantizationType.F32 if len(t.dims) == 1 else qtype
        assert t.qtype == expected, name
        w = m.tensor(name)
        assert w.shape == t.shape and np.isfinite(w).all(), name
        if len(t.dims) == 1:
            assert np.abs(w - 1).max() < 0.1, name  # norms near 1
        else:
            assert abs(float(np.std(w)) - 0.02) < 0.004, name  # N(0, 0.02) up to the type's error


def test_tiny_vocabularies_are_consistent(tmp_path):
    bpe = Model.from_file(write_tiny_model(tmp_path / "l.gguf", arch="llama")).vocabulary
    assert bpe.model == "gpt2" and bpe.merges
    tokens = set(bpe.tokens)
    for merge in bpe.merges:  # every merge joins two tokens into a third
        a, b = merge.split(" ")
        assert {a, b, a + b} <= tokens, merge
    assert bpe.tokens[bpe.eos_id] == "<|im_end|>" and "<|im_start|>" in bpe.chat_template

    spm = Model.from_file(write_tiny_model(tmp_path / "g.gguf", arch="gemma3")).vocabulary
    assert spm.model == "llama" and spm.scores is not None and len(spm.scores) == spm.size
    byte_ids = np.flatnonzero(spm.token_types == 6)
    assert [spm.tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert spm.tokens[spm.bos_id] == "<bos>" and "▁the" in spm.tokens


def test_tiny_model_is_deterministic(tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf", seed=3).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", seed=3).read_bytes()
    c = write_tiny_model(tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b and a != c


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("qtype", [QuantizationType.Q8_0, QuantizationType.Q4_K], ids=lambda t: t.name)
def test_llama_cpp_runs_the_tiny_models(tmp_path, arch, qtype):
    import llama_cpp

    from oracle import open_llama_cpp

    ll = open_llama_cpp(str(write_tiny_model(tmp_path / "t.gguf", arch=arch, qtype=qtype)), n_ctx=64)
    try:
        tokens = ll.tokenize(b"Hello the world", add_bos=True)
        assert len(tokens) >= 3
        ll.eval(tokens)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ll._ctx.ctx, -1), shape=(ll.n_vocab(),))
        assert ll.n_vocab() == Model.from_file(tmp_path / "t.gguf").vocabulary.size
        assert np.isfinite(logits).all() and logits.std() > 0
    finally:
        ll.close()
