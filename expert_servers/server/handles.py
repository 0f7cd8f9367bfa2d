"""Condition handles: bounded (LRU count + TTL) and tied to the model revision that made them.

``Prepare`` encodes a condition once and stores the conditioned view under an opaque random
handle. The table keeps at most ``max_handles`` entries, evicting the least recently used, and
forgets an entry ``ttl_s`` seconds after its last use. When the served model is swapped, the
views of the old model are dropped at once (so its memory can be freed) but their handles are
remembered as *retired*: using one answers FAILED_PRECONDITION ("prepare again") rather than
NOT_FOUND, until it is evicted like any other entry.

Thread-safe: ``Prepare``/``Release`` use it on the event loop, the data-plane calls in the
host's worker threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from poegen.kernel.refusal import ExpertError


@dataclass(slots=True)
class _Entry:
    revision: str
    target: object | None  # None once its model was swapped out
    last_used: float


class HandleTable:
    """Handle → conditioned view, with LRU and TTL eviction."""

    def __init__(
        self, max_handles: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_handles < 1:
            raise ValueError(f"max_handles: must be >= 1, got {max_handles}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        self._max = max_handles
        self._ttl = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._revision = ""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, revision: str, target: object) -> str:
        """Store ``target`` prepared by model ``revision``; return its new handle."""
        handle = secrets.token_urlsafe(18)
        with self._lock:
            self._expire()
            # a Prepare that finished after a swap: remember the handle, not the old model's view
            kept = target if revision == self._revision else None
            self._entries[handle] = _Entry(revision, kept, self._clock())
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return handle

    def get(self, handle: str, revision: str) -> object:
        """The view stored under ``handle``, which must belong to model ``revision``."""
        with self._lock:
            self._expire()
            entry = self._entries.get(handle)
            if entry is None:
                raise ExpertError.not_found("handle", "unknown or expired handle; call Prepare")
            if entry.target is None or entry.revision != revision:
                raise ExpertError.failed_precondition(
                    "handle",
                    f"prepared by model revision {entry.revision}, now serving {revision}; "
                    "call Prepare again",
                )
            entry.last_used = self._clock()
            self._entries.move_to_end(handle)
            return entry.target

    def release(self, handle: str) -> bool:
        """Forget ``handle``; True if it existed."""
        with self._lock:
            self._expire()
            return self._entries.pop(handle, None) is not None

    def retire(self, revision: str) -> None:
        """A new model ``revision`` serves: drop every other revision's views."""
        with self._lock:
            self._revision = revision
            for entry in self._entries.values():
                if entry.revision != revision:
                    entry.target = None

    def _expire(self) -> None:
        # under the lock; entries are in last-use order, so the expired ones are at the front
        deadline = self._clock() - self._ttl
        while self._entries:
            handle, entry = next(iter(self._entries.items()))
            if entry.last_used > deadline:
                break
            del self._entries[handle]
