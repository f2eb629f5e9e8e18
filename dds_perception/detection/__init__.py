"""Single-class (car) RPN detector on a registered backbone, from torchvision's detection parts."""

from dds_perception.detection.config import DetectorConfig, DetectorConfigError
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.postprocess import PostprocessParams, postprocess
from dds_perception.detection.weights import (
    build_detector,
    detector_meta,
    load_backbone_weights,
    load_detector,
    save_detector,
)

__all__ = [
    "DetectorConfig",
    "DetectorConfigError",
    "PostprocessParams",
    "RPNDetector",
    "build_detector",
    "detector_meta",
    "load_backbone_weights",
    "load_detector",
    "postprocess",
    "save_detector",
]
