"""How the node reports an error it survives: bad input in one line, a bug with its traceback.

The node keeps running past a bad frame and past a bug met while handling one, but the two need
different reports. The package's own errors (:class:`~dds_perception.utils.errors.
DdsPerceptionError`: an undecodable image, a malformed message) name the bad input in their
message: one line is enough. Any other exception is a bug, and its traceback is the only record of
where it came from: :class:`ErrorLog` logs the whole traceback the first time an exception type
occurs at a place, and one line for later ones. Lines are throttled per place (at most one per
``period`` seconds, with the number held back), so a camera sending only bad frames cannot flood
the log; a bug's first traceback is never held back.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from dds_perception.ros.diagnostics import Throttle
from dds_perception.utils.errors import DdsPerceptionError

MAX_KNOWN_BUGS = 256  # distinct (place, exception type) pairs remembered; then tracebacks stop


def is_bad_input(error: BaseException) -> bool:
    """True for the package's own errors (bad input, named in the message), False for bugs."""
    return isinstance(error, DdsPerceptionError)


def describe(error: BaseException) -> str:
    """``"Type: message"``, the one-line form of an error (diagnostics' ``last_error``); never
    raises, even for an exception whose ``__str__`` is broken."""
    try:
        text = str(error)
    except Exception:
        text = "<message unavailable: its __str__ failed>"
    return f"{type(error).__name__}: {text}"


class ErrorLog:
    """Reports errors the node goes on after; see the module doc.

    ``warning`` receives the lines about bad input, ``error`` (default: ``warning``) those about
    bugs, tracebacks included (as text: rclpy's logger takes no exception objects).
    """

    def __init__(
        self,
        warning: Callable[[str], Any],
        error: Callable[[str], Any] | None = None,
        *,
        period: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._warning = warning
        self._error = error or warning
        self._period = period
        self._monotonic = monotonic
        self._throttles: dict[str, Throttle] = {}
        self._known: set[tuple[str, type]] = set()
        self._lock = threading.Lock()  # the worker, the dispatcher and timers report

    def report(self, error: BaseException, what: str, place: str = "") -> bool:
        """Log ``"<what>: <Type>: <message>"`` for ``error`` met at ``place`` (throttled per
        place; a bug's first occurrence with its traceback, never held back). True when a line
        was written. Never raises: reporting must not become the next failure."""
        try:
            with self._lock:
                return self._report(error, what, place)
        except Exception:  # a broken logger: nothing better to do than to go on
            return False

    def _report(self, error: BaseException, what: str, place: str) -> bool:
        throttle = self._throttles.get(place)
        if throttle is None:
            throttle = self._throttles[place] = Throttle(self._period, self._monotonic)
        key = (place, type(error))
        first_bug = not is_bad_input(error) and key not in self._known
        if first_bug and len(self._known) < MAX_KNOWN_BUGS:
            self._known.add(key)
            suppressed = throttle.force()
        else:
            first_bug = False
            shown, suppressed = throttle()
            if not shown:
                return False
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        line = f"{what}: {describe(error)}{more}"
        if is_bad_input(error):
            self._warning(line)
        elif first_bug:
            trace = "".join(traceback.format_exception(error)).rstrip()
            self._error(
                f"{line}\nunexpected error (a bug); its traceback is logged once per error "
                f"type, the node goes on:\n{trace}"
            )
        else:
            self._error(f"{line} (a bug; traceback logged at its first occurrence)")
        return True
