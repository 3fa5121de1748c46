"""The prefix cache: KV rows of finished sequences, reused by prompts that share their start."""
from __future__ import annotations

import collections
import time

import numpy as np

from woolly.runtime.params import trim_heap

TRIM_AFTER = 64 << 20  # bytes the prefix cache evicts before the freed heap is returned to the OS


class PrefixCache:
    """KV snapshots of finished sequences, keyed by their tokens; LRU within bytes and a TTL.

    A new prompt reuses the longest prefix it shares with any snapshot (not only a whole
    snapshot): two requests with one system prompt share its KV. Rows past the shared prefix
    are stale but harmless: prefill overwrites them before any query position reaches them.

    The bound holds for the process, not only for `bytes`: an entry is a slot's worth of large
    buffers, and glibc keeps the ones it frees in its heap arenas (after the first large free it
    raises its mmap threshold), so under a churn of stores and evictions (clients starting
    streams and leaving) the process grew ~1 GB past a 1 GiB cache. Once `trim_after` bytes have
    been evicted, the freed heap goes back to the OS (`malloc_trim`, a few ms).
    """

    def __init__(self, max_bytes: int, ttl: float, trim_after: int = TRIM_AFTER):
        self.max_bytes, self.ttl, self.trim_after = max_bytes, ttl, trim_after
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[object, int, float]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.evicted = 0   # bytes dropped since the heap was last trimmed

    def lookup(self, ids: list[int], limit: int) -> tuple[int, object | None]:
        """Longest prefix of ids[:limit] shared with a cached sequence -> (its length, that entry's rows)."""
        now = time.monotonic()
        want = np.asarray(ids[:limit], np.int64)
        best, best_key = 0, None
        for key, (_, _, t) in list(self.entries.items()):
            if now - t > self.ttl:
                self._drop(key)
                continue
            n = min(len(key), len(want))
            same = np.asarray(key[:n], np.int64) == want[:n]
            shared = n if same.all() else int(np.argmin(same))
            if shared > best:
                best, best_key = shared, key
        self._trim()
        if best_key is None:
            return 0, None
        rows, size, _ = self.entries.pop(best_key)
        self.entries[best_key] = (rows, size, now)
        self.hits += 1
        return best, rows

    def store(self, ids: tuple[int, ...], rows, size: int) -> None:
        if size > self.max_bytes or not ids:
            return
        if ids in self.entries:
            self._drop(ids)
        while self.bytes + size > self.max_bytes and self.entries:
            self._drop(next(iter(self.entries)))
        self.entries[ids] = (rows, size, time.monotonic())
        self.bytes += size
        self._trim()

    def _drop(self, key) -> None:
        _, size, _ = self.entries.pop(key)   # the rows are freed here (nothing else holds them)
        self.bytes -= size
        self.evicted += size

    def _trim(self) -> None:
        if self.evicted and self.evicted >= self.trim_after:
            self.evicted = 0
            trim_heap()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.evicted = 0
        trim_heap()
