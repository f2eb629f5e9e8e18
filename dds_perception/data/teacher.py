"""A COCO teacher detector (NanoDet-style ONNX) for pseudo-labelling frames as KITTI labels.

The teacher is an optional tool, never a run-time dependency of the node: ``onnxruntime`` is
imported only when a teacher is loaded (``pip install 'dds_perception[onnx]'``).

NanoDet's ONNX form (the ``teachers/nanodet_m.onnx`` of the shared data): one input
``1x3xSxS`` BGR, ``(pixel - MEAN) / STD``, the image letterboxed into the top-left corner; per
stride (8, 16, 32) one class-score output ``[1, N, C]`` (already sigmoid) and one box output
``[1, N, 4 * B]``: for each side (left, top, right, bottom) ``B`` bins whose softmax expectation
over ``0 .. B-1``, times the stride, is the distance from the cell centre
``(col + 0.5) * stride`` (rows alike) to that side. Outputs are paired by their cell count ``N``,
never by their order or names (exporters order them differently). The centre is NanoDet's own
(``gfl_head.get_single_level_center_point``); the shared data's README subtracts a further 0.5
pixel, which measured worse here (Car AP_40 moderate 67.3 against 70.0).

Wide frames (KITTI's 1242x375) are covered by overlapping square windows (side 1.25x the frame's
height, each scaled to fill the input: a car keeps ~0.9x its pixels instead of the ~0.33x of a
whole-frame letterbox) plus the whole frame letterboxed. A window's detections touching one of
its inner edges (not a frame border) are dropped: that car is cut there and seen whole in another
window. The rest are merged by per-class NMS. Measured on the 60 frames of ``kitti_sample``
(Car AP_40 easy / moderate / hard, COCO car, score >= 0.05, with the README's centre): 4 tiles of
the frame's height alone 38 / 35 / 31; 4 tiles of 416 px 55 / 46 / 41; + the whole frame and cut
boxes dropped 82 / 62 / 55; these defaults (tiles of 469 px) 87 / 67 / 59, and 87 / 70 / 61 with
NanoDet's centre; tiles of 450-550 px are within noise of it, a further zoomed scale did not help.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from dds_perception.data.kitti import CLASSES, KittiObject, detection_to_object
from dds_perception.utils.errors import DdsPerceptionError

MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)

# COCO's 80 detection classes in the order of NanoDet's outputs (darknet's ``coco.names``)
COCO_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "sofa", "pottedplant",
    "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO -> KITTI. Trucks and buses become Van, an ignore type for our training: a COCO "truck"
# is often a KITTI Van or Car, so it must not be taught as background either.
DEFAULT_CLASS_MAP = {"car": "Car", "truck": "Van", "bus": "Van"}
IGNORE_TYPE = "DontCare"
CUT_MARGIN = 2.0  # input pixels: a box this close to a window's inner edge is cut by it
ORT_INSTALL = "pip install onnxruntime, or pip install 'dds_perception[onnx]' (the onnx extra)"


class TeacherError(DdsPerceptionError, ValueError):
    """A teacher model cannot be used; the message names the file and what is wrong."""


class TeacherBox(NamedTuple):
    """One teacher detection: box ``(x1, y1, x2, y2)`` in source pixels, score, class index."""

    box: tuple[float, float, float, float]
    score: float
    class_index: int


class Level(NamedTuple):
    """The paired outputs of one stride: scores ``(N, C)``, distributions ``(N, 4 * B)``."""

    stride: int
    grid_w: int
    scores: np.ndarray
    distributions: np.ndarray


# --------------------------------------------------------------------------------------------
# Decoding (pure numpy, testable without a model)


def distance_expectation(distributions: np.ndarray) -> np.ndarray:
    """``(K, 4 * B)`` bin logits -> ``(K, 4)`` expected bin index per side (softmax over bins)."""
    logits = np.asarray(distributions, dtype=np.float64)
    bins = logits.shape[-1] // 4
    logits = logits.reshape(-1, 4, bins)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ np.arange(bins, dtype=np.float64)


def decode_level(
    level: Level, score_floor: float, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes ``(K, 4)`` in input pixels, scores ``(K,)`` and class indices ``(K,)`` of every
    (cell, class) pair scoring at least ``score_floor`` (a cell may yield several classes)."""
    scores = np.asarray(level.scores, dtype=np.float32)
    wanted = np.arange(scores.shape[1]) if classes is None else np.asarray(classes, dtype=int)
    cells, columns = np.nonzero(scores[:, wanted] >= score_floor)
    labels = wanted[columns]
    distance = distance_expectation(level.distributions[cells]) * level.stride
    cx = (cells % level.grid_w + 0.5) * level.stride
    cy = (cells // level.grid_w + 0.5) * level.stride
    boxes = np.stack(
        [cx - distance[:, 0], cy - distance[:, 1], cx + distance[:, 2], cy + distance[:, 3]],
        axis=1,
    )
    return boxes.reshape(-1, 4), scores[cells, labels].astype(np.float64), labels


def tile_origins(length: int, side: int, min_overlap: float) -> list[int]:
    """Evenly spaced starts of tiles of ``side`` covering ``length`` with at least
    ``min_overlap`` (a fraction of ``side``) between neighbours."""
    if length <= side:
        return [0]
    step = side * (1.0 - min_overlap)
    count = math.ceil((length - side) / step) + 1
    return [round(v) for v in np.linspace(0, length - side, count)]


def cut_boxes(
    boxes: np.ndarray, window: tuple[int, int, int, int], frame: tuple[int, int], margin: float
) -> np.ndarray:
    """Mask of ``boxes`` (window pixels) reaching within ``margin`` of an edge of the window
    ``(x0, y0, w, h)`` that lies inside the ``(height, width)`` frame: objects cut by the tile."""
    x0, y0, w, h = window
    height, width = frame
    cut = np.zeros(len(boxes), bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= margin
    if x0 + w < width:
        cut |= boxes[:, 2] >= w - margin
    if y0 > 0:
        cut |= boxes[:, 1] <= margin
    if y0 + h < height:
        cut |= boxes[:, 3] >= h - margin
    return cut


# --------------------------------------------------------------------------------------------
# The ONNX teacher


class OnnxTeacher:
    """A NanoDet-style ONNX detector run with ONNX Runtime on the CPU.

    ``threads``: ONNX Runtime's intra-op threads. ``score_floor``: the lowest score decoded
    (raise it to the ignore threshold when pseudo-labelling; it bounds the NMS work).
    ``classes``: class indices to decode (default all). ``tile_size``: window side in source
    pixels (default ``tile_factor`` x the frame's shorter side); ``min_overlap``: least overlap
    of neighbouring windows as a fraction of the side; ``full_frame``: also run the whole frame
    letterboxed (big near cars, which every tile cuts); ``drop_cut``: drop a window's boxes that
    touch an inner edge of it (within ``CUT_MARGIN`` input pixels).
    ``class_names``: the model's classes (default :data:`COCO_NAMES`, or a ``coco.names`` file
    beside the model).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        score_floor: float = 0.05,
        nms_iou: float = 0.6,
        max_detections: int = 100,
        classes: Sequence[int] | None = None,
        tile_size: int | None = None,
        tile_factor: float = 1.25,
        min_overlap: float = 0.2,
        full_frame: bool = True,
        drop_cut: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        if not 0.0 <= min_overlap < 1.0:
            raise TeacherError(f"min_overlap must be in [0, 1), got {min_overlap}")
        if tile_size is not None and tile_size < 8:
            raise TeacherError(f"tile_size must be at least 8 pixels, got {tile_size}")
        self.score_floor = float(score_floor)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        if tile_factor <= 0:
            raise TeacherError(f"tile_factor must be positive, got {tile_factor}")
        self.tile_size = tile_size
        self.tile_factor = float(tile_factor)
        self.min_overlap = float(min_overlap)
        self.full_frame = bool(full_frame)
        self.drop_cut = bool(drop_cut)
        self.class_names = tuple(class_names) if class_names else class_names_for(self.path)
        self.classes = None if classes is None else sorted({int(c) for c in classes})
        if self.classes and not all(0 <= c < len(self.class_names) for c in self.classes):
            raise TeacherError(
                f"class indices {self.classes} outside 0..{len(self.class_names) - 1}"
            )
        self.session = _load_session(self.path, threads)
        self.input_name, self.input_size = self._check_input()
        self._pairing = self._check_outputs()

    # -- validation --------------------------------------------------------------------------

    def _check_input(self) -> tuple[str, int]:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise TeacherError(f"{self.path}: expected one image input, got {names}")
        shape = inputs[0].shape
        ok = (
            len(shape) == 4
            and all(isinstance(d, int) for d in shape[1:])
            and shape[1] == 3
            and shape[2] == shape[3]
            and (shape[0] in (1, None) or isinstance(shape[0], str))  # batch 1 or symbolic
        )
        if not ok or inputs[0].type != "tensor(float)":
            raise TeacherError(
                f"{self.path}: input {inputs[0].name!r} is {inputs[0].type} {shape}; expected a "
                f"float tensor [1, 3, S, S] (one square BGR image)"
            )
        return inputs[0].name, int(shape[2])

    def _check_outputs(self) -> list[tuple[int, int, int, int]]:
        """Run a blank image once and pair the outputs by cell count: ``(stride, grid_w,
        score_output, box_output)`` per level, finest first."""
        size, n_classes = self.input_size, len(self.class_names)
        blank = np.zeros((1, 3, size, size), np.float32)
        try:
            outputs = self.session.run(None, {self.input_name: blank})
        except Exception as error:  # onnxruntime raises its own exception types
            raise TeacherError(f"{self.path}: the model does not run ({error})") from error
        names = [o.name for o in self.session.get_outputs()]
        shapes = [tuple(o.shape) for o in outputs]
        described = ", ".join(f"{n} {list(s)}" for n, s in zip(names, shapes, strict=True))
        by_cells: dict[int, dict[str, int]] = {}
        for index, shape in enumerate(shapes):
            if len(shape) != 3 or shape[0] != 1:
                raise TeacherError(
                    f"{self.path}: output {names[index]} has shape {list(shape)}; a NanoDet-style "
                    f"model has [1, N, {n_classes}] scores and [1, N, 4*bins] boxes per stride "
                    f"(outputs: {described})"
                )
            kind = "scores" if shape[2] == n_classes else "boxes"
            if kind == "boxes" and (shape[2] % 4 or shape[2] < 8):
                raise TeacherError(
                    f"{self.path}: output {names[index]} has {shape[2]} channels: neither "
                    f"{n_classes} class scores nor 4 sides x bins (outputs: {described})"
                )
            if kind in by_cells.setdefault(shape[1], {}):
                raise TeacherError(
                    f"{self.path}: two {kind} outputs with {shape[1]} cells; cannot pair the "
                    f"outputs by stride (outputs: {described})"
                )
            by_cells[shape[1]][kind] = index
        levels = []
        for cells, pair in sorted(by_cells.items(), reverse=True):
            grid = math.isqrt(cells)
            if set(pair) != {"scores", "boxes"} or grid * grid != cells or size % grid:
                raise TeacherError(
                    f"{self.path}: outputs with {cells} cells are not a square grid's "
                    f"scores + boxes pair for a {size}x{size} input (outputs: {described})"
                )
            levels.append((size // grid, grid, pair["scores"], pair["boxes"]))
        scores = np.concatenate([outputs[s].reshape(-1) for _, _, s, _ in levels])
        if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
            raise TeacherError(
                f"{self.path}: class scores range {scores.min():.3g}..{scores.max():.3g}; "
                f"expected probabilities in [0, 1] (sigmoid inside the model)"
            )
        return levels

    # -- inference ---------------------------------------------------------------------------

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(level[0] for level in self._pairing)

    def levels(self, image_bgr: np.ndarray) -> list[Level]:
        """Raw outputs for one BGR image already letterboxed to ``input_size``."""
        blob = (image_bgr.astype(np.float32) - MEAN_BGR) / STD_BGR
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None], dtype=np.float32)
        outputs = self.session.run(None, {self.input_name: blob})
        return [
            Level(stride, grid, outputs[s][0], outputs[b][0])
            for stride, grid, s, b in self._pairing
        ]

    def windows(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(x0, y0, side)`` of the square source windows run for a ``width x height`` frame."""
        side = self.tile_size or max(8, round(self.tile_factor * min(height, width)))
        found = [
            (x, y, side)
            for y in tile_origins(height, side, self.min_overlap)
            for x in tile_origins(width, side, self.min_overlap)
        ]
        if self.full_frame and len(found) > 1:
            found.append((0, 0, max(height, width)))
        return found

    def detect_window(
        self, rgb: np.ndarray, x0: int, y0: int, side: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded boxes (source pixels, clipped to the window), scores and classes of one
        square window of ``rgb``, scaled to fill the input."""
        crop = rgb[y0 : y0 + side, x0 : x0 + side]
        scale = self.input_size / side
        h, w = crop.shape[:2]
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(
            crop[..., ::-1], (new_w, new_h), interpolation=cv2.INTER_LINEAR
        )
        found = [
            decode_level(level, self.score_floor, self.classes) for level in self.levels(canvas)
        ]
        boxes = np.concatenate([f[0] for f in found]) / scale
        scores = np.concatenate([f[1] for f in found])
        labels = np.concatenate([f[2] for f in found])
        if self.drop_cut:
            keep = ~cut_boxes(boxes, (x0, y0, w, h), rgb.shape[:2], CUT_MARGIN / scale)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w) + x0
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h) + y0
        return boxes, scores, labels

    def detect(self, rgb: np.ndarray) -> list[TeacherBox]:
        """Detections of an ``HxWx3`` uint8 RGB frame, best first, after per-class NMS."""
        image = np.asarray(rgb)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TeacherError(
                f"expected an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}"
            )
        parts = [self.detect_window(image, *window) for window in self.windows(*image.shape[:2])]
        boxes = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        scores = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[2] for p in parts]))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_detections]
        return [
            TeacherBox(tuple(boxes[i].tolist()), float(scores[i]), int(labels[i]))
            for i in order.tolist()
        ]


def class_names_for(model: str | os.PathLike[str]) -> tuple[str, ...]:
    """The teacher's class names: ``coco.names`` beside the model when present, else
    :data:`COCO_NAMES`."""
    names_file = Path(model).parent / "coco.names"
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text(encoding="utf-8").splitlines()]
        return tuple(n for n in names if n)
    return COCO_NAMES


def _load_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session for ``path`` (TeacherError naming the file if it fails)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise TeacherError(
            f"{path}: running a teacher model needs onnxruntime: {ORT_INSTALL}"
        ) from error
    if not path.is_file():
        raise TeacherError(f"{path}: no such teacher model file")
    if threads < 1:
        raise TeacherError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # NanoDet's export lists initializers as inputs: noisy
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherError(f"{path}: not a loadable ONNX model ({text})") from error


# --------------------------------------------------------------------------------------------
# Pseudo-labels: teacher detections -> KITTI records


def parse_class_map(items: Iterable[str]) -> dict[str, str]:
    """``["car=Car", "truck=Van"]`` -> ``{"car": "Car", "truck": "Van"}`` (KITTI types checked)."""
    mapping: dict[str, str] = {}
    for item in items:
        coco, sep, kitti_type = (part.strip() for part in str(item).partition("="))
        if not sep or not coco or not kitti_type:
            raise TeacherError(
                f"class map entry {item!r}: expected COCO_NAME=KittiType, e.g. car=Car"
            )
        if kitti_type not in CLASSES:
            raise TeacherError(
                f"class map entry {item!r}: {kitti_type!r} is not a KITTI type "
                f"({', '.join(CLASSES)})"
            )
        if coco in mapping and mapping[coco] != kitti_type:
            raise TeacherError(f"class map: {coco!r} mapped twice ({mapping[coco]}, {kitti_type})")
        mapping[coco] = kitti_type
    if not mapping:
        raise TeacherError("class map is empty: give at least one COCO_NAME=KittiType")
    return mapping


def class_indices(class_map: Mapping[str, str], class_names: Sequence[str]) -> dict[int, str]:
    """The class map keyed by the teacher's class index (ValueError naming unknown names)."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in class_map if name not in index]
    if unknown:
        raise TeacherError(
            f"class map names {unknown} are not teacher classes (e.g. "
            f"{', '.join(class_names[:8])}, ...)"
        )
    return {index[name]: kitti_type for name, kitti_type in class_map.items()}


def check_thresholds(score_threshold: float, ignore_threshold: float) -> None:
    """Both in [0, 1] and ``ignore_threshold <= score_threshold`` (ValueError naming them)."""
    for name, value in (("score", score_threshold), ("ignore", ignore_threshold)):
        if not 0.0 <= value <= 1.0:
            raise TeacherError(f"{name} threshold must be in [0, 1], got {value}")
    if ignore_threshold > score_threshold:
        raise TeacherError(
            f"ignore threshold {ignore_threshold} is above the score threshold "
            f"{score_threshold}; set it equal to the score threshold for no ignore regions"
        )


def to_kitti_objects(
    detections: Iterable[TeacherBox],
    class_map: Mapping[int, str],
    *,
    score_threshold: float = 0.4,
    ignore_threshold: float = 0.25,
    keep_scores: bool = False,
    dedupe_iou: float = 0.6,
) -> list[KittiObject]:
    """Pseudo-label records of one frame's detections.

    Mapped classes scoring ``>= score_threshold`` keep their KITTI type; those in
    ``[ignore_threshold, score_threshold)`` become ``DontCare`` (neither positive nor
    background: the teacher is unsure); the rest and unmapped classes are dropped. Boxes of
    different classes on one object (a COCO car and truck) keep only the best-scoring one
    (class-agnostic, IoU >= ``dedupe_iou``), so an ignore box never shadows a positive.
    ``keep_scores`` writes the score as KITTI's 16th field (a result file, for evaluation).
    """
    check_thresholds(score_threshold, ignore_threshold)
    picked = [
        (d, class_map[d.class_index] if d.score >= score_threshold else IGNORE_TYPE)
        for d in sorted(detections, key=lambda d: -d.score)
        if d.class_index in class_map and d.score >= ignore_threshold
    ]
    if not picked:
        return []
    boxes = torch.tensor([d.box for d, _ in picked], dtype=torch.float64)
    overlap = box_iou(boxes, boxes).triu(diagonal=1) >= dedupe_iou
    kept: list[int] = []
    for i in range(len(picked)):
        if not any(bool(overlap[k, i]) for k in kept):
            kept.append(i)
    objects = []
    for i in kept:
        detection, kitti_type = picked[i]
        obj = detection_to_object(detection.box, detection.score, kitti_type)
        objects.append(obj if keep_scores else dataclasses.replace(obj, score=None))
    return objects
