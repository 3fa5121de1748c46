"""SentencePiece vocabularies (GGUF `tokenizer.ggml.model` = `llama`), as llama.cpp runs them.

llama.cpp's SPM algorithm (`llm_tokenizer_spm_session`): spaces become U+2581, the text is
split into characters, and the adjacent pair whose concatenation is a token with the highest
score (leftmost on ties) is merged until none is; characters left that are not tokens fall
back to their <0xHH> byte tokens. Exactly that runs here with a heap, on independent pieces:
a boundary between two characters that appear next to each other in no token can never be
merged across, so the text is cut there (before each '▁' in practice) and each piece's result
is cached.

`SentencePieceTokenizer.from_file` instead reads a `.model` file with the sentencepiece
library and encodes with it (its own algorithm and normalization), sharing the rest.
"""
from __future__ import annotations

import heapq
import os
import re

import numpy as np

from woolly.errors import TokenizerError
from woolly.formats.vocab import TOKEN_NORMAL, Vocabulary
from woolly.tokenizers.base import Tokenizer
from woolly.tokenizers.special import Fragment

SPACE = "\u2581"  # ▁, SentencePiece's visible space
_MAX_CACHE = 1 << 17


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece-style tokenizer from a GGUF `llama` vocabulary, or `from_file(.model)`."""

    def __init__(self, vocab: Vocabulary, *, processor=None):
        if vocab.scores is None:
            raise TokenizerError("a SentencePiece vocabulary needs token scores")
        super().__init__(vocab)
        self._processor = processor  # a sentencepiece.SentencePieceProcessor, or None for llama.cpp's SPM
        self._scores: list[float] = np.asarray(vocab.scores, np.float32).tolist()
        self._byte_ids = self._byte_table()
        self._cache: dict[str, list[int]] = {}
        self._cut = _cut_pattern(vocab.tokens)

    @classmethod
    def from_vocabulary(cls, vocab: Vocabulary) -> "SentencePieceTokenizer":
        return cls(vocab)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """From a SentencePiece `.model` file, encoding with the sentencepiece library."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(os.fspath(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load SentencePiece model {os.fspath(path)!r}: {e}") from None
        n = sp.GetPieceSize()
        tokens = [sp.IdToPiece(i) for i in range(n)]
        kinds, add_prefix = _read_model_proto(sp.serialized_model_proto())
        if len(kinds) != n:
            raise TokenizerError(f"SentencePiece model {os.fspath(path)!r} lists {len(kinds)} pieces for {n} ids")
        types = np.array(kinds, np.int32)  # SentencePiece's piece types are llama.cpp's token types

        def sid(i: int) -> int | None:
            return i if 0 <= i < n else None

        vocab = Vocabulary(
            model="llama", pre="default", tokens=tokens, token_types=types,
            scores=np.array([sp.GetScore(i) for i in range(n)], np.float32), merges=None,
            bos_id=sid(sp.bos_id()), eos_id=sid(sp.eos_id()), unk_id=sid(sp.unk_id()), pad_id=sid(sp.pad_id()),
            add_bos=sid(sp.bos_id()) is not None, add_eos=False, add_space_prefix=add_prefix, chat_template=None,
        )
        return cls(vocab, processor=sp)

    # -- encoding ---------------------------------------------------------------------
    def _encode_fragments(self, fragments: list[Fragment]) -> list[int]:
        ids: list[int] = []
        if self._processor is not None:
            for frag in fragments:
                ids.extend([frag] if type(frag) is int else self._processor.EncodeAsIds(frag))
            return ids
        add_prefix = self.vocabulary.add_space_prefix
        after_special = True  # llama.cpp: a space prefix goes on text that starts or follows a token
        cache = self._cache
        if len(cache) > _MAX_CACHE:
            cache.clear()
        for frag in fragments:
            if type(frag) is int:
                ids.append(frag)
                after_special = True
                continue
            text = (" " + frag if add_prefix and after_special else frag).replace(" ", SPACE)
            after_special = False
            for piece in self._cut(text) if self._cut else (text,):
                got = cache.get(piece)
                if got is None:
                    got = cache[piece] = self._encode_piece(piece)
                ids.extend(got)
        return ids

    def _encode_piece(self, text: str) -> list[int]:
        """llama.cpp's SPM merge loop on one piece of text (spaces already '▁')."""
        to_id, scores = self._token_to_id, self._scores
        n = len(text)
        if n == 0:
            return []
        syms = list(text)                      # current text of each symbol; '' once merged away
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            t = syms[left] + syms[right]
            i = to_id.get(t)
            if i is not None:
                heapq.heappush(heap, (-scores[i], left, right, len(t)))

        for i in range(n - 1):
            t = syms[i] + syms[i + 1]
            tid = to_id.get(t)
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, len(t)))
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # one side changed since this pair was queued
            syms[left] = a + b
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])
        ids: list[int] = []
        i = 0
        while i != -1:
            s = syms[i]
            tid = to_id.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_token(b) for b in s.encode("utf-8"))
            i = nxt[i]
        return ids

    def _byte_table(self) -> list[int | None]:
        """byte -> its <0xHH> token (or the one-character token llama.cpp falls back to)."""
        to_id = self._token_to_id
        table: list[int | None] = []
        for b in range(256):
            i = to_id.get(f"<0x{b:02X}>")
            if i is None and b < 128:
                i = to_id.get(chr(b))
            table.append(i)
        return table

    def _byte_token(self, b: int) -> int:
        i = self._byte_ids[b]
        if i is None:
            if self.special_tokens.unk is None:
                raise TokenizerError(f"byte 0x{b:02X} has no token and the vocabulary has no unknown token")
            return self.special_tokens.unk
        return i

    def _normal_piece(self, text: str) -> bytes:
        return text.replace(SPACE, " ").encode("utf-8")


