"""The detector's configuration: one frozen dataclass that rebuilds the network from data.

The configuration travels inside every weights file (``meta["config"]``), so a detector is rebuilt
from the file alone. Unknown keys are an error, never silently dropped.

Default input size: 384x1248 (H x W). KITTI frames (1242x375, 1224x370, 1238x374, 1241x376)
letterbox into it at a scale of about 1.0, so cars keep their native pixel size (the far, small
cars that decide the moderate/hard AP are not shrunk) and both sides are multiples of 32, the
stride of ``layer17`` (12 x 39 anchor locations). Halving the resolution would cut the MACs by
four, but KITTI's 25 px minimum box height would become 12.5 px, below one stride-32 cell's
reach; the benchmark also compares full-resolution frames against ``ssd300_vgg16``.

Default anchors: the anchor statistics of the 175 Car boxes of ``../shared/data/kitti_sample``
at that input size (``dds-perception anchors --labels ../shared/data/kitti_sample/training/label_2
--input-size 384 1248 --sizes 5 --ratios 3``): sizes (sqrt of the area) at the 10/30/50/70/90 %
quantiles 26.5, 38.6, 56.2, 89.1, 175.8 px, height/width ratios at the 17/50/83 % quantiles 0.473,
0.678, 0.848; 15 anchors per location, mean best shape-IoU 0.76, 94 % of cars with an anchor of
shape-IoU >= 0.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dds_perception.utils.errors import DdsPerceptionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorConfigError(DdsPerceptionError, ValueError):
    """A detector configuration has an unknown key or an invalid value."""


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector's architecture, anchors, matching and inference.

    Sizes are in network-input pixels. ``aspect_ratios`` are height / width (torchvision's
    convention). With ``use_layer13`` the stride-16 map gets its own head and the anchor sizes
    below ``layer13_max_size`` (the small ones), the stride-32 map keeps the rest.
    """

    backbone: str = "dds_mobilenet_v2"
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] = (384, 1248)  # (height, width)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    anchor_sizes: tuple[float, ...] = (26.5, 38.6, 56.2, 89.1, 175.8)
    aspect_ratios: tuple[float, ...] = (0.473, 0.678, 0.848)
    use_layer13: bool = False
    layer13_max_size: float = 64.0
    head_channels: int = 128  # cap on the RPN 3x3 conv's width; 0 = the map's (Faster R-CNN)
    # training: matching, sampling and losses
    fg_iou: float = 0.6
    bg_iou: float = 0.3
    ignore_ioa: float = 0.5  # anchor inside a Van/DontCare region by more than this: ignored
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_loss: str = "giou"  # or "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9.0
    box_loss_weight: float = 1.0
    objectness_target: str = "iou"  # positives learn their decoded box's IoU; or "binary"
    # "sampled": BCE on the balanced sample (Faster R-CNN's RPN); "focal": focal BCE over every
    # anchor that is not ignored, summed over the positives (RetinaNet / GFL's quality focal loss)
    objectness_loss: str = "focal"
    focal_gamma: float = 2.0
    # second stage (0: off): the refine_top_k best candidates of each image get box corrections
    # from RoI-aligned features of the first feature map (detection.detector.BoxRefiner)
    refine_top_k: int = 0
    refine_channels: int = 64
    refine_hidden: int = 256
    # roi_align's output size (refine_pool x refine_pool bins) and samples per bin side: the
    # stage's cost grows with the square of each (detection.detector.BoxRefiner)
    refine_pool: int = 7
    refine_sampling_ratio: int = 2
    # the stage also predicts the IoU of its box with the nearest car; a refined candidate's
    # score becomes first ** (1 - w) * predicted IoU ** w, w = refine_score_weight
    refine_score: bool = False
    refine_score_weight: float = 0.5
    refine_loss_weight: float = 1.0
    # inference
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    vote_iou: float = 0.0  # box voting after NMS (0: off; see detection.postprocess)
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    min_box_size: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        for name in ("input_size", "mean", "std", "anchor_sizes", "aspect_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DetectorConfigError` naming the first invalid field."""
        height, width = self.input_size
        if len(self.input_size) != 2 or height % 32 or width % 32 or height <= 0 or width <= 0:
            raise DetectorConfigError(
                f"input_size {self.input_size}: need (height, width), both positive multiples "
                "of 32 (the stride of layer17)"
            )
        if not self.anchor_sizes or any(s <= 0 for s in self.anchor_sizes):
            raise DetectorConfigError(f"anchor_sizes {self.anchor_sizes}: need positive sizes")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise DetectorConfigError(f"aspect_ratios {self.aspect_ratios}: need positive ratios")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise DetectorConfigError(
                f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou}, fg_iou={self.fg_iou}"
            )
        if self.box_loss not in ("smooth_l1", "giou"):
            raise DetectorConfigError(f"box_loss {self.box_loss!r}: use 'smooth_l1' or 'giou'")
        if self.objectness_loss not in ("sampled", "focal"):
            raise DetectorConfigError(
                f"objectness_loss {self.objectness_loss!r}: use 'sampled' or 'focal'"
            )
        if self.objectness_target not in ("binary", "iou"):
            raise DetectorConfigError(
                f"objectness_target {self.objectness_target!r}: use 'binary' or 'iou'"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise DetectorConfigError(f"mean {self.mean} / std {self.std}: need 3 values, std > 0")
        if self.use_layer13:
            small, large = self.level_sizes()
            if not small or not large:
                raise DetectorConfigError(
                    f"use_layer13 with layer13_max_size={self.layer13_max_size}: anchor_sizes "
                    f"{self.anchor_sizes} must fall on both sides of it"
                )
        refine_sizes = ("refine_channels", "refine_hidden", "refine_pool", "refine_sampling_ratio")
        for name in ("refine_top_k", *refine_sizes):
            if getattr(self, name) < 0 or (self.refine_top_k and getattr(self, name) == 0):
                raise DetectorConfigError(
                    f"{name} {getattr(self, name)}: must be >= 0, and > 0 with refine_top_k"
                )
        if self.head_channels < 0:
            raise DetectorConfigError(f"head_channels {self.head_channels}: must be >= 0")
        for name in (
            "score_threshold",
            "nms_iou",
            "vote_iou",
            "positive_fraction",
            "ignore_ioa",
            "refine_score_weight",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DetectorConfigError(f"{name} {value}: must lie in [0, 1]")

    def level_sizes(self) -> list[tuple[float, ...]]:
        """Anchor sizes per feature map, in the order of :meth:`feature_names`."""
        if not self.use_layer13:
            return [self.anchor_sizes]
        small = tuple(s for s in self.anchor_sizes if s < self.layer13_max_size)
        large = tuple(s for s in self.anchor_sizes if s >= self.layer13_max_size)
        return [small, large]

    def feature_names(self) -> list[str]:
        """Backbone feature maps the heads read."""
        return ["layer13", "layer17"] if self.use_layer13 else ["layer17"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """Build from :meth:`to_dict` output; unknown keys raise :class:`DetectorConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DetectorConfigError(
                f"unknown detector config key(s) {unknown}; known: {sorted(known)}"
            )
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as error:
            if isinstance(error, DetectorConfigError):
                raise
            raise DetectorConfigError(f"invalid detector config: {error}") from error

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with ``changes`` applied (validated; unknown keys raise)."""
        return DetectorConfig.from_dict({**self.to_dict(), **changes})
