"""Detection transforms that keep boxes, labels and ignore regions aligned with the image.

Both transforms are callables ``(image, target) -> (image, target)`` for
``KittiDetectionDataset(transform=...)``. ``image`` is a ``tv_tensors.Image`` uint8 (3, H, W);
the output is a uint8 ``tv_tensors.Image`` of exactly the network size ``(H, W)`` and a target
with ``boxes`` / ``labels`` / ``ignore_boxes`` in network pixels (normalisation stays in the
model / pipeline).

- ``DetectionTrainTransform``: scale jitter around the letterbox scale (one resize, the same
  ``cv2.INTER_LINEAR`` as inference), random placement / crop to the network size (padding with
  114), horizontal flip, ``ColorJitter``; then ``ClampBoundingBoxes`` and
  ``SanitizeBoundingBoxes(min_size)``. Positives and ignore regions travel as one
  ``tv_tensors.BoundingBoxes`` with a flag, so every geometric step moves them together; a car
  that keeps less than ``min_visible`` of its area after the crop becomes an ignore region
  (it is neither a clean positive nor background).
- ``DetectionEvalTransform``: the letterbox of ``data.letterbox`` (what the inference pipeline
  does); it adds ``target["letterbox"]`` so predictions map back with ``boxes_to_source``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dds_perception.data.letterbox import (
    Size,
    boxes_to_network,
    letterbox_image,
    letterbox_params,
    resize_image,
)
from dds_perception.utils.errors import UsageError

Target = dict[str, Any]


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
        raise UsageError(
            f"expected a uint8 (3, H, W) image tensor, got {image.dtype} {tuple(image.shape)}"
        )
    return image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()


def _to_image(array: np.ndarray) -> tv_tensors.Image:
    if array.ndim == 2:
        array = array[:, :, None]
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def _check_size(size: Size) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h < 8 or w < 8:
        raise UsageError(f"network size must be (height, width) >= 8, got {size!r}")
    return h, w


class DetectionEvalTransform:
    """Letterbox to the network size ``(H, W)``; boxes follow; ``target['letterbox']`` is set."""

    def __init__(self, size: Size, pad_value: int = 114) -> None:
        self.size = _check_size(size)
        self.pad_value = int(pad_value)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[tv_tensors.Image, Target]:
        canvas, lb = letterbox_image(_to_hwc(image), self.size, self.pad_value)
        out = dict(target)
        out["boxes"] = boxes_to_network(target["boxes"], lb)
        out["ignore_boxes"] = boxes_to_network(target["ignore_boxes"], lb)
        out["letterbox"] = lb
        return _to_image(canvas), out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, pad_value={self.pad_value})"


class DetectionTrainTransform:
    """Scale jitter + random crop to ``size`` (H, W), flip, photometric jitter, box clean-up.

    The scale is ``letterbox_scale * s`` with ``s`` log-uniform in ``scale_range``, where the
    letterbox scale is that of the network input ``size``; the output is a ``crop_size`` window
    (default ``size``): a fully convolutional network trains on crops of the full-resolution
    input at a fraction of the cost. With probability ``focus_prob`` the window is placed
    around a random car (crops around cars), otherwise uniformly. Hue jitter is
    off by default: on CPU it costs ~50 ms per 1248x384 frame (6x the rest of ColorJitter), and
    car colours vary anyway. Randomness
    comes from torch's global generator (seed it, e.g. ``utils.runtime.seed_everything``; each
    DataLoader worker gets its own seed from torch).
    """

    def __init__(
        self,
        size: Size,
        *,
        scale_range: tuple[float, float] = (0.75, 1.33),
        hflip_prob: float = 0.5,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.3,
        hue: float = 0.0,
        min_size: float = 2.0,
        min_visible: float = 0.4,
        pad_value: int = 114,
        crop_size: Size | None = None,
        focus_prob: float = 0.0,
    ) -> None:
        self.size = _check_size(size)
        self.crop_size = self.size if crop_size is None else _check_size(crop_size)
        if not 0.0 <= focus_prob <= 1.0:
            raise UsageError(f"focus_prob must be in [0, 1], got {focus_prob}")
        self.focus_prob = float(focus_prob)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise UsageError(f"scale_range must be 0 < low <= high, got {scale_range!r}")
        if not 0.0 <= min_visible <= 1.0:
            raise UsageError(f"min_visible must be in [0, 1], got {min_visible}")
        self.scale_range = (lo, hi)
        self.min_visible = float(min_visible)
        self.pad_value = int(pad_value)
        self.flip = v2.RandomHorizontalFlip(hflip_prob)
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        self.clamp = v2.ClampBoundingBoxes()
        self.sanitize = v2.SanitizeBoundingBoxes(
            min_size=min_size, labels_getter=lambda sample: (sample["labels"], sample["area"])
        )

    def _random_scale(self) -> float:
        lo, hi = self.scale_range
        u = float(torch.rand(()))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    def _window(self, cur: int, out: int, lo: float, hi: float) -> int:
        """Start of a window of ``out`` in ``[0, cur]`` that holds ``[lo, hi]`` where it can."""
        first = int(min(max(0.0, math.ceil(hi) - out), cur - out))
        last = int(max(min(math.floor(lo), cur - out), first))
        return int(torch.randint(first, last + 1, ()))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[tv_tensors.Image, Target]:
        out_h, out_w = self.crop_size
        array = _to_hwc(image)
        src_h, src_w = array.shape[:2]
        lb = letterbox_params((src_h, src_w), self.size)
        scale = lb.scale * self._random_scale()
        new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        img = _to_image(resize_image(array, new_w, new_h))

        # positives (label 1) and ignore regions (label 0) as one box set
        pos = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        ign = torch.as_tensor(target["ignore_boxes"], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([pos, ign]) * torch.tensor([new_w / src_w, new_h / src_h] * 2)
        labels = torch.cat(
            [torch.ones(len(pos), dtype=torch.int64), torch.zeros(len(ign), dtype=torch.int64)]
        )
        boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(new_h, new_w))
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])

        # place: pad (randomly split) up to the output size, then crop a random window
        pad_w, pad_h = max(0, out_w - new_w), max(0, out_h - new_h)
        left = int(torch.randint(0, pad_w + 1, ()))
        top = int(torch.randint(0, pad_h + 1, ()))
        padding = [left, top, pad_w - left, pad_h - top]
        if any(padding):
            img = F.pad(img, padding, fill=self.pad_value)
            boxes = F.pad(boxes, padding)
        cur_h, cur_w = img.shape[-2:]
        cars = boxes.as_subclass(torch.Tensor)[labels == 1]
        if len(cars) and self.focus_prob and float(torch.rand(())) < self.focus_prob:
            # a window around one car (crops around cars): every positive gets seen
            x1, y1, x2, y2 = cars[int(torch.randint(0, len(cars), ()))].tolist()
            top = self._window(cur_h, out_h, y1, y2)
            left = self._window(cur_w, out_w, x1, x2)
        else:
            top = int(torch.randint(0, cur_h - out_h + 1, ()))
            left = int(torch.randint(0, cur_w - out_w + 1, ()))
        img = F.crop(img, top, left, out_h, out_w)
        boxes = F.crop(boxes, top, left, out_h, out_w)

        sample = {"image": img, "boxes": boxes, "labels": labels, "area": area}
        sample = self.flip(sample)
        sample["image"] = self.jitter(sample["image"])
        sample = self.clamp(sample)
        b = sample["boxes"].as_subclass(torch.Tensor)
        kept = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        cut = (sample["labels"] == 1) & (kept < self.min_visible * sample["area"])
        sample["labels"] = torch.where(cut, torch.zeros_like(sample["labels"]), sample["labels"])
        sample = self.sanitize(sample)

        b = sample["boxes"].as_subclass(torch.Tensor).to(torch.float32)
        is_pos = sample["labels"] == 1
        out = dict(target)
        out["boxes"] = b[is_pos].clone()
        out["labels"] = torch.ones(int(is_pos.sum()), dtype=torch.int64)
        out["ignore_boxes"] = b[~is_pos].clone()
        out["scale"] = (new_w / src_w, new_h / src_h)
        return tv_tensors.Image(sample["image"]), out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale_range={self.scale_range}, "
            f"min_visible={self.min_visible}, jitter={self.jitter}, flip={self.flip})"
        )
