"""Resident-volume cache: an LRU of GPU-resident entries bounded by a byte budget, with statistics.

Kept free of CUDA so that its policy is tested on any machine. An entry is any object with an
``nbytes`` property (bytes it holds on the GPU, which may grow as layouts are added) and a
``release()`` method (frees them). The CUDA backend keys entries by
:func:`drrfarm.render.cpu.volume_key` (content hash of the voxels, materials and placement).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol


class Resident(Protocol):
    @property
    def nbytes(self) -> int: ...

    def release(self) -> None: ...


class ResidentCache:
    """LRU of resident entries; ``budget_bytes`` bounds the sum of their ``nbytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        """The entry for ``key`` (counted as a hit and made most recent), or None (a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: Any) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)

    def bytes_resident(self) -> int:
        with self._lock:
            return sum(int(e.nbytes) for e in self._entries.values())

    def make_room(self, extra_bytes: int, keep: Iterable[str] = ()) -> int:
        """Evict least-recently-used entries (never those in ``keep``) until ``extra_bytes`` more fit
        in the budget or nothing evictable is left. Returns the bytes still over budget (0 if it fits)."""
        keep = set(keep)
        with self._lock:
            while self.bytes_resident() + extra_bytes > self.budget_bytes:
                victim = next((k for k in self._entries if k not in keep), None)
                if victim is None:
                    break
                entry = self._entries.pop(victim)
                entry.release()
                self.evictions += 1
            return max(0, self.bytes_resident() + extra_bytes - self.budget_bytes)

    def evict(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            entry.release()
            self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            while self._entries:
                _, entry = self._entries.popitem(last=False)
                entry.release()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "volumes": len(self._entries),
                "bytes_resident": self.bytes_resident(),
                "evictions": self.evictions,
                "budget_bytes": self.budget_bytes,
            }
