"""`Model`: a GGUF file opened for use — metadata, vocabulary, config, tensors (host side)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from woolly.arch import ModelConfig, read_config
from woolly.errors import ModelLoadFailed
from woolly.formats.gguf_file import STRING, GGUFFile, TensorInfo, value_type_name
from woolly.formats.quants import FILE_TYPE_NAMES, QuantizationType, dequantize

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    author: str | None
    description: str | None
    license: str | None
    parameters: int          # number of weights over all tensors
    quantization: str        # e.g. "Q4_1", "Q4_K_M"
    file_size: int           # bytes
    architecture: str = ""
    context_length: int = 0


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


def _text(v) -> str | None:
    return v if isinstance(v, str) and v else None


class Model:
    """A memory-mapped GGUF model. Cheap to open; tensors are read on demand."""

    def __init__(self, gguf: GGUFFile, name: str | None = None):
        self.gguf = gguf
        self.path = gguf.path
        self.name = name or gguf.path.stem
        arch = gguf.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadFailed("metadata 'general.architecture' is missing or not a string")
        self.architecture = arch

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> "Model":
        """Open a GGUF file (or a pulled model's name) memory-mapped; raises WoollyError."""
        from woolly.model_store import resolve_model_path

        p = resolve_model_path(path)
        return cls(GGUFFile(p), name=name or (str(path) if not str(path).endswith(".gguf") else None))

    # -- what the file says ----------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.gguf.tensors

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return read_vocabulary(self.gguf)

    @cached_property
    def config(self) -> ModelConfig:
        tied = "output.weight" not in self.tensors
        emb = self.tensors.get("token_embd.weight")
        vocab_size = emb.dims[1] if emb is not None and len(emb.dims) == 2 else self.vocabulary.size
        return read_config(self.architecture, self.gguf.get, vocab_size, tied)

    @cached_property
    def metadata(self) -> ModelMetadata:
        g = self.gguf
        ftype = g.get("general.file_type")
        quant = FILE_TYPE_NAMES.get(ftype) if isinstance(ftype, int) else None
        if quant is None:  # the type holding most bytes among matrices
            by_bytes = Counter()
            for t in self.tensors.values():
                if len(t.dims) >= 2:
                    by_bytes[t.qtype.name] += t.nbytes
            quant = by_bytes.most_common(1)[0][0] if by_bytes else "F32"
        ctx = g.get(f"{self.architecture}.context_length")
        return ModelMetadata(
            name=str(g.get("general.name", self.name)),
            author=_text(g.get("general.author", g.get("general.organization"))),
            description=_text(g.get("general.description")),
            license=_text(g.get("general.license")),
            parameters=sum(t.n_elements for t in self.tensors.values()),
            quantization=quant,
            file_size=g.file_size,
            architecture=self.architecture,
            context_length=int(ctx) if isinstance(ctx, int) else 0,
        )

    @property
    def tokenizer(self):
        """The tokenizer this file's vocabulary calls for (BPE or SentencePiece)."""
        if "_tokenizer" not in self.__dict__:
            from woolly.tokenizers import tokenizer_from_vocabulary

            self.__dict__["_tokenizer"] = tokenizer_from_vocabulary(self.vocabulary)
        return self.__dict__["_tokenizer"]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the file's chat template (sandboxed) or the family's built-in one."""
        from woolly.chat_template import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt)

    # -- tensors ---------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor, uint8 [rows..., row_bytes], a view into the file."""
        self._require(name)
        return self.gguf.raw(name)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, numpy order (GGUF dims reversed)."""
        self._require(name)
        t = self.tensors[name]
        return dequantize(self.gguf.raw(name), t.qtype, t.shape)

    def _require(self, name: str) -> None:
        if name not in self.tensors:
            raise ModelLoadFailed(f"tensor {name!r} is not in the file")

    def validate(self) -> None:
        """Check every tensor the architecture needs, and the vocabulary; raise naming the problem."""
        cfg = self.config
        vocab = self.vocabulary
        if cfg.n_layers > len(self.tensors):  # before listing every expected name: block_count may be 2^31-1
            raise ModelLoadFailed(
                f"{cfg.arch}.block_count {cfg.n_layers} is more than the file's {len(self.tensors)} tensors could hold")
        if vocab.size != cfg.vocab_size:
            raise ModelLoadFailed(f"the vocabulary has {vocab.size} tokens but token_embd has {cfg.vocab_size} rows")
        for name, dims in cfg.expected_tensors().items():
            t = self.tensors.get(name)
            if t is None:
                raise ModelLoadFailed(f"tensor {name!r} is missing")
            if t.dims != dims:
                raise ModelLoadFailed(f"tensor {name!r} has shape {list(t.dims)}, expected {list(dims)}")

    def release_pages(self) -> None:
        """Give back the resident pages of the mapped file (after the weights are copied out);
        the model stays usable, pages fault back in on the next read."""
        self.gguf.release_pages()

    def close(self) -> None:
        self.gguf.close()

    def __repr__(self) -> str:
        m = self.metadata
        return f"Model({self.name!r}, {self.architecture}, {m.parameters / 1e6:.0f}M params, {m.quantization})"
