"""Evaluation: KITTI 2D detection AP with the official devkit's semantics."""

from dds_perception.evaluation.kitti import (
    DIFFICULTIES,
    KittiEvalError,
    KittiEvalResult,
    KittiEvalWarning,
    PrecisionCurve,
    evaluate,
    evaluate_folders,
)

__all__ = [
    "DIFFICULTIES",
    "KittiEvalError",
    "KittiEvalResult",
    "KittiEvalWarning",
    "PrecisionCurve",
    "evaluate",
    "evaluate_folders",
]
