"""The newest-frame handoff between a runtime's subscription callbacks and the inference worker.

One place per camera instead of a queue: when frames arrive faster than inference, a camera's
pending frame is replaced by its newer one (and counted as dropped by the caller), so the worker
always works on each camera's newest frame and both latency and memory stay bounded. The worker
takes every pending frame at once (one per camera, a batch for one network call); a camera that
sends nothing is simply absent from the batch, so it never holds the others back.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any


class LatestFrameSlot:
    """A mailbox with one place per key: :meth:`put` replaces that key's pending item,
    :meth:`take_all` waits for any and takes them all."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[Hashable, Any] = {}  # key -> pending item, in arrival order
        self._busy = False
        self._closed = False

    def put(self, item: Any, key: Hashable = None) -> bool:
        """Store ``item`` as ``key``'s pending item; True when it replaced one (now dropped)."""
        with self._cond:
            replaced = key in self._items
            self._items.pop(key, None)  # the newest goes to the end: arrival order
            self._items[key] = item
            self._cond.notify_all()
            return replaced

    def take_all(self, timeout: float | None = None) -> list[Any]:
        """Wait for pending items, take all of them (in the order they arrived) and mark the
        worker busy; an empty list on timeout or when closed."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return []
            if self._closed:
                return []
            items, self._items = list(self._items.values()), {}
            self._busy = True
            return items

    def done(self) -> None:
        """Mark the taken items as finished (lets :meth:`wait_idle` return)."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def discard(self) -> list[Any]:
        """Drop every pending item; return them (the caller counts them as dropped)."""
        with self._cond:
            items, self._items = list(self._items.values()), {}
            self._cond.notify_all()
            return items

    def close(self) -> None:
        """Wake every waiter; later :meth:`take_all` calls return nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return bool(self._items)
