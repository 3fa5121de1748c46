"""Stop strings over streamed text: matched across token boundaries, cut from the output."""
from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what is safe to emit, holding back a possible stop prefix."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """-> text safe to emit now. After a stop matches, `stopped` is True and the rest is dropped."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i = min(i for i, _ in hits)
            self.stopped = True
            out, self.pending = self.pending[:i], ""
            return out
        hold = 0
        for s in self.stops:  # longest suffix of pending that begins some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if s.startswith(self.pending[-n:]):
                    hold = n
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back (it never became a stop)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