def _cut_pattern(tokens: list[str]):
    """A splitter cutting text before '▁' wherever no token joins the character before to '▁'
    (such boundaries are never merged across), or None when no such cut is safe."""
    joins_space = set()
    for t in tokens:
        k = t.find(SPACE, 1)
        while k > 0:
            joins_space.add(t[k - 1])
            k = t.find(SPACE, k + 1)
    if len(joins_space) > 256:
        return None
    never_before = "".join(re.escape(c) for c in sorted(joins_space))
    pattern = re.compile(f"(?<![{never_before}])(?={SPACE})" if never_before else f"(?={SPACE})")
    return lambda text: [p for p in pattern.split(text) if p]


def _read_model_proto(data: bytes) -> tuple[list[int], bool]:
    """From a serialized sentencepiece ModelProto: each piece's type (NORMAL=1 ... BYTE=6) and
    the normalizer's add_dummy_prefix. Just enough protobuf wire format for those fields."""

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, pos
            shift += 7

    def fields(buf: bytes):  # yields (field number, wire type, value)
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            wire = key & 7
            if wire == 0:
                value, pos = varint(buf, pos)
            elif wire == 1:
                value, pos = buf[pos:pos + 8], pos + 8
            elif wire == 2:
                size, pos = varint(buf, pos)
                value, pos = buf[pos:pos + size], pos + size
            elif wire == 5:
                value, pos = buf[pos:pos + 4], pos + 4
            else:
                raise TokenizerError(f"unexpected protobuf wire type {wire} in the SentencePiece model")
            yield key >> 3, wire, value

    kinds: list[int] = []
    add_prefix = True
    try:
        for number, wire, value in fields(data):
            if number == 1 and wire == 2:  # a SentencePiece: type is field 3, NORMAL when absent
                kinds.append(next((v for f, w, v in fields(value) if f == 3 and w == 0), TOKEN_NORMAL))
            elif number == 3 and wire == 2:  # NormalizerSpec: add_dummy_prefix is field 3
                add_prefix = bool(next((v for f, w, v in fields(value) if f == 3 and w == 0), 1))
    except IndexError:
        raise TokenizerError("the SentencePiece model is truncated") from None
    return kinds, add_prefix
