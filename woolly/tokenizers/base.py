"""The `Tokenizer` contract and what every vocabulary shares.

A tokenizer is built from a `Vocabulary` (the GGUF file's tokenizer data, or one made from
vocab.json/merges.txt or a SentencePiece .model). This class owns what does not depend on
the algorithm: token attributes as llama.cpp derives them, special-token splitting, ids to
bytes, lookups, end-of-generation ids. Subclasses turn raw text fragments into ids.
"""
from __future__ import annotations

import abc
from typing import Iterable, Sequence

import numpy as np

from woolly.errors import InvalidRequest, TokenizerError
from woolly.formats.vocab import (
    TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, Vocabulary,
)
from woolly.tokenizers.special import Fragment, SpecialTokens, SpecialTokenSplitter
from woolly.tokenizers.streaming import IncrementalDecoder

# Texts llama.cpp (llama-vocab.cpp) recognizes whatever the file says. The first of each
# group found is that role's token and becomes a control token; some roles end generation.
ROLE_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Every token with one of these texts ends generation (and becomes a control token).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: user-defined


def llama_cpp_token_roles(tokens: list[str], types: np.ndarray, eos_id: int | None,
                          extra_eos_ids: tuple[int, ...]) -> tuple[np.ndarray, dict[str, int], set[int]]:
    """Token types as llama.cpp adjusts them at load, the role ids it detects by text, and the
    end-of-generation ids. `types` is int32 [V]; returns a modified copy."""
    to_id = {t: i for i, t in enumerate(tokens)}
    types = types.copy()
    roles: dict[str, int] = {}
    for role, texts in ROLE_TEXTS.items():
        found = next((to_id[t] for t in texts if t in to_id), None)
        if found is not None:
            roles[role] = found
            types[found] = TOKEN_CONTROL
    if extra_eos_ids:  # the file's own eot (and eom) ids win over detection
        roles["eot"] = extra_eos_ids[0]
        if len(extra_eos_ids) > 1:
            roles["eom"] = extra_eos_ids[1]
    eog = {roles[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in roles}
    for t in EOG_TEXTS:
        i = to_id.get(t)
        if i is not None:
            eog.add(i)
            types[i] = TOKEN_CONTROL
    for t in ALWAYS_RENDERED:
        if t in to_id:
            types[to_id[t]] = TOKEN_USER_DEFINED
    eog.update(i for i in (eos_id, roles.get("eot"), roles.get("eom")) if i is not None)
    texts_of = {tokens[i] for i in eog}
    if "<|end|>" in texts_of and ({"<|return|>", "<|call|>"} <= texts_of or {"<|calls|>", "<|flush|>"} <= texts_of):
        eog.discard(to_id["<|end|>"])
        types[to_id["<|end|>"]] = TOKEN_USER_DEFINED
    if "<|tool_response>" in texts_of and "</s>" in texts_of:
        eog.discard(to_id["</s>"])
        types[to_id["</s>"]] = TOKEN_NORMAL
    return types, roles, eog


class Tokenizer(abc.ABC):
    """Text <-> token ids, exactly as llama.cpp does it for the same vocabulary."""

    def __init__(self, vocab: Vocabulary):
        self.vocabulary = vocab
        tokens = vocab.tokens
        n = len(tokens)
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}  # a repeated text: last id
        types, roles, eog = llama_cpp_token_roles(
            tokens, np.asarray(vocab.token_types, dtype=np.int32), vocab.eos_id, vocab.extra_eos_ids)
        self._types = types
        control = np.flatnonzero(types == TOKEN_CONTROL).tolist()
        self.special_tokens = SpecialTokens(
            bos=vocab.bos_id, eos=vocab.eos_id, unk=vocab.unk_id, pad=vocab.pad_id,
            eot=roles.get("eot"),
            eog=frozenset(eog), control={tokens[i]: i for i in control},
        )
        # ids -> bytes; `_hidden` marks what decode(skip_special=True) leaves out (control, unknown).
        self._pieces: list[bytes] = self._build_pieces()
        self._hidden = np.isin(types, (TOKEN_CONTROL, TOKEN_UNKNOWN))
        self._hidden_ids = frozenset(np.flatnonzero(self._hidden).tolist())
        special = np.flatnonzero(np.isin(types, (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED))).tolist()
        entries = [(tokens[i], i, bool(self._hidden[i])) for i in special]
        self._split_all = SpecialTokenSplitter(entries)
        self._split_user = SpecialTokenSplitter([e for e in entries if not e[2]])
        self._n = n

    # -- what subclasses provide ------------------------------------------------------
    @abc.abstractmethod
    def _encode_fragments(self, fragments: list[Fragment]) -> list[int]:
        """Token ids for raw-text fragments and already-decided ids, in order."""

    @abc.abstractmethod
    def _normal_piece(self, text: str) -> bytes:
        """The bytes a normal token's vocabulary text stands for."""

    # -- the contract -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._n

    def tokenize(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False,
                 parse_special: bool = False, special_spans: Sequence[tuple[int, int]] | None = None) -> list[int]:
        """Token ids for `text`. `add_bos=None` follows the file (tokenizer.ggml.add_bos_token).
        `parse_special`: control-token text (e.g. "<|im_start|>") becomes that token; otherwise it
        is plain text. `special_spans`: parse control tokens only inside these [start, end) ranges
        (how a chat template's own text is told from user content)."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text to tokenize must be a string, got {type(text).__name__}")
        _check_encodable(text)
        ids: list[int] = []
        if self.vocabulary.add_bos if add_bos is None else add_bos:
            if self.special_tokens.bos is None:
                raise TokenizerError("this vocabulary has no BOS token to add")
            ids.append(self.special_tokens.bos)
        if text:
            if special_spans is not None:
                fragments = self._split_all.split(text, spans=special_spans)
            else:
                fragments = (self._split_all if parse_special else self._split_user).split(text)
            ids.extend(self._encode_fragments(fragments))
        if add_eos:
            if self.special_tokens.eos is None:
                raise TokenizerError("this vocabulary has no EOS token to add")
            ids.append(self.special_tokens.eos)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. Control tokens are rendered as their text unless `skip_special`.
        Invalid UTF-8 (a character cut off) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False, at_start: bool = True) -> bytes:
        """The exact bytes of `ids`; `at_start`: these ids begin the text, so the space a
        SentencePiece vocabulary puts before it (add_space_prefix) is dropped, as llama.cpp's
        detokenize does when it removes BOS."""
        ids = self._check_ids(ids)
        pieces = self._pieces
        parts = [pieces[i] for i in ids]
        if skip_special:
            hidden = self._hidden_ids
            parts = [b"" if i in hidden else p for i, p in zip(ids, parts)]
        if at_start and self.vocabulary.add_space_prefix and ids:
            # the space tokenize put before the text: on the first token after a leading BOS
            k = 1 if ids[0] == self.special_tokens.bos and len(ids) > 1 else 0
            if parts[k].startswith(b" "):
                parts[k] = parts[k][1:]
        return b"".join(parts)

    def incremental_decoder(self, *, skip_special: bool = False, at_start: bool = False) -> IncrementalDecoder:
        """A streaming decoder: `feed(ids) -> str` never returns part of a character.
        `at_start`: the ids begin a text rather than continue a prompt (see decode_bytes)."""
        return IncrementalDecoder(self, skip_special=skip_special, at_start=at_start)

    def is_eog(self, token_id: int) -> bool:
        """Does this id end generation (EOS, end of turn, and the like)?"""
        return token_id in self.special_tokens.eog

    def is_control(self, token_id: int) -> bool:
        return 0 <= token_id < self._n and self._types[token_id] == TOKEN_CONTROL

    def token_to_piece(self, token_id: int) -> str:
        """The token's text as the vocabulary stores it (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        self._check_ids([token_id])
        return self.vocabulary.tokens[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        """The id whose vocabulary text is `piece`, or None."""
        return self._token_to_id.get(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (control tokens: their text)."""
        self._check_ids([token_id])
        return self._pieces[token_id]

    def __repr__(self) -> str:
        v = self.vocabulary
        return f"{type(self).__name__}(model={v.model!r}, pre={v.pre!r}, vocab_size={self._n})"

    # -- helpers ----------------------------------------------------------------------
    def _build_pieces(self) -> list[bytes]:
        """Each id's bytes, as llama.cpp's token_to_piece with special=True."""
        pieces: list[bytes] = []
        types = self._types.tolist()
        for text, kind in zip(self.vocabulary.tokens, types):
            if kind == TOKEN_NORMAL:
                pieces.append(self._normal_piece(text))
            elif kind == TOKEN_BYTE:
                pieces.append(bytes([int(text[3:5], 16)]))
            elif kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                pieces.append(text.encode("utf-8"))
            else:  # unused and undefined tokens decode to nothing
                pieces.append(b"")
        return pieces

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"token ids must be integers: {e}") from None
        if ids and (min(ids) < 0 or max(ids) >= self._n):
            bad = next(i for i in ids if not 0 <= i < self._n)
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{self._n - 1})")
        return ids


def _check_encodable(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"text is not valid Unicode (a lone surrogate at {e.start})") from None


__all__ = ["Tokenizer", "SpecialTokens", "IncrementalDecoder"]
