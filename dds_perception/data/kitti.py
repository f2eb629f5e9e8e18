"""KITTI object-detection files: ``label_2`` records, result files, calib ``P2``, splits.

Layout of a KITTI root: ``training/image_2/NNNNNN.png``, ``training/label_2/NNNNNN.txt``,
``training/calib/NNNNNN.txt``. A label line has 15 fields
``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry``; a result line adds ``score``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dds_perception.utils.errors import DdsPerceptionError, UsageError
from dds_perception.utils.io import atomic_open

CLASSES = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare",
)  # fmt: skip


class KittiFormatError(DdsPerceptionError, ValueError):
    """A KITTI file is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class KittiObject:
    """One line of a KITTI label or result file."""

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    dimensions: tuple[float, float, float] = (-1.0, -1.0, -1.0)  # h, w, l (m)
    location: tuple[float, float, float] = (-1000.0, -1000.0, -1000.0)  # x, y, z (camera, m)
    rotation_y: float = -10.0
    score: float | None = None  # result files only

    @property
    def height(self) -> float:
        """Box height in pixels (the devkit's difficulty criterion)."""
        return self.bbox[3] - self.bbox[1]

    def to_line(self) -> str:
        """Format as a label line (15 fields) or, with a score, a result line (16 fields)."""
        fields = [
            self.type,
            f"{self.truncated:.2f}",
            str(int(self.occluded)),
            f"{self.alpha:.2f}",
            *(f"{v:.2f}" for v in self.bbox),
            *(f"{v:.2f}" for v in self.dimensions),
            *(f"{v:.2f}" for v in self.location),
            f"{self.rotation_y:.2f}",
        ]
        if self.score is not None:
            fields.append(f"{self.score:.6f}")
        return " ".join(fields)


