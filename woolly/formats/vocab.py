"""The tokenizer's data as a GGUF file gives it: `Vocabulary`, token types, `read_vocabulary`.

Below both the model file and the tokenizers, so neither imports the other for it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from woolly.errors import ModelLoadFailed
from woolly.formats.gguf_file import STRING, GGUFFile, value_type_name

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer's data as the file gives it; ids index `tokens`."""

    model: str                       # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str                         # tokenizer.ggml.pre: the pre-tokenizer's name
    tokens: list[str]
    token_types: np.ndarray          # int32 [V]
    scores: np.ndarray | None        # f32 [V] (SentencePiece)
    merges: list[str] | None         # "a b" pairs in rank order (BPE)
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    extra_eos_ids: tuple[int, ...] = field(default=())  # e.g. eot / <end_of_turn>

    @property
    def size(self) -> int:
        return len(self.tokens)


def _check_utf8(key: str, strings: list[str] | None) -> None:
    """The reader keeps undecodable bytes as surrogates; tokenizers need real UTF-8, so name the entry."""
    if not strings:
        return
    try:
        "".join(strings).encode("utf-8")  # one pass over everything: fast on a 262k vocabulary
    except UnicodeEncodeError:
        for i, s in enumerate(strings):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ModelLoadFailed(f"metadata {key!r} entry #{i} is not valid UTF-8") from None


def read_vocabulary(g: GGUFFile) -> Vocabulary:
    """Read and check the tokenizer arrays: types, equal lengths, ids in range, byte tokens."""

    def array(key: str, etypes: tuple[int, ...], required: bool = True):
        f = g.fields.get(key)
        if f is None:
            if required:
                raise ModelLoadFailed(f"metadata key {key!r} is missing")
            return None
        if f.element_type not in etypes:
            want = " or ".join(value_type_name(e) for e in etypes)
            got = value_type_name(f.vtype) if f.element_type is None else f"array of {value_type_name(f.element_type)}"
            raise ModelLoadFailed(f"metadata {key!r} must be an array of {want}, got {got}")
        return f.value

    def scalar(key: str, kind, default):
        f = g.fields.get(key)
        if f is None:
            return default
        if f.element_type is not None or f.vtype == STRING:
            raise ModelLoadFailed(f"metadata {key!r} has the wrong type ({value_type_name(f.vtype)})")
        return kind(f.value)

    model = g.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise ModelLoadFailed("metadata 'tokenizer.ggml.model' is missing or not a string")
    tokens = array("tokenizer.ggml.tokens", (STRING,))
    n = len(tokens)
    if n == 0:
        raise ModelLoadFailed("the vocabulary is empty")
    types = array("tokenizer.ggml.token_type", (5, 4), required=False)  # int32 (or uint32)
    types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else types.astype(np.int32)
    scores = array("tokenizer.ggml.scores", (6,), required=False)
    merges = array("tokenizer.ggml.merges", (STRING,), required=False)
    for key, arr in (("tokenizer.ggml.token_type", types), ("tokenizer.ggml.scores", scores)):
        if arr is not None and len(arr) != n:
            raise ModelLoadFailed(f"metadata {key!r} has {len(arr)} entries for {n} tokens")
    if model == "gpt2" and merges is None:
        raise ModelLoadFailed("a BPE vocabulary needs 'tokenizer.ggml.merges'")
    template = g.get("tokenizer.chat_template")
    for key, strings in (("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.merges", merges),
                         ("tokenizer.chat_template", [template] if isinstance(template, str) else None)):
        _check_utf8(key, strings)
    for i in np.flatnonzero(types == TOKEN_BYTE):
        t = tokens[i]
        ok = len(t) == 6 and t.startswith("<0x") and t.endswith(">")
        if ok:
            try:
                int(t[3:5], 16)
            except ValueError:
                ok = False
        if not ok or not all(ch in "0123456789abcdefABCDEF" for ch in t[3:5]):
            raise ModelLoadFailed(f"byte token #{i} {t!r} is not of the form <0xHH>")

    def special(name: str) -> int | None:
        v = scalar(f"tokenizer.ggml.{name}_token_id", int, None)
        if v is not None and not 0 <= v < n:
            raise ModelLoadFailed(f"tokenizer.ggml.{name}_token_id {v} is outside the vocabulary of {n}")
        return v

    extra = [special(k) for k in ("eot", "eom")]
    return Vocabulary(
        model=model, pre=str(g.get("tokenizer.ggml.pre", "default")), tokens=tokens, token_types=types,
        scores=None if scores is None else scores.astype(np.float32), merges=merges,
        bos_id=special("bos"), eos_id=special("eos"), unk_id=special("unknown"), pad_id=special("padding"),
        # llama.cpp's defaults when the file is silent: BOS for SentencePiece and the llama3/tekken pre-tokenizers.
        add_bos=scalar("tokenizer.ggml.add_bos_token", bool,
                       model == "llama" or str(g.get("tokenizer.ggml.pre", "")) in ("llama-bpe", "llama3", "tekken")),
        add_eos=scalar("tokenizer.ggml.add_eos_token", bool, False),
        add_space_prefix=scalar("tokenizer.ggml.add_space_prefix", bool, model == "llama"),
        chat_template=template if isinstance(template, str) else None,
        extra_eos_ids=tuple(e for e in extra if e is not None),
    )
