"""Build, save and load detectors as self-describing safetensors files.

A detector weights file holds the network's tensors and, in its header, ``task: "detection"``,
the :class:`DetectorConfig` (backbone name and arguments, input size, normalisation, anchors,
thresholds), ``class_names``, ``input_size``, ``normalization``, the training ``recipe`` and the
``metrics`` it reached. :func:`load_detector` rebuilds the network from that file alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dds_perception.detection.config import DetectorConfig, DetectorConfigError
from dds_perception.detection.detector import RPNDetector
from dds_perception.utils.checkpoint import (
    CheckpointError,
    load_state_into,
    load_weights,
    read_meta,
    save_weights,
)

TASK = "detection"
ARCHITECTURE = "rpn_detector"
CLASS_NAMES = ("car",)


def build_detector(config: DetectorConfig | None = None) -> RPNDetector:
    """A freshly initialised detector for ``config`` (default: :class:`DetectorConfig()`)."""
    return RPNDetector(config or DetectorConfig())


def detector_meta(
    config: DetectorConfig,
    *,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    class_names: tuple[str, ...] = CLASS_NAMES,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata document stored in a detector weights file."""
    return {
        "task": TASK,
        "architecture": ARCHITECTURE,
        "config": config.to_dict(),
        "class_names": list(class_names),
        "input_size": list(config.input_size),
        "normalization": {"mean": list(config.mean), "std": list(config.std), "scale": 255.0},
        "recipe": dict(recipe or {}),
        "metrics": dict(metrics or {}),
        **extra,
    }


def save_detector(
    path: str | os.PathLike[str],
    model: RPNDetector,
    *,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` and its description to ``path`` atomically; return the path."""
    model = getattr(model, "module", model)  # unwrap DDP
    meta = detector_meta(model.config, recipe=recipe, metrics=metrics, **extra)
    return save_weights(path, model.state_dict(), meta)


def config_from_meta(meta: Mapping[str, Any], source: str | os.PathLike[str]) -> DetectorConfig:
    """The :class:`DetectorConfig` of a weights file's metadata; wrong task -> CheckpointError."""
    task = meta.get("task")
    if task != TASK:
        raise CheckpointError(
            f"{source}: holds a {task or 'unknown'!s} model, not a detector (task {TASK!r}); "
            "pass detector weights"
        )
    try:
        return DetectorConfig.from_dict(meta["config"])
    except (KeyError, TypeError, DetectorConfigError) as error:
        raise CheckpointError(f"{source}: bad detector config in metadata ({error})") from None


def load_detector(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> RPNDetector:
    """Rebuild the detector stored in ``path`` (in eval mode); its metadata is ``model.meta``.

    Raises :class:`CheckpointError` naming the file when it is missing, corrupt, truncated, holds
    another task's weights or tensors that do not fit the described architecture.
    """
    meta = read_meta(path)
    config = config_from_meta(meta, path)
    try:
        model = build_detector(config)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot build the described detector ({error})") from None
    state, meta = load_weights(path)
    load_state_into(model, state, source=path)
    model.meta = meta
    return model.to(device).eval()


def load_backbone_weights(model: RPNDetector, path: str | os.PathLike[str]) -> int:
    """Copy the ``features.`` tensors of a classification weights file into the backbone.

    Returns the number of tensors loaded. The backbone names must match (a classifier of another
    architecture or width is a :class:`CheckpointError` naming the file).
    """
    meta = read_meta(path)
    state, _ = load_weights(path)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise CheckpointError(f"{path}: no 'features.' tensors (not a backbone/classifier file)")
    source_name = (meta.get("build_args") or meta.get("architecture") or {}) if meta else {}
    target = model.backbone.state_dict()
    missing = sorted(k for k in target if k.startswith("features.") and k not in features)
    mismatched = [
        k for k, v in features.items() if k in target and tuple(target[k].shape) != tuple(v.shape)
    ]
    unexpected = sorted(k for k in features if k not in target)
    if missing or mismatched or unexpected:
        detail = (missing or mismatched or unexpected)[:3]
        raise CheckpointError(
            f"{path}: backbone weights ({source_name}) do not fit {model.config.backbone} "
            f"{model.config.backbone_kwargs} (missing {len(missing)}, shape mismatch "
            f"{len(mismatched)}, unexpected {len(unexpected)}; e.g. {detail})"
        )
    model.backbone.load_state_dict(features, strict=False)
    return len(features)
