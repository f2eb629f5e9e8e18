"""KITTI car detection as a torch Dataset: images, car boxes, and regions to ignore.

Each item is ``(image, target)``:

- ``image``: ``tv_tensors.Image`` uint8 (3, H, W), RGB, at the frame's own size (KITTI has four);
  normalisation belongs to the model / inference pipeline, so every path shares it.
- ``target["boxes"]``: float32 (N, 4) x1, y1, x2, y2 (pixel edges) of the positives;
- ``target["labels"]``: int64 (N,), all ``1`` (= car; 0 is background);
- ``target["ignore_boxes"]``: float32 (M, 4): ``Van`` and ``DontCare`` boxes (and cars below
  ``min_height``), which the detector treats as neither positive nor negative, as the KITTI
  devkit does (a detection on a Van or inside DontCare is not a false positive);
- ``target["frame_id"]`` (str) and ``target["orig_size"]`` ((height, width) of the file).

Positives are the ``Car`` class only (KITTI's Car benchmark); ``Truck``, ``Tram`` and the other
classes stay background, as the devkit counts detections on them as false positives.

Boxes with ``x2 < x1`` / ``y2 < y1`` or reaching outside the image are clipped to the image with a
warning; a box left with less than ``min_box_size`` pixels of width or height is dropped with a
warning. A ``transform(image, target) -> (image, target)`` (see ``data.transforms``) runs last.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from dds_perception.data.kitti import KittiLayout, KittiObject, read_label_file, read_split

POSITIVE_TYPES = ("Car",)
IGNORE_TYPES = ("Van", "DontCare")

Target = dict[str, Any]
Transform = Callable[[tv_tensors.Image, Target], tuple[Any, Target]]


class KittiBoxWarning(UserWarning):
    """A label box was clipped to its image or dropped as degenerate."""


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (error naming the file)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path}: cannot read image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def sanitize_box(
    bbox: Sequence[float], width: int, height: int, *, source: str, min_size: float = 1.0
) -> tuple[float, float, float, float] | None:
    """Clip a label box to the image; ``None`` (with a warning) when nothing usable is left."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    problems = []
    if x2 < x1 or y2 < y1:
        problems.append("x2 < x1 or y2 < y1 (corners swapped)")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        problems.append(f"outside the {width}x{height} image")
    if cx2 - cx1 < min_size or cy2 - cy1 < min_size:
        warnings.warn(
            f"{source}: dropped degenerate box {tuple(bbox)}"
            + (f" ({'; '.join(problems)})" if problems else ""),
            KittiBoxWarning,
            stacklevel=3,
        )
        return None
    if problems:
        warnings.warn(
            f"{source}: box {tuple(bbox)} clipped to {(cx1, cy1, cx2, cy2)}: "
            + "; ".join(problems),
            KittiBoxWarning,
            stacklevel=3,
        )
    return cx1, cy1, cx2, cy2


def objects_to_target(
    objects: Sequence[KittiObject],
    width: int,
    height: int,
    *,
    source: str = "<labels>",
    min_height: float = 0.0,
    positive_types: Sequence[str] = POSITIVE_TYPES,
    ignore_types: Sequence[str] = IGNORE_TYPES,
    min_box_size: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split label records into positive boxes (N, 4) and ignore boxes (M, 4), float32."""
    boxes, ignore = [], []
    for index, obj in enumerate(objects, start=1):
        is_pos, is_ign = obj.type in positive_types, obj.type in ignore_types
        if not (is_pos or is_ign):
            continue
        box = sanitize_box(
            obj.bbox, width, height, source=f"{source}:{index}", min_size=min_box_size
        )
        if box is None:
            continue
        if is_pos and box[3] - box[1] >= min_height:
            boxes.append(box)
        else:
            ignore.append(box)
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
    )


class KittiDetectionDataset(Dataset):
    """Car detection samples from a KITTI root (``root`` or ``root/training``).

    ``split``: ``None`` (every image), a list of frame ids, a split file path, or a name looked up
    as ``ImageSets/NAME.txt`` beside ``training`` (e.g. ``"train"`` for generated scenes).
    Images without labels and labels without images raise ``KittiFormatError`` listing them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | os.PathLike[str] | Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        min_height: float = 0.0,
        positive_types: Sequence[str] = POSITIVE_TYPES,
        ignore_types: Sequence[str] = IGNORE_TYPES,
    ) -> None:
        self.layout = KittiLayout.find(root)
        self.frame_ids = self.layout.frame_ids(_resolve_split(self.layout, split))
        self.transform = transform
        self.min_height = float(min_height)
        self.positive_types = tuple(positive_types)
        self.ignore_types = tuple(ignore_types)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def objects(self, index: int) -> list[KittiObject]:
        """The raw label records of item ``index`` (for evaluation against the devkit rules)."""
        return read_label_file(self.layout.label(self.frame_ids[index]))

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        frame_id = self.frame_ids[index]
        rgb = read_rgb(self.layout.image(frame_id))
        height, width = rgb.shape[:2]
        label_path = self.layout.label(frame_id)
        boxes, ignore = objects_to_target(
            read_label_file(label_path),
            width,
            height,
            source=str(label_path),
            min_height=self.min_height,
            positive_types=self.positive_types,
            ignore_types=self.ignore_types,
        )
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        target: Target = {
            "boxes": boxes,
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "ignore_boxes": ignore,
            "frame_id": frame_id,
            "orig_size": (height, width),
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def _resolve_split(layout: KittiLayout, split) -> list[str] | None:
    if split is None:
        return None
    if isinstance(split, (str, os.PathLike)):
        path = Path(split)
        if not path.is_file():
            named = layout.root.parent / "ImageSets" / f"{split}.txt"
            if not named.is_file():
                raise FileNotFoundError(f"split {split!r}: neither a file nor {named}")
            path = named
        return read_split(path)
    return [str(s).zfill(6) for s in split]


def detection_collate(batch: Sequence[tuple[torch.Tensor, Target]]):
    """Stack same-size images into (B, 3, H, W); keep targets as a list of dicts.

    Box counts vary per image, so targets are never stacked. Images of different sizes (no
    resizing transform) are an error: use ``transforms.DetectionEvalTransform`` or a training
    transform to bring them to the network size.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(shapes)}; apply a transform that "
            "resizes to the network input (DetectionEvalTransform / DetectionTrainTransform)"
        )
    return torch.stack([img.as_subclass(torch.Tensor) for img in images]), targets
