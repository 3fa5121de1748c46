"""Pre-tokenizers for byte-level BPE: split text into words the way llama.cpp does.

llama.cpp picks a list of regexes by the GGUF key `tokenizer.ggml.pre` (src/llama-vocab.cpp)
and applies them in turn (`unicode_regex_split`): each regex splits every piece the previous
ones produced, and text between matches stays a piece of its own. The expressions below are
llama.cpp's, run with the `regex` package, whose `\\p{L}`, `\\p{N}` and `\\s` (Unicode
White_Space) are the categories llama.cpp's tables hold.
"""
from __future__ import annotations

import regex

from woolly.errors import TokenizerError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> regexes applied in order (llama.cpp's llm_tokenizer_bpe). The names are
# llama.cpp's; "gpt2" is accepted as another name for its "gpt-2".
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "phi-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    "jais": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "exaone": (r"\p{N}", _GPT2),
    "minerva-7b": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
}

# Pre-tokenizers whose whole words skip the merges when the word is itself a token.
IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})


class PreTokenizer:
    """Splits text into the words BPE merges run within. `split(str) -> list[str]`."""

    def __init__(self, name: str):
        exprs = PRE_TOKENIZER_REGEXES.get(name)
        if exprs is None:
            known = ", ".join(sorted(PRE_TOKENIZER_REGEXES))
            raise TokenizerError(f"unknown pre-tokenizer {name!r} (tokenizer.ggml.pre); known: {known}")
        self.name = name
        # A capturing group makes `split` return the matches together with the text between them.
        self._splitters = [regex.compile(f"({e})").split for e in exprs]

    def split(self, text: str) -> list[str]:
        first, *rest = self._splitters
        pieces = [p for p in first(text) if p]
        for split in rest:
            pieces = [q for p in pieces for q in split(p) if q]
        return pieces