def parse_line(line: str, *, source: str = "<string>", lineno: int = 1) -> KittiObject:
    """Parse one label (15 fields) or result (16 fields) line."""
    parts = line.split()
    if len(parts) not in (15, 16):
        raise KittiFormatError(
            f"{source}:{lineno}: expected 15 or 16 fields, got {len(parts)}: {line.strip()!r}"
        )
    try:
        numbers = [float(p) for p in parts[1:]]
    except ValueError as error:
        bad = next(p for p in parts[1:] if not _is_float(p))
        raise KittiFormatError(f"{source}:{lineno}: not a number: {bad!r}") from error
    if any(math.isnan(v) for v in numbers):
        raise KittiFormatError(f"{source}:{lineno}: NaN in line {line.strip()!r}")
    score = numbers[14] if len(numbers) == 15 else None
    return KittiObject(
        type=parts[0],
        truncated=numbers[0],
        occluded=int(numbers[1]),
        alpha=numbers[2],
        bbox=(numbers[3], numbers[4], numbers[5], numbers[6]),
        dimensions=(numbers[7], numbers[8], numbers[9]),
        location=(numbers[10], numbers[11], numbers[12]),
        rotation_y=numbers[13],
        score=score,
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_label_file(path: str | os.PathLike[str]) -> list[KittiObject]:
    """Read a ``label_2`` or result file; an empty file is a frame with no objects."""
    file = Path(path)
    objects = []
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                objects.append(parse_line(line, source=str(file), lineno=lineno))
    return objects


def write_label_file(path: str | os.PathLike[str], objects: Iterable[KittiObject]) -> None:
    """Write objects as a label/result file atomically (an empty file when there are none)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for obj in objects:
            handle.write(obj.to_line() + "\n")


def detection_to_object(
    box: Sequence[float], score: float, class_name: str = "Car"
) -> KittiObject:
    """A detector output as a KITTI result record (3-D fields set to the devkit's 'unknown')."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return KittiObject(class_name, -1.0, -1, -10.0, (x1, y1, x2, y2), score=float(score))


def read_calib_p2(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the 3x4 projection matrix ``P2`` (left colour camera) of a calib file."""
    file = Path(path)
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.startswith("P2:"):
                values = line.split()[1:]
                if len(values) != 12:
                    raise KittiFormatError(
                        f"{file}:{lineno}: P2 needs 12 values, got {len(values)}"
                    )
                try:
                    return np.array([float(v) for v in values], dtype=np.float64).reshape(3, 4)
                except ValueError as error:
                    raise KittiFormatError(f"{file}:{lineno}: P2 has a non-number") from error
    raise KittiFormatError(f"{file}: no 'P2:' line")


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(width, height)`` of an image file (KITTI has four native sizes)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise KittiFormatError(f"{path}: cannot read image")
    return int(image.shape[1]), int(image.shape[0])


def read_split(path: str | os.PathLike[str]) -> list[str]:
    """Read a split file (one frame id per line, e.g. ``000123``)."""
    file = Path(path)
    ids = []
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if not text.isdigit():
                raise KittiFormatError(f"{file}:{lineno}: not a frame id: {text!r}")
            ids.append(text.zfill(6))
    return ids


def write_split(path: str | os.PathLike[str], ids: Iterable[str]) -> None:
    """Write frame ids one per line, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for frame_id in ids:
            handle.write(f"{frame_id}\n")


def random_split(
    ids: Sequence[str], val_fraction: float = 0.5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded random train/val split of frame ids, each part sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def kfold_splits(
    ids: Sequence[str], folds: int, seed: int = 0
) -> list[tuple[list[str], list[str]]]:
    """Seeded k-fold cross-validation: ``folds`` (train, val) pairs; every id is validated once.

    The shuffled ids are dealt into ``folds`` near-equal parts (sizes differ by at most one).
    """
    if not 2 <= folds <= len(ids):
        raise UsageError(f"folds must be in [2, {len(ids)}] for {len(ids)} frames, got {folds}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    parts = [sorted(order[k::folds]) for k in range(folds)]
    return [(sorted(set(order) - set(part)), part) for part in parts]


@dataclass(frozen=True)
class KittiLayout:
    """Paths of a KITTI ``training`` (or ``testing``) folder."""

    root: Path

    @classmethod
    def find(cls, root: str | os.PathLike[str]) -> KittiLayout:
        """Accept the dataset root or its ``training`` folder."""
        path = Path(root)
        if (path / "image_2").is_dir():
            return cls(path)
        if (path / "training" / "image_2").is_dir():
            return cls(path / "training")
        raise FileNotFoundError(f"{path}: no image_2 folder (expected KITTI training/image_2)")

    @property
    def image_dir(self) -> Path:
        return self.root / "image_2"

    @property
    def label_dir(self) -> Path:
        return self.root / "label_2"

    @property
    def calib_dir(self) -> Path:
        return self.root / "calib"

    def image(self, frame_id: str) -> Path:
        return self.image_dir / f"{frame_id}.png"

    def label(self, frame_id: str) -> Path:
        return self.label_dir / f"{frame_id}.txt"

    def calib(self, frame_id: str) -> Path:
        return self.calib_dir / f"{frame_id}.txt"

    def frame_ids(
        self, split: Sequence[str] | None = None, *, require_labels: bool = True
    ) -> list[str]:
        """Frame ids present in ``image_2`` (restricted to ``split``), checked against labels."""
        images = {p.stem for p in self.image_dir.glob("*.png")}
        wanted = sorted(images) if split is None else list(split)
        missing_images = [f for f in wanted if f not in images]
        problems = []
        if missing_images:
            problems.append(f"images missing in {self.image_dir}: {_preview(missing_images)}")
        if require_labels and self.label_dir.is_dir():
            labels = {p.stem for p in self.label_dir.glob("*.txt")}
            no_label = [f for f in wanted if f not in labels]
            if no_label:
                problems.append(f"labels missing in {self.label_dir}: {_preview(no_label)}")
            if split is None:
                orphans = sorted(labels - images)
                if orphans:
                    problems.append(
                        f"labels without images in {self.label_dir}: {_preview(orphans)}"
                    )
        elif require_labels:
            problems.append(f"no label folder {self.label_dir}")
        if problems:
            raise KittiFormatError("; ".join(problems))
        return wanted


def _preview(items: Sequence[str], limit: int = 10) -> str:
    head = ", ".join(items[:limit])
    return head + (f" ... ({len(items)} in all)" if len(items) > limit else "")
