"""Tokenizers against llama.cpp (llama-cpp-python) on the two real models, plus unit checks."""
from __future__ import annotations

import ctypes
import functools
import json
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from oracle import llama_cpp_model
from woolly.errors import InvalidRequest, TokenizerError
from woolly.model import Model
from woolly.tokenizers import BPETokenizer, SentencePieceTokenizer, Tokenizer
from woolly.tokenizers.pretokenize import PRE_TOKENIZER_REGEXES, PreTokenizer


def build_corpus() -> list[str]:
    """Texts covering the scripts and shapes tokenizers get wrong."""
    pieces = [
        "", " ", "  ", "a", "Hello world", "Hello, World! How are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "naïve café résumé Ångström façade Øresund Straße œuvre",
        "日本語のテキストを分割する。中文文本，한국어 텍스트",
        "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️ 🧑🏿‍💻",
        "Ελληνικά κείμενα, Русский текст, العربية نص, עברית טקסט, हिन्दी पाठ ०१२३",
        "   leading", "trailing   ", "a  b   c    d", " " * 40 + "x", "x" + " " * 33,
        "\t", "\ttab\t\ttabs\t\t\t", "\n", "line\nbreak\n\nparagraph\n\n\n\nend", "\r\n windows \r\n",
        " \n \t \n  mixed\u00a0nbsp\u3000ideographic\u2003em space",
        "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
        "for (int i = 0; i < n; ++i) { a[i] = b[i] * 3.14159; }",
        "0 1 12 123 1234 12345 123456789 3.14159 -42 1e-10 1,000,000 ½ ² Ⅻ",
        "https://example.com/path/to/page?query=a%20b&x=1#frag mailto:someone@example.org",
        "I'm you're he's we've they'll she'd it's can't won't Don't I'D",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
        "<bos><eos><pad><unk><|endoftext|> <s></s> <table><tr><td>x</td></tr></table>",
        "text<|im_end|>more<|im_start|><|im_start|>", "<|im_start", "im_start|>", "<<|im_end|>>",
        "!!!???... ---=== +++ $$$ ### @@@ ^^^ ~~~ ||| <<< >>>",
        "MiXeD CaSe WORDS and UPPERCASE ACRONYMS like NASA, HTTP/2, and CUDA12.",
        "\u200b zero\u200dwidth \ufeff bom \u00ad soft-hyphen é (e + combining acute)",
        "ⓐⓑⓒ ＡＢＣ１２３ ｶﾀｶﾅ ﬁ ﬂ ſ",
        "a" * 300, "ab" * 150 + "\n" + "🙂" * 30,
    ]
    pieces.append(" ".join(pieces[4:12]))  # one longer mixed text
    return pieces


CORPUS = build_corpus()
MODELS = ("smollm2-135m-instruct", "gemma3-270m")


@functools.lru_cache(maxsize=None)
def tokenizer(name: str) -> Tokenizer:
    return Model.from_file(name).tokenizer


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(woolly tokenizer, llama.cpp Llama with only the vocabulary loaded) for one model."""
    from woolly.model_store import resolve_model_path

    path = str(resolve_model_path(request.param))
    return tokenizer(request.param), llama_cpp_model(path, vocab_only=True)


def llama_detokenize(llm, ids: list[int], special: bool) -> bytes:
    """llama.cpp's own detokenize (no llama-cpp-python post-processing, no 32-byte piece limit)."""
    import llama_cpp

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, False, special)
    assert n >= 0
    return buf.raw[:n]


# -- against llama.cpp --------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("parse_special", [False, True])
def test_tokenize_matches_llama_cpp(pair, parse_special):
    tok, llm = pair
    wrong = []
    for text in CORPUS:
        ours = tok.tokenize(text, add_bos=False, parse_special=parse_special)
        ref = llm.tokenize(text.encode(), add_bos=False, special=parse_special)
        if ours != ref:
            wrong.append((text, ours, ref))
    assert not wrong, f"{len(wrong)} texts differ, first: {wrong[0]}"


@pytest.mark.real
@pytest.mark.oracle
def test_add_bos_follows_file_like_llama_cpp(pair):
    tok, llm = pair
    for text in ("Hello", "", "<|im_start|>x"):
        assert tok.tokenize(text) == llm.tokenize(text.encode(), add_bos=True, special=False)
    assert tok.tokenize("Hi", add_bos=True)[0] == tok.special_tokens.bos


