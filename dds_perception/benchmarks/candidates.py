"""The networks the bench compares, each as a bare network plus its input at its own size.

* Backbones: the zoo's four (``dds_perception.models``) and, for reference, torchvision's
  ``shufflenet_v2_x1_0`` and ``mobilenet_v3_large``, all as classifiers (1000 classes) on
  224x224, untrained (speed does not depend on the weights).
* Detectors on a KITTI frame (1242x375): ours (the paper's stride-32 RPN head, the stride-16
  option, and ``dds_rpn_kitti``: the architecture of the node's default weights file, read from
  it, second stage included) on the letterboxed 384x1248 input; torchvision's ``ssd300_vgg16``
  (the paper's comparison), ``ssdlite320_mobilenet_v3_large`` and
  ``fasterrcnn_mobilenet_v3_large_320_fpn`` (``weights=None, weights_backbone=None``) on the
  tensor their own transform makes of the frame (300x300, 320x320, and 224x640 for Faster
  R-CNN's min_size=320/max_size=640 resize).

"Network" means what runs on that tensor: backbone + detection head (+ our box decoding; for
the two-stage Faster R-CNN, RPN proposals + RoI heads, since the second stage needs the first's
proposals). The user-level call (resize, normalisation, postprocess) is timed separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

from dds_perception.models import get_model
from dds_perception.utils.errors import UsageError

if TYPE_CHECKING:
    from dds_perception.detection import DetectorConfig

KITTI_FRAME = (375, 1242)  # (height, width) of a full-resolution KITTI frame
OUR_INPUT = (384, 1248)  # the frame letterboxed to multiples of 32 (scale 1.0)
REFERENCE = "ssd300_vgg16"  # what every detector's speed ratio is measured against

BACKBONES = ("dds_mobilenet_v2", "mobilenet_v1", "mobilenet_v2", "shufflenet_v1")
TORCHVISION_BACKBONES = ("shufflenet_v2_x1_0", "mobilenet_v3_large")
# ours by name: the paper's stride-32 head and that + a stride-16 head (the DetectorConfig
# fields each adds to the defaults), and the shipped detector's architecture as its file
# describes it
OUR_DETECTOR_CONFIGS: dict[str, dict[str, Any]] = {
    "dds_rpn_s32": {},
    "dds_rpn_s16": {"use_layer13": True},
}
SHIPPED = "dds_rpn_kitti"  # models/dds_detector_kitti.safetensors, the node's default
OUR_DETECTORS = (*OUR_DETECTOR_CONFIGS, SHIPPED)
TORCHVISION_DETECTORS = (
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)


@dataclass
class Candidate:
    """One network to measure."""

    name: str
    source: str  # "dds_perception" or "torchvision"
    network: nn.Module  # eval mode, fp32, CPU
    input_size: tuple[int, int]  # (height, width) of the network's input tensor
    description: str = ""
    # the user-level call on a float frame (3, H, W) in [0, 1]; None when not applicable
    call: Callable[[torch.Tensor], Any] | None = None
    exportable: bool = True  # can torch.onnx export the network (for the ONNX backend)
    static_shapes: bool = True  # every tensor's shape fixed by the input's (CUDA graphs apply)
    extra: dict[str, Any] = field(default_factory=dict)

    def example(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic input batch (normalised-image-like values) at the network's size."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, 3, *self.input_size), generator=generator)


def backbone_candidate(name: str, image_size: int = 224) -> Candidate:
    """A classifier from the zoo or torchvision, untrained, eval mode."""
    if name in TORCHVISION_BACKBONES:
        network = getattr(torchvision.models, name)(weights=None)
        source = "torchvision"
    else:
        network = get_model(name, num_classes=1000)
        source = "dds_perception"
    return Candidate(name, source, network.eval(), (image_size, image_size))


class _SSDNetwork(nn.Module):
    """torchvision SSD without its transform and postprocess: backbone + head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


