"""Training checkpoints as small part files with a manifest, so they can travel in pieces.

A GPU machine lent for a few minutes hands back only files of at most 16 MB; a classifier's
training state (weights and SGD momentum, 8-27 MB for the paper's four backbones) is larger. So a
checkpoint here is ``torch.save`` bytes cut into part files of at most ``part_bytes`` (15 MiB by
default) plus a JSON manifest (``checkpoint.json``) that names each part with its size and
SHA-256 and the SHA-256 of the whole. Loading checks all of them (a missing, truncated or
altered part is a :class:`CheckpointError` naming it) and reads the state with
``weights_only=True``.

Writing is crash-safe: new parts get new names (``checkpoint-e0012.part00`` for the state after
epoch 12), the manifest is replaced atomically last, and only then are parts deleted that
neither the new checkpoint nor the one before it uses. The manifest keeps that previous
checkpoint too, so models trained side by side that were killed between their saves can all go
back to the last epoch they share.

For transfer, :func:`recompress` rewrites the latest checkpoint with a lossless byte-shuffle +
zlib encoding (about 15 % smaller for float32 weights), which :func:`load_parts` reads as well.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dds_perception.utils.checkpoint import CheckpointError
from dds_perception.utils.io import atomic_open

MANIFEST_FORMAT = "dds_perception.checkpoint-parts/1"
PART_BYTES = 15 * 2**20  # under the 16 MB a device machine hands back per file
ENCODINGS = ("raw", "shuffle4-zlib")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(data: bytes, encoding: str) -> bytes:
    """``data`` as stored: raw, or its bytes regrouped by position in 4-byte words (the
    exponent bytes of float32 values side by side), then zlib-compressed."""
    if encoding == "raw":
        return data
    if encoding != "shuffle4-zlib":
        raise ValueError(f"unknown checkpoint encoding {encoding!r}; known: {ENCODINGS}")
    padded = data + b"\0" * (-len(data) % 4)
    planes = np.frombuffer(padded, np.uint8).reshape(-1, 4).T.tobytes()
    return zlib.compress(planes, 6)


def _decode(stored: bytes, encoding: str, size: int) -> bytes:
    if encoding == "raw":
        return stored
    if encoding != "shuffle4-zlib":
        raise ValueError(f"unknown checkpoint encoding {encoding!r}; known: {ENCODINGS}")
    planes = np.frombuffer(zlib.decompress(stored), np.uint8).reshape(4, -1)
    return planes.T.tobytes()[:size]


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest at ``path``; errors name the file."""
    file = Path(path)
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint manifest not found: {file}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable checkpoint manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{file}: not a checkpoint manifest ({MANIFEST_FORMAT})")
    return manifest


def saved_epochs(path: str | os.PathLike[str]) -> list[int]:
    """The epochs a manifest holds checkpoints of, latest first."""
    manifest = read_manifest(path)
    return [entry["epoch"] for entry in (manifest["latest"], manifest.get("previous")) if entry]


def _write_entry(
    folder: Path, stem: str, epoch: int, data: bytes, encoding: str, part_bytes: int
) -> dict[str, Any]:
    """Write ``data`` as new part files; return their manifest entry (without epoch/step)."""
    stored = _encode(data, encoding)
    tag = f"e{epoch:04d}-{os.urandom(3).hex()}"  # never the name of a part in use
    parts = []
    for index, start in enumerate(range(0, max(len(stored), 1), part_bytes)):
        chunk = stored[start : start + part_bytes]
        name = f"{stem}-{tag}.part{index:02d}"
        with atomic_open(folder / name, "wb") as handle:
            handle.write(chunk)
        parts.append({"file": name, "size": len(chunk), "sha256": _sha256(chunk)})
    return {
        "encoding": encoding,
        "size": len(data),
        "sha256": _sha256(data),
        "part_bytes": part_bytes,
        "parts": parts,
    }


