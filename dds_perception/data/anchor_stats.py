"""Anchor sizes and aspect ratios from KITTI car boxes: ``dds-perception anchors``.

Reads every ``Car`` box of a ``label_2`` folder, maps it to network pixels with the project's
letterbox (``--input-size H W``; each frame's own size is read from the PNG header in the
sibling ``image_2`` folder, else ``--image-size``), and derives two anchor sets:

- **grid** (what torchvision's ``AnchorGenerator(sizes, aspect_ratios)`` needs, every size with
  every ratio): ``sizes`` are quantiles of ``sqrt(w * h)`` at the centres of ``--sizes`` equal
  bins, ``aspect_ratios`` (``h / w``, torchvision's convention) quantiles of ``h / w`` at the
  centres of ``--ratios`` bins. Quantiles follow the data (KITTI has many small cars) without a
  random initialisation.
- **k-means** (YOLOv2's way, for reference): ``--k`` clusters of (w, h) with the distance
  ``1 - IoU`` of corner-aligned boxes, initialised at area quantiles, updated with medians.

Both are scored by the mean best shape-IoU of a box with its best anchor and by the fraction of
boxes whose best anchor has IoU >= 0.5 (shape only; the stride of the feature map adds a
position offset on top).

Examples:
  dds-perception anchors --labels ../shared/data/kitti_sample/training/label_2
  dds-perception anchors --labels data/scenes/training/label_2 --input-size 384 1248 \\
      --sizes 3 --ratios 3 --k 9 --json anchors.json
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dds_perception.data.kitti import read_label_file
from dds_perception.data.letterbox import letterbox_params
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import write_json

DEFAULT_IMAGE_SIZE = (375, 1242)  # (height, width) of most KITTI frames


def png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header (PIL reads no pixels for it)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"{path}: not a readable image ({error})") from error
    return int(height), int(width)


def load_box_sizes(
    label_dir: str | os.PathLike[str],
    *,
    types: Sequence[str] = ("Car",),
    input_size: tuple[int, int] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    default_image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    min_height: float = 0.0,
) -> np.ndarray:
    """(N, 2) float64 widths and heights of the boxes of ``types`` (in network pixels when
    ``input_size`` (H, W) is given, else source pixels). ``min_height`` is in source pixels."""
    labels = Path(label_dir)
    files = sorted(labels.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{labels}: no label files (*.txt)")
    images = Path(image_dir) if image_dir is not None else labels.parent / "image_2"
    sizes = []
    for file in files:
        boxes = [
            o.bbox for o in read_label_file(file) if o.type in types and o.height >= min_height
        ]
        if not boxes:
            continue
        wh = np.array([[x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes], dtype=np.float64)
        if input_size is not None:
            png = images / f"{file.stem}.png"
            src = png_size(png) if png.is_file() else default_image_size
            lb = letterbox_params(src, input_size)
            wh *= np.array([lb.sx, lb.sy])
        sizes.append(wh)
    if not sizes:
        raise UsageError(f"{labels}: no boxes of type {', '.join(types)}")
    wh = np.concatenate(sizes)
    return wh[(wh[:, 0] > 0) & (wh[:, 1] > 0)]


def shape_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N, K) IoU of corner-aligned boxes ``wh`` (N, 2) and anchors (K, 2)."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(
        wh[:, None, 1], anchors[None, :, 1]
    )
    union = wh[:, None, 0] * wh[:, None, 1] + anchors[None, :, 0] * anchors[None, :, 1] - inter
    return inter / union


def kmeans_anchors(wh: np.ndarray, k: int, iters: int = 300) -> np.ndarray:
    """k (w, h) anchors by k-means with the 1 - IoU distance; sorted by area."""
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    k = min(k, len(wh))
    order = np.argsort(wh[:, 0] * wh[:, 1])
    centres = wh[order[((np.arange(k) + 0.5) / k * len(wh)).astype(int)]].copy()
    assign = np.full(len(wh), -1)
    for _ in range(iters):
        new = shape_iou(wh, centres).argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centres[j] = np.median(members, axis=0)
    return centres[np.argsort(centres[:, 0] * centres[:, 1])]


def grid_anchors(
    wh: np.ndarray, num_sizes: int = 3, num_ratios: int = 3
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(sizes, aspect_ratios)`` for ``AnchorGenerator`` from quantiles (ratio = h / w)."""
    if num_sizes < 1 or num_ratios < 1:
        raise UsageError(f"need at least one size and one ratio, got {num_sizes}, {num_ratios}")
    q_s = (np.arange(num_sizes) + 0.5) / num_sizes
    q_r = (np.arange(num_ratios) + 0.5) / num_ratios
    sizes = np.quantile(np.sqrt(wh[:, 0] * wh[:, 1]), q_s)
    ratios = np.quantile(wh[:, 1] / wh[:, 0], q_r)
    return tuple(round(float(s), 1) for s in sizes), tuple(round(float(r), 3) for r in ratios)