@pytest.mark.real
@pytest.mark.oracle
def test_decode_matches_llama_cpp(pair):
    tok, llm = pair
    for text in CORPUS:
        ids = tok.tokenize(text, add_bos=False, parse_special=True)
        assert tok.decode_bytes(ids) == llama_detokenize(llm, ids, special=True)
        assert tok.decode_bytes(ids, skip_special=True) == llama_detokenize(llm, ids, special=False)


@pytest.mark.real
@pytest.mark.oracle
def test_end_of_generation_ids_match_llama_cpp(pair):
    import llama_cpp

    tok, llm = pair
    vocab = llm._model.vocab
    ref = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert ref == set(tok.special_tokens.eog)
    assert all(tok.is_eog(i) for i in ref)
    assert tok.special_tokens.bos == llama_cpp.llama_vocab_bos(vocab)
    assert tok.special_tokens.eos == llama_cpp.llama_vocab_eos(vocab)
    assert tok.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)


# -- round trips and streaming ---------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("parse_special", [False, True])
def test_round_trip_corpus(pair, parse_special):
    tok, _ = pair
    for text in CORPUS:
        assert tok.decode(tok.tokenize(text, add_bos=False, parse_special=parse_special)) == text


_single_bytes: dict[int, set[int]] = {}


def encodable_bytes(tok) -> set[int]:
    """Bytes some token stands for alone: text made of others cannot survive (llama.cpp drops them too)."""
    key = id(tok)
    if key not in _single_bytes:
        _single_bytes[key] = {b[0] for i in range(tok.vocab_size) if len(b := tok.token_bytes(i)) == 1}
    return _single_bytes[key]


@pytest.mark.real
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_round_trip_property(pair, text):
    tok, _ = pair
    assume(set(text.encode()) <= encodable_bytes(tok))
    assert tok.decode(tok.tokenize(text, add_bos=False)) == text


@pytest.mark.real
@pytest.mark.oracle
def test_unencodable_bytes_are_dropped_like_llama_cpp(pair):
    tok, llm = pair
    missing = sorted(set(range(256)) - encodable_bytes(tok))
    text = "a\U00040000b\x04c"  # lead byte 0xF1 and byte 0x04: SmolLM2 has no token for either
    assert tok.tokenize(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=False)
    if not missing:
        assert tok.decode(tok.tokenize(text, add_bos=False)) == text


SPECIAL_BITS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "</s>", "<table>",
                "\n\n", "  ", "\t\t", "'ll", "'S", " 123", "0"]


@pytest.mark.real
@pytest.mark.oracle
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(st.characters(blacklist_categories=["Cs"]), st.sampled_from(SPECIAL_BITS)),
                     max_size=30).map("".join), parse_special=st.booleans())
def test_tokenize_property_matches_llama_cpp(pair, text, parse_special):
    tok, llm = pair
    assert tok.tokenize(text, add_bos=False, parse_special=parse_special) == \
        llm.tokenize(text.encode(), add_bos=False, special=parse_special)


@pytest.mark.real
def test_incremental_decoder_never_splits_a_character(pair):
    tok, _ = pair
    text = "Ünïcödé 日本語 👨‍👩‍👧 🇯🇵 𝔘𝔫𝔦 ꙮ done <|im_start|><end_of_turn>"
    ids = tok.tokenize(text, add_bos=False, parse_special=True)
    dec = tok.incremental_decoder(at_start=True)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    quiet = tok.incremental_decoder(skip_special=True)
    assert "".join(quiet.feed(i) for i in ids) + quiet.flush() == tok.decode(ids, skip_special=True)


def single_byte_tokens(tok, data: bytes) -> list[int]:
    """For each byte, a token standing for exactly that byte."""
    by_byte = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if len(b) == 1:
            by_byte.setdefault(b[0], i)
    return [by_byte[b] for b in data]


@pytest.mark.real
def test_incremental_decoder_holds_back_a_split_character(pair):
    tok, _ = pair
    first, second, third = single_byte_tokens(tok, "€".encode())  # 3 bytes: E2 82 AC
    dec = tok.incremental_decoder()
    assert dec.feed(first) == "" and dec.feed(second) == ""
    assert dec.feed(third) == "€"
    assert dec.feed([first, second]) == ""
    assert dec.flush() == "\ufffd"  # the stream ended inside a character
    assert dec.feed(tok.tokenize("ok", add_bos=False)) == "ok"


@pytest.mark.real
def test_long_words_merge_the_same_and_fast(pair):
    tok, llm = pair
    for text in ("ab" * 3000, "x" * 5000 + " y", "日本" * 1000):
        t0 = time.perf_counter()
        ours = tok.tokenize(text, add_bos=False)
        assert time.perf_counter() - t0 < 5
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=False)