def _write_manifest(path: Path, latest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    manifest = {"format": MANIFEST_FORMAT, "latest": latest, "previous": previous}
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    _remove_unused(path, manifest)


def _remove_unused(manifest_path: Path, manifest: dict[str, Any]) -> None:
    used = {
        part["file"]
        for entry in (manifest["latest"], manifest.get("previous"))
        if entry
        for part in entry["parts"]
    }
    for file in manifest_path.parent.glob(f"{manifest_path.stem}-*.part*"):
        if file.name not in used:
            file.unlink(missing_ok=True)


def save_parts(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    *,
    epoch: int,
    step: int,
    part_bytes: int = PART_BYTES,
    encoding: str = "raw",
) -> Path:
    """Write ``state`` (after ``epoch`` epochs, ``step`` steps) as parts + manifest ``path``."""
    manifest_path = Path(path)
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    previous = None
    if manifest_path.is_file():
        old = read_manifest(manifest_path)
        # a second save of the same epoch replaces it and keeps the one before
        previous = old["previous"] if old["latest"]["epoch"] == epoch else old["latest"]
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    entry = _write_entry(
        manifest_path.parent, manifest_path.stem, epoch, buffer.getvalue(), encoding, part_bytes
    )
    _write_manifest(manifest_path, {"epoch": epoch, "step": step, **entry}, previous)
    return manifest_path


def load_parts(path: str | os.PathLike[str], *, epoch: int | None = None) -> dict[str, Any]:
    """Read the latest checkpoint of manifest ``path`` (or the one after ``epoch`` epochs),
    checking every part and the whole against the manifest."""
    manifest_path = Path(path)
    manifest = read_manifest(manifest_path)
    entries = [entry for entry in (manifest["latest"], manifest.get("previous")) if entry]
    if epoch is not None:
        entries = [entry for entry in entries if entry["epoch"] == epoch]
        if not entries:
            raise CheckpointError(
                f"{manifest_path}: no checkpoint after epoch {epoch} "
                f"(it holds epochs {saved_epochs(manifest_path)})"
            )
    entry = entries[0]
    chunks = []
    for part in entry["parts"]:
        file = manifest_path.parent / part["file"]
        try:
            chunk = file.read_bytes()
        except OSError as error:
            raise CheckpointError(f"{manifest_path}: checkpoint part missing: {file}") from error
        if len(chunk) != part["size"] or _sha256(chunk) != part["sha256"]:
            raise CheckpointError(
                f"{manifest_path}: checkpoint part {file} is truncated or altered "
                f"({len(chunk)} bytes, the manifest says {part['size']})"
            )
        chunks.append(chunk)
    try:
        data = _decode(b"".join(chunks), entry["encoding"], entry["size"])
    except (ValueError, zlib.error) as error:
        raise CheckpointError(f"{manifest_path}: undecodable checkpoint ({error})") from error
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(f"{manifest_path}: the joined parts do not give the checkpoint")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"{manifest_path}: unreadable training state ({error})") from error


def keep_only(path: str | os.PathLike[str], epoch: int) -> None:
    """Keep only the checkpoint after ``epoch`` epochs (drop the other and its parts)."""
    manifest_path = Path(path)
    manifest = read_manifest(manifest_path)
    entries = [e for e in (manifest["latest"], manifest.get("previous")) if e]
    chosen = [entry for entry in entries if entry["epoch"] == epoch]
    if not chosen:
        raise CheckpointError(f"{manifest_path}: no checkpoint after epoch {epoch}")
    _write_manifest(manifest_path, chosen[0], None)


def recompress(path: str | os.PathLike[str], encoding: str = "shuffle4-zlib") -> int:
    """Rewrite the latest checkpoint of manifest ``path`` alone, with ``encoding``; return the
    bytes of its parts. The state is read back and checked before the manifest changes."""
    manifest_path = Path(path)
    manifest = read_manifest(manifest_path)
    latest = manifest["latest"]
    state = load_parts(manifest_path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    part_bytes = latest.get("part_bytes") or PART_BYTES
    entry = _write_entry(
        manifest_path.parent,
        manifest_path.stem,
        latest["epoch"],
        buffer.getvalue(),
        encoding,
        part_bytes,
    )
    _write_manifest(manifest_path, {**latest, **entry}, None)
    load_parts(manifest_path)  # the rewritten checkpoint reads back
    return sum(part["size"] for part in entry["parts"])


def compact_together(paths: list[str | os.PathLike[str]], encoding: str = "shuffle4-zlib") -> int:
    """Prepare the checkpoints of models trained side by side for transfer: keep in each only
    the last epoch all of them hold, written with ``encoding``; return that epoch."""
    manifests = [Path(path) for path in paths]
    if not manifests:
        raise CheckpointError("no checkpoint manifests given")
    common = min(saved_epochs(path)[0] for path in manifests)
    for path in manifests:
        keep_only(path, common)
        recompress(path, encoding)
    return common


def main(argv: list[str] | None = None) -> int:
    """``python -m dds_perception.engine.checkpoint_parts compact MANIFEST...`` (used by
    scripts/gpu_caltech.sh before the checkpoints travel back)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dds_perception.engine.checkpoint_parts")
    parser.add_argument("action", choices=["compact"])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--encoding", choices=ENCODINGS, default="shuffle4-zlib")
    args = parser.parse_args(argv)
    try:
        epoch = compact_together(args.manifests, args.encoding)
    except CheckpointError as error:
        print(f"checkpoint_parts: error: {error}", file=sys.stderr)
        return 1
    sizes = sum(p.stat().st_size for m in args.manifests for p in m.parent.glob("*.part*"))
    print(
        f"{len(args.manifests)} checkpoint(s) at epoch {epoch}, {sizes / 2**20:.1f} MiB of parts"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