class _TwoStageNetwork(nn.Module):
    """torchvision Faster R-CNN without its transform: backbone, RPN, RoI heads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        sizes = [tuple(x.shape[-2:])] * x.shape[0]
        images = ImageList(x, sizes)
        features = self.backbone(x)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, sizes)
        return detections


def _transformed_size(model: nn.Module, frame: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the tensor a torchvision detector's transform makes of a frame."""
    with torch.no_grad():
        images, _ = model.transform([torch.zeros(3, *frame)])
    return tuple(int(v) for v in images.tensors.shape[-2:])


def torchvision_detector(name: str, frame: tuple[int, int] = KITTI_FRAME) -> Candidate:
    """An untrained torchvision detector; its network runs on what its transform makes."""
    builder = getattr(torchvision.models.detection, name)
    model = builder(weights=None, weights_backbone=None).eval()
    size = _transformed_size(model, frame)
    if name.startswith("fasterrcnn"):
        network: nn.Module = _TwoStageNetwork(model)
        exportable = False  # data-dependent proposal selection; not worth the export here
    else:
        network = _SSDNetwork(model)
        exportable = True
    static_shapes = exportable  # the two-stage network's proposals vary in number
    return Candidate(
        name,
        "torchvision",
        network.eval(),
        size,
        description=f"resizes a {frame[1]}x{frame[0]} frame to {size[1]}x{size[0]} itself",
        call=lambda frame_tensor: model([frame_tensor]),
        exportable=exportable,
        static_shapes=static_shapes,
        extra={"model": model},
    )


def shipped_config(input_size: tuple[int, int] = OUR_INPUT) -> DetectorConfig:
    """The architecture of the node's default weights file (read from its metadata, so the
    bench follows whatever ships), at ``input_size``."""
    from dds_perception.detection.weights import config_from_meta
    from dds_perception.pipeline import default_weights
    from dds_perception.utils.checkpoint import read_meta

    path = default_weights()
    return config_from_meta(read_meta(path), path).replace(input_size=tuple(input_size))


def our_detector(name: str, input_size: tuple[int, int] = OUR_INPUT) -> Candidate:
    """Our RPN detector (untrained; its speed does not depend on the weights): one of
    :data:`OUR_DETECTOR_CONFIGS`, or :data:`SHIPPED`."""
    from dds_perception.detection import DetectorConfig, build_detector

    if name not in OUR_DETECTORS:
        raise UsageError(f"unknown detector {name!r}; ours are {', '.join(OUR_DETECTORS)}")
    if name == SHIPPED:
        config = shipped_config(input_size)
    else:
        config = DetectorConfig(input_size=tuple(input_size), **OUR_DETECTOR_CONFIGS[name])
    model = build_detector(config).eval()
    heads = "+".join(config.feature_names())
    refine = ""
    if config.refine_top_k:
        rescoring = ", rescoring them" if config.refine_score else ""
        refine = (
            f" + second stage on the top {config.refine_top_k} ({config.refine_pool}x"
            f"{config.refine_pool} RoI bins of {config.refine_channels} channels{rescoring})"
        )
    return Candidate(
        name,
        "dds_perception",
        model,
        tuple(input_size),
        description=f"{config.backbone} + RPN head on {heads}{refine}, letterboxed to "
        f"{input_size[1]}x{input_size[0]}",
        extra={"config": config},
    )


def detector_candidate(
    name: str, frame: tuple[int, int] = KITTI_FRAME, our_input: tuple[int, int] = OUR_INPUT
) -> Candidate:
    """Any detector of the comparison by name."""
    if name in OUR_DETECTORS:
        return our_detector(name, our_input)
    if name in TORCHVISION_DETECTORS:
        return torchvision_detector(name, frame)
    known = (*OUR_DETECTORS, *TORCHVISION_DETECTORS)
    raise UsageError(f"unknown detector {name!r}; known: {', '.join(known)}")