# -- special tokens and lookups ---------------------------------------------------------------
@pytest.mark.real
def test_special_tokens_and_lookups():
    smol = tokenizer("smollm2-135m-instruct")
    st_ = smol.special_tokens
    assert st_.control["<|im_start|>"] == smol.piece_to_id("<|im_start|>")
    assert smol.is_eog(smol.piece_to_id("<|im_end|>")) and not smol.is_eog(smol.piece_to_id("<|im_start|>"))
    assert smol.token_to_piece(smol.piece_to_id("Ġthe")) == "Ġthe" and smol.token_bytes(smol.piece_to_id("Ġthe")) == b" the"
    assert smol.piece_to_id("no such piece ever") is None
    gemma = tokenizer("gemma3-270m")
    assert gemma.is_eog(gemma.piece_to_id("<end_of_turn>"))
    assert gemma.token_bytes(gemma.piece_to_id("<0x41>")) == b"A"
    assert gemma.decode([gemma.special_tokens.bos, *gemma.tokenize("hi", add_bos=False)], skip_special=True) == "hi"
    assert isinstance(smol, BPETokenizer) and isinstance(gemma, SentencePieceTokenizer)
    assert isinstance(smol, Tokenizer)


@pytest.mark.real
def test_user_text_with_control_tokens_stays_text_unless_asked():
    tok = tokenizer("smollm2-135m-instruct")
    start = tok.piece_to_id("<|im_start|>")
    assert start not in tok.tokenize("<|im_start|>system", add_bos=False)
    assert tok.tokenize("<|im_start|>system", add_bos=False, parse_special=True)[0] == start
    # spans: only the first occurrence lies inside the trusted range
    ids = tok.tokenize("<|im_start|>x<|im_start|>", add_bos=False, special_spans=[(0, 12)])
    assert ids.count(start) == 1 and ids[0] == start


@pytest.mark.real
def test_bad_input_is_a_clear_error():
    tok = tokenizer("smollm2-135m-instruct")
    with pytest.raises(InvalidRequest):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(InvalidRequest):
        tok.decode([-1])
    with pytest.raises(InvalidRequest):
        tok.tokenize("lone \ud800 surrogate")
    with pytest.raises(InvalidRequest):
        tok.tokenize(b"bytes")  # type: ignore[arg-type]


# -- other sources: vocab.json + merges.txt, SentencePiece .model ---------------------------
@pytest.mark.real
def test_bpe_from_files_matches_gguf(tmp_path):
    ref = tokenizer("smollm2-135m-instruct")
    v = ref.vocabulary
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(v.tokens)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(v.merges) + "\n", encoding="utf-8")
    control = list(ref.special_tokens.control)
    tok = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", pre=v.pre, control_tokens=control)
    for text in CORPUS:
        for special in (False, True):
            assert tok.tokenize(text, parse_special=special) == ref.tokenize(text, add_bos=False, parse_special=special)


