"""The newest-frame handoff between a runtime's subscription callback and the inference worker.

A one-place mailbox instead of a queue: when frames arrive faster than inference, a pending frame
is replaced by the newer one (and counted as dropped by the caller), so the worker always works on
the newest frame and both latency and memory stay bounded.
"""

from __future__ import annotations

import threading
from typing import Any


class LatestFrameSlot:
    """A one-place mailbox: :meth:`put` replaces a pending item, :meth:`take` waits for one.

    Keeping one pending frame (instead of a queue) bounds both the latency and the memory when
    frames arrive faster than inference: the worker always works on the newest frame.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._pending = False
        self._busy = False
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store ``item``; return True when it replaced a pending (now dropped) item."""
        with self._cond:
            replaced = self._pending
            self._item, self._pending = item, True
            self._cond.notify_all()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """Wait for an item and mark the worker busy; None on timeout or when closed."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                return None
            if self._closed:
                return None
            item, self._item, self._pending = self._item, None, False
            self._busy = True
            return item

    def done(self) -> None:
        """Mark the taken item as finished (lets :meth:`wait_idle` return)."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def discard(self) -> bool:
        """Drop the pending item, if any; True when one was dropped."""
        with self._cond:
            dropped = self._pending
            self._item, self._pending = None, False
            self._cond.notify_all()
            return dropped

    def close(self) -> None:
        """Wake every waiter; later :meth:`take` calls return None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return self._pending
