"""The GGUF reader and Model on the two real models, checked against gguf-py's own reader."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.errors import ModelLoadFailed
from woolly.formats.gguf_file import GGUFFile
from woolly.formats.quants import QuantizationType
from woolly.model_file import Model

EXPECTED = {
    # name: (architecture, blocks, d_model, vocabulary, dominant quantization, heads, kv heads, head dim)
    "smollm2-135m-instruct": ("llama", 30, 576, 49152, "Q4_1", 9, 3, 64),
    "gemma3-270m": ("gemma3", 18, 640, 262144, "Q4_K_M", 4, 1, 256),
}


@pytest.fixture(scope="module")
def reference_readers():
    return {}


def reader_for(cache: dict, path: str) -> gguf.GGUFReader:
    if path not in cache:
        cache[path] = gguf.GGUFReader(path)
    return cache[path]


@pytest.mark.real
@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_model_metadata(name):
    arch, blocks, d, vocab, quant, heads, kv_heads, head_dim = EXPECTED[name]
    m = Model.from_file(name)
    md = m.metadata
    assert (md.architecture, m.architecture) == (arch, arch)
    assert md.quantization == quant
    c = m.config
    assert (c.n_layers, c.d_model, c.vocab_size, c.n_heads, c.n_kv_heads, c.head_dim) == (
        blocks, d, vocab, heads, kv_heads, head_dim)
    assert m.vocabulary.size == vocab and c.tied_output
    assert md.file_size == m.path.stat().st_size
    assert md.parameters == sum(t.n_elements for t in m.tensors.values())
    assert 100e6 < md.parameters < 300e6 and md.license
    m.validate()


@pytest.mark.real
def test_smollm2_dominant_type_is_q4_1_with_q8_0_embeddings(smollm2_path):
    m = Model.from_file(smollm2_path)
    assert m.tensors["token_embd.weight"].qtype == QuantizationType.Q8_0
    assert m.tensors["blk.0.attn_q.weight"].qtype == QuantizationType.Q4_1
    assert m.vocabulary.model == "gpt2" and m.vocabulary.pre == "smollm" and m.vocabulary.chat_template


@pytest.mark.real
def test_gemma_vocabulary_is_sentencepiece(gemma_path):
    v = Model.from_file(gemma_path).vocabulary
    assert v.model == "llama" and v.scores is not None and v.tokens[v.bos_id] == "<bos>"
    assert v.tokens[v.eos_id] == "<eos>" and v.chat_template is None


@pytest.mark.real
def test_metadata_matches_gguf_reader(real_model_path, reference_readers):
    ours = GGUFFile(real_model_path)
    ref = reader_for(reference_readers, real_model_path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, f in ref_fields.items():
        field = ours.fields[key]
        assert field.vtype == int(f.types[0]), key
        want = f.contents()
        if field.element_type is None:
            assert field.value == pytest.approx(want) if isinstance(want, float) else field.value == want, key
        else:
            assert field.element_type == int(f.types[1]), key
            got = field.value if isinstance(field.value, list) else field.value.tolist()
            assert len(got) == len(want) and got[:100] == want[:100] and got[-100:] == want[-100:], key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset


@pytest.mark.real
def test_tensor_infos_and_values_match_gguf_reader(real_model_path, reference_readers):
    m = Model.from_file(real_model_path)
    ref = reader_for(reference_readers, real_model_path)
    assert [t.name for t in ref.tensors] == list(m.tensors)
    for rt in ref.tensors:
        info = m.tensors[rt.name]
        assert info.dims == tuple(int(d) for d in rt.shape), rt.name
        assert int(info.qtype) == int(rt.tensor_type), rt.name
        assert info.offset == rt.data_offset and info.nbytes == rt.n_bytes, rt.name
    # values: every 1-D tensor and the first block's matrices (the full sweep is in test_quants)
    for rt in ref.tensors:
        if len(rt.shape) == 1 or rt.name.startswith("blk.0."):
            want = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(m.tensors[rt.name].shape)
            np.testing.assert_array_equal(m.tensor(rt.name), want, err_msg=rt.name)


def test_raw_is_a_read_only_view_of_the_file(tmp_path):
    path = write_tiny_model(tmp_path / "t.gguf")
    m = Model.from_file(path)
    info = m.tensors["blk.0.attn_q.weight"]
    raw = m.raw(info.name)
    assert raw.shape == (64, 64 // 32 * 34) and not raw.flags.writeable
    with open(path, "rb") as f:
        f.seek(info.offset)
        assert f.read(info.nbytes) == raw.tobytes()


def test_unknown_tensor_name_is_a_model_error(tmp_path):
    m = Model.from_file(write_tiny_model(tmp_path / "t.gguf"))
    with pytest.raises(ModelLoadFailed, match="'nope.weight' is not in the file"):
        m.tensor("nope.weight")


def test_metadata_types_survive(tmp_path):
    """Scalars keep their GGUF type; arrays keep their element type."""
    g = GGUFFile(write_tiny_model(tmp_path / "t.gguf"))
    assert g.fields["llama.block_count"].vtype == 4  # uint32
    assert g.fields["llama.rope.freq_base"].vtype == 6  # float32
    assert g.fields["tokenizer.ggml.tokens"].element_type == 8  # string
    assert g.fields["tokenizer.ggml.token_type"].element_type == 5  # int32
    assert g.fields["tokenizer.ggml.add_bos_token"].value is False