def test_bpe_from_dict_merges_lowest_rank_first():
    # bytes as GPT-2 characters: "Ġ" is the space byte
    chars = ["a", "b", "c", "Ġ"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({"ab": 4, "bc": 5, "Ġa": 6, "Ġab": 7, "<|endoftext|>": 8})
    tok = BPETokenizer(vocab, [("b", "c"), "Ġ a", "a b", ("Ġa", "b")])
    assert tok.tokenize("abc") == [0, 5]            # "b c" ranks before "a b"
    assert tok.tokenize(" ab") == [7]
    assert tok.tokenize("<|endoftext|>", parse_special=True) == [8]
    assert tok.special_tokens.eos == 8 and tok.is_eog(8)
    assert tok.decode(tok.tokenize(" abc cab")) == " abc cab"


def test_sentencepiece_from_file(tmp_path):
    import sentencepiece as spm
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(list(topics.values())[:40]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        num_threads=1, minloglevel=2, user_defined_symbols=["<tag>"], remove_extra_whitespaces=False,
    )
    tok = SentencePieceTokenizer.from_file(tmp_path / "m.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    for text in ("Hello world, this is a test.", "def f(x):\n    return x", "naïve 日本 🙂", "a  b"):
        assert tok.tokenize(text, add_bos=False) == sp.encode(text)
        assert tok.decode(tok.tokenize(text, add_bos=False)) == text
        assert tok.decode(tok.tokenize(text), skip_special=True) == text == sp.decode(sp.encode(text))
    assert tok.tokenize("</s>", add_bos=False, parse_special=True) == [sp.eos_id()]
    assert sp.piece_to_id("<tag>") in tok.tokenize("x<tag>y", add_bos=False)
    with pytest.raises(TokenizerError):
        SentencePieceTokenizer.from_file(tmp_path / "missing.model")


# -- other pre-tokenizers and settings, against llama.cpp on rewritten vocabularies -------------
def write_vocab_gguf(src: str, dst, overrides: dict) -> str:
    """A copy of `src`'s metadata (no tensors) with some keys changed: llama.cpp loads it with
    vocab_only, so it tokenizes with e.g. another pre-tokenizer over the same vocabulary."""
    import gguf
    import numpy as np

    from woolly.formats.gguf_file import STRING, GGUFFile
    from woolly.model_store import resolve_model_path

    g = GGUFFile(resolve_model_path(src))
    w = gguf.GGUFWriter(str(dst), g.get("general.architecture"))
    overrides = dict(overrides)
    for key, f in g.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.pop(key, f.value)
        if f.element_type == STRING:
            w.add_array(key, list(value))
        elif f.element_type is not None:
            w.add_key_value(key, np.asarray(value).tolist(), gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType(f.element_type))
        elif f.vtype == STRING:
            w.add_string(key, value)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(f.vtype))
    for key, value in overrides.items():
        (w.add_bool if isinstance(value, bool) else w.add_string)(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g.close()
    return str(dst)


VARIANTS = {
    "gpt-2": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "gpt-2"}),
    "starcoder": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "starcoder"}),
    "llama-bpe": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "llama-bpe"}),
    "qwen2": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "qwen2"}),
    "default": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "default"}),
    "falcon": ("smollm2-135m-instruct", {"tokenizer.ggml.pre": "falcon"}),
    "bpe-add-bos": ("smollm2-135m-instruct", {"tokenizer.ggml.add_bos_token": True}),
    "spm-space-prefix": ("gemma3-270m", {"tokenizer.ggml.add_space_prefix": True}),
}


@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_llama_cpp(variant, tmp_path):
    import llama_cpp

    src, overrides = VARIANTS[variant]
    path = write_vocab_gguf(src, tmp_path / f"{variant}.gguf", overrides)
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    tok = Model.from_file(path).tokenizer
    for special in (False, True):
        for text in CORPUS:
            assert tok.tokenize(text, parse_special=special) == llm.tokenize(text.encode(), add_bos=True, special=special), text
            ids = tok.tokenize(text, add_bos=False, parse_special=special)
            assert tok.decode_bytes(ids) == llama_detokenize(llm, ids, special=True)
    if not tok.vocabulary.add_space_prefix:
        for text in CORPUS:
            assert tok.decode(tok.tokenize(text, add_bos=False, parse_special=True)) == text
    else:  # the space put before text is taken off again (llama.cpp's detokenize with BOS removed)
        for text in ("Hello world", " two spaces", "x"):
            assert tok.decode(tok.tokenize(text), skip_special=True) == text
            assert tok.decode(tok.tokenize(text, add_bos=False)) == text
    llm.close()


# -- pre-tokenizers ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRE_TOKENIZER_REGEXES))
def test_pre_tokenizers_cover_the_text(name):
    pre = PreTokenizer(name)
    for text in CORPUS:
        assert "".join(pre.split(text)) == text


def test_gpt2_pre_tokenizer_splits_like_gpt2():
    assert PreTokenizer("gpt2").split("Hello world's 123  x\n") == ["Hello", " world", "'s", " 123", " ", " x", "\n"]
    assert PreTokenizer("smollm").split("in 2024") == ["in", " ", "2", "0", "2", "4"]
    assert PreTokenizer("llama-bpe").split("12345 HELLO'S") == ["123", "45", " HELLO", "'S"]
    with pytest.raises(TokenizerError):
        PreTokenizer("no-such-pre")


# -- speed (printed, not asserted) --------------------------------------------------------------
def english_text(n_chars: int = 350_000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.oracle
def test_tokenize_speed_vs_llama_cpp(pair):
    tok, llm = pair
    text = english_text()
    data = text.encode()
    tok._cache.clear()  # cold: every word is new to the cache
    t0 = time.perf_counter()
    ours = tok.tokenize(text, add_bos=False)
    t1 = time.perf_counter()
    ref = llm.tokenize(data, add_bos=False, special=False)
    t2 = time.perf_counter()
    assert ours == ref
    print(f"\n{tok.vocabulary.model} vocabulary (pre {tok.vocabulary.pre}): {len(data) / 1e3:.0f} KB, woolly "
          f"{len(data) / (t1 - t0) / 1e6:.2f} MB/s, llama.cpp {len(data) / (t2 - t1) / 1e6:.2f} MB/s")
