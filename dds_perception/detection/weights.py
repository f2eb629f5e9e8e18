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
from dds_perception.models.pretrained import (
    WeightsImportError,
    batchnorm_state_dict,
    convert_mobilenet_v2,
    read_torchvision_checkpoint,
)
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
    # frozen BatchNorms (fine-tuning) save as plain ones: the file loads into a fresh build
    return save_weights(path, batchnorm_state_dict(model), meta)


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
        raise CheckpointError(f"{source}: bad detector config in metadata ({error})") from error


def load_detector(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    input_size: tuple[int, int] | None = None,
    refine_top_k: int | None = None,
    refine_score_weight: float | None = None,
) -> RPNDetector:
    """Rebuild the detector stored in ``path`` (in eval mode); its metadata is ``model.meta``.

    ``input_size`` (height, width) runs the network at another letterbox size than the one it
    was saved with: the network is fully convolutional and the anchors follow the input, so the
    same weights serve any size (what ``crossval --eval-input-sizes`` measures).
    ``refine_top_k`` changes how many candidates per image the second stage refines (the
    weights do not depend on it; ``crossval --eval-refine-top-ks``); only for a file that has
    a second stage. ``refine_score_weight`` likewise weighs the second stage's IoU output in
    the refined candidates' scores (``crossval --eval-refine-score-weights``); only for a file
    whose second stage has one.
    Raises :class:`CheckpointError` naming the file when it is missing, corrupt, truncated, holds
    another task's weights or tensors that do not fit the described architecture.
    """
    meta = read_meta(path)
    config = config_from_meta(meta, path)
    if input_size is not None:
        config = config.replace(input_size=tuple(int(v) for v in input_size))
    if refine_top_k is not None:
        if not config.refine_top_k or int(refine_top_k) < 1:
            raise CheckpointError(
                f"{path}: refine_top_k {refine_top_k}: need >= 1 and a detector with a second "
                f"stage (this file's refine_top_k is {config.refine_top_k})"
            )
        config = config.replace(refine_top_k=int(refine_top_k))
    if refine_score_weight is not None:
        if not (config.refine_top_k and config.refine_score):
            raise CheckpointError(
                f"{path}: refine_score_weight {refine_score_weight}: this file's detector has "
                "no second stage with an IoU output (refine_score)"
            )
        try:
            config = config.replace(refine_score_weight=float(refine_score_weight))
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from error
    try:
        model = build_detector(config)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot build the described detector ({error})") from error
    state, meta = load_weights(path)
    load_state_into(model, state, source=path)
    model.meta = meta
    return model.to(device).eval()


TORCH_SUFFIXES = (".pth", ".pt")


def backbone_normalization(
    path: str | os.PathLike[str],
) -> tuple[list[float], list[float]] | None:
    """(mean, std) on a 0-1 scale that a backbone weights file was trained with, if it says."""
    if Path(path).suffix in TORCH_SUFFIXES:
        return None  # a bare state dict does not say
    norm = read_meta(path).get("normalization") or {}
    if "mean" in norm and "std" in norm:
        return [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    return None


def load_backbone_weights(model: RPNDetector, path: str | os.PathLike[str]) -> int:
    """Copy the ``features.`` tensors of a classification weights file into the backbone.

    ``path`` is a dds_perception weights file (``train-classifier``, ``import-weights``) or a
    torchvision MobileNetV2 state dict (``.pth``/``.pt``, read with ``weights_only=True`` and
    mapped by :func:`~dds_perception.models.pretrained.convert_mobilenet_v2`). Returns the
    number of tensors loaded. The backbone names must match (a classifier of another
    architecture or width is a :class:`CheckpointError` naming the file).
    """
    if Path(path).suffix in TORCH_SUFFIXES:
        if model.config.backbone not in ("mobilenet_v2", "dds_mobilenet_v2"):
            raise CheckpointError(
                f"{path}: torchvision MobileNetV2 checkpoints map into mobilenet_v2 and "
                f"dds_mobilenet_v2, not {model.config.backbone}"
            )
        try:
            state = convert_mobilenet_v2(
                read_torchvision_checkpoint(path), model.backbone, source=str(path)
            )
        except WeightsImportError as error:
            raise CheckpointError(str(error)) from error
        model.backbone.load_state_dict(state)
        return len(state)
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
