"""Streaming detokenization: ids in, text out, never a broken UTF-8 character."""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from woolly.tokenizers.base import Tokenizer


class IncrementalDecoder:
    """Decodes ids as they arrive. `feed(ids) -> str` returns only complete characters; bytes of a
    character split across tokens wait for the rest. `flush()` ends the stream (an incomplete tail
    becomes U+FFFD). Text equals `tokenizer.decode(all_ids)` once flushed (with `at_start`)."""

    def __init__(self, tokenizer: "Tokenizer", *, skip_special: bool = False, at_start: bool = False):
        # at_start: the ids begin a text (drop a SentencePiece dummy-prefix space); a model's
        # continuation of a prompt does not.
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = at_start

    def feed(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids:
            return ""
        data = self._tokenizer.decode_bytes(ids, skip_special=self._skip_special, at_start=self._at_start)
        self._at_start = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """The held-back tail (as U+FFFD if it never completed); the decoder can be reused after."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
