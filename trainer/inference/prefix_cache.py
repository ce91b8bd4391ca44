"""The prefix cache: finished conversations' key/value rows, kept so that the next turn prefills only its new tokens.

An entry is a sequence of token ids (with their vision flags) and whatever the
caller stores for it (the serving engine: the cache row that holds those tokens'
keys and values). :meth:`PrefixCache.longest` finds the entry sharing the longest
common prefix with a new prompt; a chat's next turn repeats its previous turns
token for token, so it finds them. The cache is bounded: at most ``capacity``
entries, the least recently used (stored or found) evicted first, and an entry that
is a prefix of a newer one is dropped as the newer one comes in (the newer holds
all it held). Pure host-side bookkeeping: nothing here touches a device.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Generic, TypeVar

import numpy as np

Value = TypeVar("Value")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[Value]):
    tokens: np.ndarray  # int32[N]
    vision_mask: np.ndarray  # bool[N]
    value: Value


def common_prefix(tokens_a: np.ndarray, mask_a: np.ndarray, tokens_b: np.ndarray, mask_b: np.ndarray) -> int:
    """How many leading positions two token sequences share (same id and same vision flag)."""
    n = min(len(tokens_a), len(tokens_b))
    differ = (tokens_a[:n] != tokens_b[:n]) | (mask_a[:n] != mask_b[:n])
    return int(np.argmax(differ)) if differ.any() else n


class PrefixCache(Generic[Value]):
    """At most ``capacity`` entries (0 turns the cache off), least recently used evicted first."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"the prefix cache's capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: collections.OrderedDict[int, Entry[Value]] = collections.OrderedDict()
        self._next_key = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens, vision_mask, value: Value) -> None:
        """Stores ``value`` for ``tokens``; drops the entries ``tokens`` extends, then the least recently used
        beyond the capacity."""
        if not self.capacity:
            return
        tokens, vision_mask = np.asarray(tokens, np.int32), np.asarray(vision_mask, bool)
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(tokens) and common_prefix(entry.tokens, entry.vision_mask, tokens,
                                                                  vision_mask) == len(entry.tokens):
                del self._entries[key]
        self._entries[self._next_key] = Entry(tokens, vision_mask, value)
        self._next_key += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def longest(self, tokens, vision_mask) -> tuple[Entry[Value], int] | None:
        """The entry sharing the longest common prefix with ``tokens`` (marked as recently used) and that
        prefix's length, or None when no entry shares even one token."""
        tokens, vision_mask = np.asarray(tokens, np.int32), np.asarray(vision_mask, bool)
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            shared = common_prefix(entry.tokens, entry.vision_mask, tokens, vision_mask)
            if shared and (best is None or shared > best[1]):
                best = (key, shared)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best[0])
        return self._entries[best[0]], best[1]

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}
