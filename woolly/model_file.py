"""`Model`: a GGUF file opened for use — metadata, vocabulary, config, tensors (host side)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from woolly.arch import ModelConfig
from woolly.errors import ModelLoadFailed
from woolly.formats.gguf_file import GGUFFile, TensorInfo
from woolly.formats.quants import FILE_TYPE_NAMES, dequantize
from woolly.formats.vocab import Vocabulary, read_vocabulary


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
        from woolly.models.families import read_config  # JAX loads with the forward pass, not on import

        def tensor(name: str):  # a hyperparameter kept as a tensor (rope_freqs.weight), f32
            return self.tensor(name) if name in self.tensors else None

        return read_config(self.architecture, self.gguf.get, vocab_size, tied, tensor)

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
