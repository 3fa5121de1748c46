"""Special tokens: which ids they are, and cutting their text out of input before tokenizing.

`SpecialTokenSplitter.split` is llama.cpp's `tokenizer_st_partition`: special tokens are
taken longest first (by UTF-8 length); each one cuts every occurrence of its text out of the
remaining raw text, left to right. User-defined tokens are always cut out; control and
unknown tokens only when special parsing is on (or inside the caller's trusted spans).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

Fragment = str | int  # raw text still to tokenize, or a token id already decided


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a vocabulary treats specially (None where the file has none)."""

    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    eot: int | None = None                                   # end of turn, e.g. <|im_end|> or <end_of_turn>
    eog: frozenset[int] = frozenset()                        # every id that ends generation
    control: dict[str, int] = field(default_factory=dict)    # text -> id of each control token


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex matching the longest of `words` at a position (sre tries one branch per character)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def pattern(node: dict) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch != ""]
        if not branches:
            return ""
        if "" in node:  # a word ends here: the longer branches are optional (greedy, so preferred)
            return "(?:" + "|".join(branches) + ")?"
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return pattern(trie)


class SpecialTokenSplitter:
    """Cuts special-token text out of a string: `split(text) -> list[str | int]`."""

    def __init__(self, entries: Sequence[tuple[str, int, bool]]):
        # entries: (text, id, gated) of the tokens this splitter recognizes, in vocabulary order;
        # gated tokens (control, unknown) are the ones `spans` can restrict.
        self._gated = {t for t, _, g in entries if g}
        entries = [(t, i) for t, i, _ in entries if t]
        # Longest UTF-8 first, as llama.cpp's cache_special_tokens; ties keep id order.
        self._ordered = sorted(entries, key=lambda e: -len(e[0].encode("utf-8")))
        self._rank: dict[str, int] = {}
        for k, (t, _) in enumerate(self._ordered):
            self._rank.setdefault(t, k)
        self._id: dict[str, int] = {}
        for t, i in self._ordered:  # a text listed twice: the first in cutting order takes it all
            self._id.setdefault(t, i)
        # Which texts are prefixes of which (a shadowed shorter token can still match later).
        texts = set(self._id)
        self._prefixes = {t: [t[:k] for k in range(1, len(t)) if t[:k] in texts] for t in texts}
        # Overlapping search: at each position the longest special text starting there.
        self._finder = re.compile("(?=(" + _trie_pattern(list(texts)) + "))", re.DOTALL) if texts else None

    def present(self, text: str) -> list[tuple[str, int]]:
        """The (text, id) entries that occur in `text`, in cutting order."""
        if self._finder is None:
            return []
        found: set[str] = set()
        for m in self._finder.finditer(text):
            t = m.group(1)
            if t and t not in found:
                found.add(t)
                found.update(self._prefixes[t])
        return sorted(((t, self._id[t]) for t in found), key=lambda e: self._rank[e[0]])

    def split(self, text: str, spans: "Sequence[tuple[int, int]] | None" = None) -> list[Fragment]:
        """Fragments of `text`: raw strings and token ids. With `spans`, a token counts only
        where its whole occurrence lies inside one of the [start, end) spans (user-defined
        tokens count everywhere)."""
        fragments: list[Fragment] = [text]
        offsets: list[int] = [0]  # start of each raw fragment within `text` (only needed with spans)
        for tok, tok_id in self.present(text):
            out: list[Fragment] = []
            out_offsets: list[int] = []
            n = len(tok)
            gated = spans is not None and tok in self._gated
            for frag, base in zip(fragments, offsets):
                if type(frag) is int or tok not in frag:
                    out.append(frag)
                    out_offsets.append(base)
                    continue
                start = search = 0
                while True:
                    i = frag.find(tok, search)
                    if i < 0:
                        break
                    if gated and not _inside(spans, base + i, base + i + n):
                        search = i + 1
                        continue
                    if i > start:
                        out.append(frag[start:i])
                        out_offsets.append(base + start)
                    out.append(tok_id)
                    out_offsets.append(-1)
                    start = search = i + n
                if start < len(frag):
                    out.append(frag[start:] if start else frag)
                    out_offsets.append(base + start)
            fragments, offsets = out, out_offsets
        return fragments


def _inside(spans: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return any(a <= start and end <= b for a, b in spans)
