"""Atomic file output: a partial file is never left behind under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories (e.g. a bag folder). On an exception the temporary output is
    removed and the exception propagates, so readers never see a half-written result. A file
    gets the permissions of any new file (the umask's), also when its writer made it private
    (safetensors' ``save_file`` writes 0600: a node running as another user could not read it).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to {target} for {final}")
        if target.is_file():
            probe = tmp / ".mode"
            probe.touch()  # created with the process's umask, which cannot be read without
            target.chmod(probe.stat().st_mode & 0o777)  # setting it
        if final.is_dir() and not final.is_symlink():
            import shutil

            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def cache_dir() -> Path:
    """Where derived files go (exports, compiled kernels): ``$DDS_PERCEPTION_CACHE`` or
    ``$XDG_CACHE_HOME/dds_perception`` (default ``~/.cache/dds_perception``)."""
    root = os.environ.get("DDS_PERCEPTION_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dds_perception"
