"""Process-wide settings that a command (the node, bench, demo) opts into; library code never.

glibc's handling of freed memory is one setting for the whole process, so no pipeline or
backend changes it: the program that owns the process decides, with an explicit option
(``dds-perception bench``/``demo`` ``--reuse-freed-memory``; the node's parameter of the same
idea), and :func:`freed_memory_reuse` restores what was in effect before when its block ends.

glibc has no call that reads these settings back, so "what was in effect" is what this module
last set (nested blocks restore each other's state); before its first change that is glibc's
own behaviour, which :func:`~dds_perception.utils.runtime.reuse_freed_memory` restores as far as
``mallopt`` allows (glibc's adaptive mmap threshold stays fixed once any threshold is set).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from dds_perception.utils import runtime

_lock = threading.Lock()
_reusing = False  # what this module last told glibc (False: glibc's own behaviour)


@contextlib.contextmanager
def freed_memory_reuse(enabled: bool = True) -> Iterator[bool]:
    """Keep glibc from returning freed blocks to the kernel inside the block (``enabled``), or
    give it its default behaviour there (``False``); restore the state from before on exit.

    Why: by default glibc serves each large feature map of a CPU forward pass with a fresh
    ``mmap`` and unmaps it on free, so it is page-faulted in again on every frame (measured on a
    (1, 96, 192, 624) map, 2 threads: ``relu`` 13.0 -> 1.8 ms). Yields whether the setting could
    be applied (False where the C library is not glibc). Changes nothing when the state is
    already the asked one, so a per-call block costs two comparisons.
    """
    global _reusing
    with _lock:
        before = _reusing
        applied = True
        if enabled != before:
            applied = runtime.reuse_freed_memory(enabled)
            if applied:
                _reusing = enabled
    try:
        yield applied
    finally:
        with _lock:
            if _reusing != before:
                runtime.reuse_freed_memory(before)
                _reusing = before


def reusing_freed_memory() -> bool:
    """Whether a :func:`freed_memory_reuse` block has glibc keeping freed memory now."""
    return _reusing
