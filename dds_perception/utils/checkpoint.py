"""Self-describing weights files and resumable training states.

A weights file is a safetensors file whose header metadata holds one JSON document (key
``dds_perception``) describing the model: architecture name and arguments, class names, input size
and normalisation, training recipe and metrics. Loading never executes code from the file.
Training states (for ``--resume``) are ``torch.save`` dicts read back with ``weights_only=True``.
Every write is atomic; every read error names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import atomic_path

META_KEY = "dds_perception"
FORMAT = "dds_perception.weights/1"


class CheckpointError(DdsPerceptionError, ValueError):
    """A weights or training-state file is missing, corrupt, or describes another model."""


def save_weights(
    path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``state_dict`` and ``meta`` to a safetensors file atomically; return the path."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {META_KEY: json.dumps({"format": FORMAT, **meta}, sort_keys=True)}
    final = Path(path)
    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return final


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the metadata of a weights file without loading its tensors."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"weights file not found: {file}")
    try:
        # safetensors reads and checks only the header here; the tensors stay on disk
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorsError, OSError) as error:
        raise CheckpointError(f"{file}: not a safetensors weights file ({error})") from error
    meta = header.get(META_KEY)
    if meta is None:
        raise CheckpointError(
            f"{file}: no '{META_KEY}' metadata; not a dds_perception weights file"
        )
    try:
        data = json.loads(meta)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: unreadable '{META_KEY}' metadata ({error})") from error
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{file}: unsupported format {data.get('format')!r}, want {FORMAT}")
    return data


def load_weights(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, meta)`` from a weights file; errors name the file."""
    meta = read_meta(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorsError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated weights ({error})") from error
    return tensors, meta


def load_state_into(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | os.PathLike[str]
) -> None:
    """Load ``state_dict`` strictly, turning key/shape mismatches into a clear error."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(
            f"{source}: weights do not fit {type(module).__name__} ({first})"
        ) from error


def save_training_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write a resumable training state atomically with ``torch.save``."""
    final = Path(path)
    with atomic_path(final) as tmp:
        torch.save(state, tmp)
    return final


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training state with ``weights_only=True`` (no code execution)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"training state not found: {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"{file}: corrupt or truncated training state ({error})") from error
