"""Tokenizers: text <-> token ids exactly as llama.cpp does it for the same vocabulary.

    tok = model.tokenizer                      # picked by tokenizer.ggml.model
    ids = tok.tokenize("Hello", parse_special=False)
    tok.decode(ids) == "Hello"
    dec = tok.incremental_decoder(); dec.feed(id) ... dec.flush()
"""
from __future__ import annotations

from woolly.errors import TokenizerError
from woolly.formats.vocab import Vocabulary
from woolly.tokenizers.base import Tokenizer
from woolly.tokenizers.bpe import BPETokenizer
from woolly.tokenizers.sentencepiece import SentencePieceTokenizer
from woolly.tokenizers.special import SpecialTokens
from woolly.tokenizers.streaming import IncrementalDecoder


def tokenizer_from_vocabulary(vocab: Vocabulary) -> Tokenizer:
    """The tokenizer a GGUF vocabulary calls for: `gpt2` -> BPE, `llama` -> SentencePiece."""
    if vocab.model == "gpt2":
        return BPETokenizer.from_vocabulary(vocab)
    if vocab.model == "llama":
        return SentencePieceTokenizer.from_vocabulary(vocab)
    raise TokenizerError(f"tokenizer model {vocab.model!r} is not supported (supported: gpt2, llama)")


__all__ = [
    "Tokenizer", "BPETokenizer", "SentencePieceTokenizer", "SpecialTokens", "IncrementalDecoder",
    "tokenizer_from_vocabulary",
]
