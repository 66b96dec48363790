"""Reuse of KV state across requests that share a prompt prefix (chat histories, system
prompts), bounded by bytes.

Each entry is the batch-1 cache of a finished request: its prompt and everything it
generated. A new prompt takes the entry sharing its longest prefix, gets a *copy* trimmed
to that prefix (at most all but its last token: the engine must feed at least one), and
only the rest is prefilled. Entries are evicted least-recently-used first until the total
fits ``max_bytes``; an entry loaded from a prompt-cache file at start is pinned.

Used only from the engine thread, so no locking; the counters are read by /metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mlxlm_core.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

__all__ = ["PrefixCache"]


@dataclass
class _Entry:
    tokens: np.ndarray
    cache: list[KVCache]
    nbytes: int
    pinned: bool = False


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _copy(cache: Sequence[KVCache]) -> list[KVCache]:
    return [type(c).from_state(c.state, c.meta_state) for c in cache]


class PrefixCache:
    """Longest-prefix lookup over finished requests' caches, per model slot."""

    def __init__(self, max_bytes: int, *, min_reuse: int = 1) -> None:
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._next = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, slot: str, prompt: Sequence[int]) -> tuple[list[KVCache] | None, int]:
        """A private cache holding the longest cached prefix of ``prompt`` and its length."""
        wanted = np.asarray(prompt, dtype=np.int64)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            if key[0] != slot:
                continue
            n = _common_prefix(entry.tokens, wanted)
            if n > best:
                best_key, best = key, n
        usable = min(best, len(prompt) - 1)
        if best_key is None or usable < self.min_reuse:
            self.misses += 1
            return None, 0
        entry = self._entries[best_key]
        self._entries.move_to_end(best_key)
        cache = _copy(entry.cache)
        trim_prompt_cache(cache, cache[0].offset - usable)
        self.hits += 1
        self.reused_tokens += usable
        return cache, usable

    def store(
        self, slot: str, tokens: Sequence[int], cache: list[KVCache], *, pinned: bool = False
    ) -> bool:
        """Keep ``cache`` (holding exactly ``tokens``); returns whether it was kept."""
        if not cache or not can_trim_prompt_cache(cache) or cache[0].offset != len(tokens):
            return False
        nbytes = sum(c.nbytes for c in cache)
        if nbytes > self.max_bytes:
            return False
        array = np.asarray(tokens, dtype=np.int64)
        # An entry the new one extends is redundant: the new one serves every prompt it did.
        for key in [k for k, e in self._entries.items() if k[0] == slot and not e.pinned]:
            old = self._entries[key].tokens
            if len(old) <= len(array) and _common_prefix(old, array) == len(old):
                del self._entries[key]
        self._entries[(slot, self._next)] = _Entry(array, cache, nbytes, pinned)
        self._next += 1
        self._evict()
        return True

    def _evict(self) -> None:
        total = self.nbytes
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            entry = self._entries[key]
            if entry.pinned:
                continue
            del self._entries[key]
            total -= entry.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self._entries = OrderedDict((k, e) for k, e in self._entries.items() if e.pinned)