def grid_wh(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """(S*R, 2) anchor (w, h) exactly as torchvision's AnchorGenerator builds them."""
    out = []
    for ratio in aspect_ratios:
        h_ratio = np.sqrt(ratio)
        for size in sizes:
            out.append((size / h_ratio, size * h_ratio))
    return np.array(out, dtype=np.float64)


def coverage(wh: np.ndarray, anchors: np.ndarray) -> dict[str, float]:
    """Mean best shape-IoU and the fraction of boxes with a best IoU >= 0.5."""
    best = shape_iou(wh, anchors).max(axis=1)
    return {"mean_iou": round(float(best.mean()), 4), "recall_iou50": round(float(
        (best >= 0.5).mean()), 4)}  # fmt: skip


def anchor_stats(wh: np.ndarray, *, k: int = 9, num_sizes: int = 3, num_ratios: int = 3) -> dict:
    """Grid anchors, k-means anchors, their coverage and the box statistics, as a dict."""
    sizes, ratios = grid_anchors(wh, num_sizes, num_ratios)
    km = kmeans_anchors(wh, k)
    quant = (0.05, 0.25, 0.5, 0.75, 0.95)

    def q(values):
        return [round(float(v), 2) for v in np.quantile(values, quant)]

    return {
        "num_boxes": len(wh),
        "sizes": list(sizes),
        "aspect_ratios": list(ratios),
        "grid": coverage(wh, grid_wh(sizes, ratios)),
        "kmeans": {
            "k": len(km),
            "anchors_wh": [[round(float(w), 1), round(float(h), 1)] for w, h in km],
            **coverage(wh, km),
        },
        "box_quantiles": {
            "q": list(quant),
            "width": q(wh[:, 0]),
            "height": q(wh[:, 1]),
            "sqrt_area": q(np.sqrt(wh[:, 0] * wh[:, 1])),
            "h_over_w": q(wh[:, 1] / wh[:, 0]),
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, help="KITTI label_2 folder")
    parser.add_argument("--types", nargs="+", default=["Car"], help="classes (default Car)")
    parser.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="network input (letterbox target); default: source pixels",
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        default=list(DEFAULT_IMAGE_SIZE),
        help="source size when the sibling image_2 has no PNG for a frame (default 375 1242)",
    )
    parser.add_argument("--min-height", type=float, default=0.0, help="skip shorter boxes (px)")
    parser.add_argument("--sizes", type=int, default=5, help="grid: number of sizes (default 5)")
    parser.add_argument("--ratios", type=int, default=3, help="grid: number of ratios (3)")
    parser.add_argument("--k", type=int, default=9, help="k-means clusters (default 9)")
    parser.add_argument("--json", help="also write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    wh = load_box_sizes(
        args.labels,
        types=args.types,
        input_size=tuple(args.input_size) if args.input_size else None,
        default_image_size=tuple(args.image_size),
        min_height=args.min_height,
    )
    result = {
        "labels": str(args.labels),
        "types": list(args.types),
        "input_size": list(args.input_size) if args.input_size else None,
        "min_height": args.min_height,
        **anchor_stats(wh, k=args.k, num_sizes=args.sizes, num_ratios=args.ratios),
    }
    space = f"network pixels at {args.input_size[0]}x{args.input_size[1]}" if (
        args.input_size) else "source pixels"  # fmt: skip
    print(f"{result['num_boxes']} boxes of {', '.join(args.types)} ({space})")
    bq = result["box_quantiles"]
    print(f"quantiles {bq['q']}: height {bq['height']}, h/w {bq['h_over_w']}")
    print(
        f"AnchorGenerator(sizes=({tuple(result['sizes'])},), "
        f"aspect_ratios=({tuple(result['aspect_ratios'])},))"
    )
    print(f"  grid coverage: {result['grid']}")
    print(f"k-means (k={result['kmeans']['k']}) w,h: {result['kmeans']['anchors_wh']}")
    print(
        f"  k-means coverage: mean_iou {result['kmeans']['mean_iou']}, "
        f"recall_iou50 {result['kmeans']['recall_iou50']}"
    )
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
