"""The one letterbox: resize keeping the aspect ratio, then pad to the network input size.

Training (eval transform and the scale of the training crop), evaluation and the inference
pipeline all map between source pixels and network pixels through these functions, so a box
never goes through two different resize conventions.

Convention (the same everywhere):

- ``scale = min(dst_w / src_w, dst_h / src_h)``; the resized image is
  ``new_w = round(src_w * scale)`` by ``new_h = round(src_h * scale)`` pixels (at least 1),
  resized with ``cv2.INTER_LINEAR``.
- The resized image is **centred**: ``pad_x = (dst_w - new_w) // 2`` columns on the left,
  ``pad_y = (dst_h - new_h) // 2`` rows on top; the rest of the canvas is ``pad_value`` (114).
- Boxes are continuous pixel-edge coordinates (``x2 = x1 + width``), so a box maps exactly by
  ``x' = x * sx + pad_x``, ``y' = y * sy + pad_y`` with the per-axis factors
  ``sx = new_w / src_w`` and ``sy = new_h / src_h`` (these differ from ``scale`` only by the
  rounding of ``new_w``/``new_h``, i.e. by less than half a pixel over the whole image).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import cv2
import numpy as np

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Letterbox:
    """Where a ``src_h x src_w`` image lands inside a ``dst_h x dst_w`` network input."""

    scale: float  # nominal scale: min(dst_w / src_w, dst_h / src_h)
    pad_x: int  # columns of padding on the left
    pad_y: int  # rows of padding on top
    new_w: int  # width of the resized image inside the canvas
    new_h: int  # height of the resized image inside the canvas
    src_w: int
    src_h: int
    dst_w: int
    dst_h: int

    @property
    def sx(self) -> float:
        """Exact horizontal factor source -> network (``new_w / src_w``)."""
        return self.new_w / self.src_w

    @property
    def sy(self) -> float:
        """Exact vertical factor source -> network (``new_h / src_h``)."""
        return self.new_h / self.src_h


def _check_hw(name: str, hw: Size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be (height, width), got {hw!r}") from error
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive (height, width), got {hw!r}")
    return h, w


def letterbox_params(src_hw: Size, dst_hw: Size) -> Letterbox:
    """Letterbox geometry for an image of ``src_hw`` into a network input of ``dst_hw``."""
    src_h, src_w = _check_hw("src_hw", src_hw)
    dst_h, dst_w = _check_hw("dst_hw", dst_hw)
    scale = min(dst_w / src_w, dst_h / src_h)
    new_w = min(dst_w, max(1, round(src_w * scale)))
    new_h = min(dst_h, max(1, round(src_h * scale)))
    return Letterbox(
        scale=scale,
        pad_x=(dst_w - new_w) // 2,
        pad_y=(dst_h - new_h) // 2,
        new_w=new_w,
        new_h=new_h,
        src_w=src_w,
        src_h=src_h,
        dst_w=dst_w,
        dst_h=dst_h,
    )


def resize_image(
    image: np.ndarray, new_w: int, new_h: int, dst: np.ndarray | None = None
) -> np.ndarray:
    """Resize an HxW[xC] array with ``cv2.INTER_LINEAR`` (the project's one resize).

    ``dst`` (``new_h x new_w``, e.g. a view into a letterbox canvas) receives the result without
    a temporary copy; it is returned.
    """
    if image.shape[1] == new_w and image.shape[0] == new_h:
        if dst is None:
            return image
        dst[...] = image
        return dst
    size = (int(new_w), int(new_h))
    if dst is None:
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    out = cv2.resize(image, size, dst=dst, interpolation=cv2.INTER_LINEAR)
    if out is not dst:  # cv2 could not write into the view: copy (same pixels)
        dst[...] = out
    return dst


def letterbox_image(
    image: np.ndarray, dst_hw: Size, pad_value: int = 114
) -> tuple[np.ndarray, Letterbox]:
    """Letterbox an HxW[xC] uint8 array into ``dst_hw``; return the canvas and its geometry."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"letterbox_image needs an HxW or HxWxC array, got {shape}")
    lb = letterbox_params(image.shape[:2], dst_hw)
    resized = resize_image(image, lb.new_w, lb.new_h)
    canvas = np.full((lb.dst_h, lb.dst_w, *image.shape[2:]), pad_value, dtype=image.dtype)
    canvas[lb.pad_y : lb.pad_y + lb.new_h, lb.pad_x : lb.pad_x + lb.new_w] = resized
    return canvas, lb


def _is_tensor(value) -> bool:
    # torch is not imported here (the anchors command and other numpy users stay light): a
    # tensor can only exist when torch has been imported by someone else
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_boxes(boxes):
    if _is_tensor(boxes):
        out = boxes.detach().clone().float()
    else:
        out = np.array(boxes, dtype=np.float32, copy=True)
    if out.ndim != 2 or out.shape[1] != 4:
        if (out.numel() if _is_tensor(out) else out.size) == 0:
            return out.reshape(0, 4)
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(out.shape)}")
    return out


def boxes_to_network(boxes, lb: Letterbox):
    """Map (N, 4) x1,y1,x2,y2 boxes from source pixels to network-input pixels.

    Accepts a numpy array or a torch tensor and returns the same kind (float32, a new object).
    """
    out = _as_boxes(boxes)
    out[:, 0::2] = out[:, 0::2] * lb.sx + lb.pad_x
    out[:, 1::2] = out[:, 1::2] * lb.sy + lb.pad_y
    return out


def boxes_to_source(boxes, lb: Letterbox, src_hw: Size | None = None):
    """Map (N, 4) boxes from network-input pixels back to source pixels, clipped to the image.

    ``src_hw`` defaults to the letterbox's source size; it is accepted for callers that hold it
    separately and must agree with ``lb``.
    """
    if src_hw is not None and _check_hw("src_hw", src_hw) != (lb.src_h, lb.src_w):
        raise ValueError(f"src_hw {tuple(src_hw)} does not match the letterbox's source "
                         f"{(lb.src_h, lb.src_w)}")  # fmt: skip
    out = _as_boxes(boxes)
    out[:, 0::2] = (out[:, 0::2] - lb.pad_x) / lb.sx
    out[:, 1::2] = (out[:, 1::2] - lb.pad_y) / lb.sy
    if _is_tensor(out):
        out[:, 0::2] = out[:, 0::2].clamp(0, lb.src_w)
        out[:, 1::2] = out[:, 1::2].clamp(0, lb.src_h)
    else:
        np.clip(out[:, 0::2], 0, lb.src_w, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, lb.src_h, out=out[:, 1::2])
    return out
