"""GPT-2-style byte-level BPE, as llama.cpp runs it (`llm_tokenizer_bpe_session`).

Text is split into words by the pre-tokenizer, each word's UTF-8 bytes are mapped to
printable characters (GPT-2's byte table), then the adjacent pair with the lowest merge
rank (leftmost on ties) is merged until none applies. Results are cached per word, so
running text costs one dict lookup per word once its words have been seen.
"""
from __future__ import annotations

import heapq
import json
import os
from typing import Iterable, Sequence

import numpy as np

from woolly.errors import TokenizerError
from woolly.formats.vocab import TOKEN_CONTROL, TOKEN_NORMAL, Vocabulary
from woolly.tokenizers.base import Tokenizer
from woolly.tokenizers.pretokenize import IGNORE_MERGES, PreTokenizer
from woolly.tokenizers.special import Fragment


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte -> a printable character (printable Latin-1 stays itself)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_BYTE_CHARS = {b: c for b, c in BYTE_TO_CHAR.items()}  # str.translate table over latin-1 text

_MAX_CACHE = 1 << 17  # words; the cache is cleared (not grown) past this
_LONG_WORD = 48       # symbols; longer words merge with a heap instead of rescanning


class BPETokenizer(Tokenizer):
    """Byte-level BPE. `BPETokenizer(vocab, merges)` from a token->id dict and "a b" merges, or
    from a GGUF `gpt2` vocabulary with `BPETokenizer.from_vocabulary`."""

    def __init__(self, vocab: dict[str, int] | Vocabulary, merges: Sequence[str | tuple[str, str]] | None = None,
                 *, pre: str = "gpt2", control_tokens: Iterable[str] | None = None):
        if not isinstance(vocab, Vocabulary):
            vocab = _vocabulary_from_dict(vocab, merges or [], pre, control_tokens)
        elif merges is not None:
            raise TokenizerError("pass merges inside the Vocabulary, not beside it")
        if vocab.merges is None:
            raise TokenizerError("a BPE vocabulary needs merges")
        super().__init__(vocab)
        self._pre = PreTokenizer(vocab.pre)
        self._ignore_merges = vocab.pre in IGNORE_MERGES
        ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(vocab.merges):
            if isinstance(merge, str):  # llama.cpp splits at the first space after the first character
                cut = merge.find(" ", 1)
                pair = (merge[:cut], merge[cut + 1:]) if cut >= 0 else ("", "")
            else:
                pair = (merge[0], merge[1])
            ranks.setdefault(pair, rank)
        self._ranks = ranks
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_vocabulary(cls, vocab: Vocabulary) -> "BPETokenizer":
        return cls(vocab)

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, *, pre: str = "gpt2",
                   control_tokens: Iterable[str] | None = None) -> "BPETokenizer":
        """From Hugging Face's vocab.json and merges.txt (a '#version' first line is skipped)."""
        try:
            with open(vocab_json, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_txt, encoding="utf-8") as f:
                merges = [line.rstrip("\r\n") for line in f]
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read the BPE files: {e}") from None
        if not isinstance(vocab, dict):
            raise TokenizerError("vocab.json must map token text to id")
        merges = [m for m in merges if m and not m.startswith("#version")]
        return cls(vocab, merges, pre=pre, control_tokens=control_tokens)

    # -- encoding ---------------------------------------------------------------------
    def _encode_fragments(self, fragments: list[Fragment]) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        if len(cache) > _MAX_CACHE:
            cache.clear()
        for frag in fragments:
            if type(frag) is int:
                ids.append(frag)
                continue
            for word in self._pre.split(frag):
                got = cache.get(word)
                if got is None:
                    got = cache[word] = self._encode_word(word)
                ids.extend(got)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        # bytes of the word as GPT-2 characters: one symbol per byte
        symbols = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS)
        to_id = self._token_to_id
        if self._ignore_merges and symbols in to_id:
            return [to_id[symbols]]
        parts = self._merge(list(symbols))
        ids: list[int] = []
        for part in parts:
            i = to_id.get(part)
            if i is not None:
                ids.append(i)
            else:  # as llama.cpp: each single-byte character that is a token, the rest dropped
                ids.extend(to_id[c] for c in part if len(c.encode("utf-8")) == 1 and c in to_id)
        return ids

    def _merge(self, parts: list[str]) -> list[str]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until none has a rank."""
        if len(parts) > _LONG_WORD:
            return self._merge_heap(parts)
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, -1
            prev = parts[0]
            for i in range(1, len(parts)):
                cur = parts[i]
                r = ranks.get((prev, cur))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, i - 1
                prev = cur
            if best_rank is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return parts

    def _merge_heap(self, parts: list[str]) -> list[str]:
        """`_merge` for long words, with llama.cpp's priority queue: O(n log n), same result."""
        ranks = self._ranks
        n = len(parts)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(r, i, i + 1, len(parts[i]) + len(parts[i + 1])) for i in range(n - 1)
                if (r := ranks.get((parts[i], parts[i + 1]))) is not None]
        heapq.heapify(heap)

        def add(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                r = ranks.get((parts[left], parts[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, right, len(parts[left]) + len(parts[right])))

        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = parts[left], parts[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # a side changed since this pair was queued
            parts[left], parts[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])
        return [p for p in parts if p]

    def _normal_piece(self, text: str) -> bytes:
        try:
            return bytes(CHAR_TO_BYTE[c] for c in text)
        except KeyError:  # llama.cpp's llama_decode_text marks characters outside the byte table
            out = bytearray()
            for c in text:
                b = CHAR_TO_BYTE.get(c)
                if b is not None:
                    out.append(b)
                else:
                    out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
            return bytes(out)


def _vocabulary_from_dict(vocab: dict[str, int], merges: Sequence[str | tuple[str, str]], pre: str,
                          control_tokens: Iterable[str] | None) -> Vocabulary:
    """A Vocabulary for a token->id dict. Control tokens: as given, else `<|...|>` texts."""
    if not vocab:
        raise TokenizerError("the BPE vocabulary is empty")
    n = max(vocab.values()) + 1
    if min(vocab.values()) < 0 or n > 4 * len(vocab) + 1024:
        raise TokenizerError("vocabulary ids must be small non-negative integers")
    tokens = [""] * n
    for text, i in vocab.items():
        tokens[i] = text
    types = np.full(n, TOKEN_NORMAL, np.int32)
    if control_tokens is None:
        control = [t for t in vocab if len(t) > 4 and t.startswith("<|") and t.endswith("|>")]
    else:
        control = list(control_tokens)
    for t in control:
        if t not in vocab:
            raise TokenizerError(f"control token {t!r} is not in the vocabulary")
        types[vocab[t]] = TOKEN_CONTROL
    eos = vocab.get("<|endoftext|>")
    merge_list = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]
    return Vocabulary(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, scores=None, merges=merge_list,
        bos_id=eos, eos_id=eos, unk_id=None, pad_id=None, add_bos=False, add_eos=False,
        add_space_prefix=False, chat_template=None,
    )
