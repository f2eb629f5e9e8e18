"""The package's exceptions have one root, so callers can tell bad input from bugs.

Every area raises its own subclass of :class:`DdsPerceptionError` (``KittiFormatError``,
``CheckpointError``, ...) for input it cannot use: a file, field or value that is wrong. The
command line catches only these (and missing or unreadable files) and prints one line; anything
else is a bug and keeps its traceback. The subclasses also derive from the built-in type they
replaced (mostly ``ValueError``), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class DdsPerceptionError(Exception):
    """Root of the package's own errors: input it cannot use, named in the message."""


class UsageError(DdsPerceptionError, ValueError):
    """A command-line option or argument that cannot work (value out of range, conflict)."""


# What a command reports in one line and exit status 1 (the command line, a node at start): the
# package's own errors and files that are not there or cannot be opened, whose messages name the
# file. Anything else is a bug and keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    DdsPerceptionError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
