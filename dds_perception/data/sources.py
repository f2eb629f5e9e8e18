"""Training on several sources at once: real frames, generated scenes, pasted real cars, teachers.

A source is described by a small mapping (from a YAML recipe or ``--sources``):

- ``{kind: kitti, root: DIR, split: NAME|FILE|all, weight: W}``: any KITTI-format folder: real
  KITTI, generated scenes (``make-scenes``), or frames labelled by a teacher (``pseudo-label``);
- ``{kind: copy_paste, crops: DIR, negatives: DIR, root: DIR, split: ..., paste: [A, B],
  weight: W}``: frames of a KITTI folder with ``A``..``B`` real car crops (and as many car-free
  road patches from ``negatives``) pasted on the road (:class:`CopyPasteDataset`). ``crops``
  is best a KITTI folder of crops labelled by a teacher (``pseudo-label CROPS OUT``): the car
  then gets its own tight box, and crops where the teacher sees no car are left out.

:class:`MixtureDataset` draws each item from one source with probability proportional to its
weight; the draw is a function of ``(seed, epoch, index)`` only, so an epoch is reproducible and a
resumed run sees the same items.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from dds_perception.data.detection_dataset import KittiDetectionDataset, Transform, read_rgb
from dds_perception.data.kitti import KittiFormatError, KittiLayout, read_label_file
from dds_perception.utils.errors import DdsPerceptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KINDS = ("kitti", "copy_paste")


class SourceError(DdsPerceptionError, ValueError):
    """A data source is described wrongly or its folder holds nothing usable (names it)."""


@dataclass(frozen=True)
class SourceSpec:
    """One training source; see the module docstring for the fields of each kind."""

    kind: str
    root: str | None = None  # None: the run's --data-root
    split: str | None = None  # None: the run's --split
    weight: float = 1.0
    crops: str | None = None
    negatives: str | None = None
    paste: tuple[int, int] = (1, 4)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any]) -> SourceSpec:
        """From a mapping (YAML) or ``kind=copy_paste,crops=DIR,weight=0.5`` text."""
        if isinstance(value, str):
            items: dict[str, Any] = {}
            for part in value.split(","):
                key, sep, text = part.partition("=")
                if not sep:
                    raise SourceError(f"source {value!r}: expected KEY=VALUE pairs, got {part!r}")
                items[key.strip()] = text.strip()
            value = items
        if not isinstance(value, Mapping):
            raise SourceError(f"source {value!r}: expected a mapping")
        data = dict(value)
        kind = str(data.pop("kind", ""))
        if kind not in KINDS:
            raise SourceError(f"source {dict(value)!r}: kind must be one of {KINDS}, got {kind!r}")
        known = {"root", "split", "weight", "crops", "negatives", "paste"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SourceError(f"source {dict(value)!r}: unknown key(s) {unknown}")
        paste = data.get("paste", (1, 4))
        if isinstance(paste, str):
            paste = paste.replace("-", " ").split()
        try:
            weight = float(data.get("weight", 1.0))
            lo, hi = (int(v) for v in paste)
        except (TypeError, ValueError) as error:
            raise SourceError(f"source {dict(value)!r}: bad weight or paste range") from error
        if not weight > 0 or not 0 <= lo <= hi:
            raise SourceError(f"source {dict(value)!r}: need weight > 0 and 0 <= paste[0] <= [1]")
        if kind == "copy_paste" and not data.get("crops"):
            raise SourceError(f"source {dict(value)!r}: copy_paste needs 'crops' (a folder)")
        return cls(
            kind,
            root=None if data.get("root") is None else str(data["root"]),
            split=None if data.get("split") is None else str(data["split"]),
            weight=weight,
            crops=None if data.get("crops") is None else str(data["crops"]),
            negatives=None if data.get("negatives") is None else str(data["negatives"]),
            paste=(lo, hi),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for run records)."""
        return {
            "kind": self.kind,
            "root": self.root,
            "split": self.split,
            "weight": self.weight,
            **(
                {"crops": self.crops, "negatives": self.negatives, "paste": list(self.paste)}
                if self.kind == "copy_paste"
                else {}
            ),
        }


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted); an empty folder is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{root}: no image files (.png/.jpg) found")
    return files


def _uniform(low: float, high: float) -> float:
    return low + float(torch.rand(())) * (high - low)


def feathered_paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int, feather: int) -> None:
    """Alpha-blend ``patch`` into ``canvas`` at column ``x``, row ``y`` (inside the canvas),
    its border ``feather`` pixels wide fading in, so the paste has no hard edge to learn."""
    h, w = patch.shape[:2]
    ramp_x = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / max(feather, 1)
    ramp_y = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / max(feather, 1)
    alpha = np.clip(np.minimum.outer(ramp_y, ramp_x), 0.0, 1.0)[:, :, None]
    region = canvas[y : y + h, x : x + w].astype(np.float32)
    canvas[y : y + h, x : x + w] = (
        (alpha * patch + (1.0 - alpha) * region).round().astype(canvas.dtype)
    )


def crop_box(x: int, y: int, w: int, h: int, margin: float) -> tuple[float, float, float, float]:
    """The car's box inside a ``w x h`` crop at ``(x, y)`` when the crop has no label: the crop
    less ``margin`` of its width on the left and right and of its height at the top (a coarse
    guess; label the crops with ``pseudo-label`` for tight boxes)."""
    return (x + margin * w, y + margin * h, x + w - margin * w, float(y + h))


@dataclass(frozen=True)
class Crop:
    """A car crop file and, when known, the car's box in its pixels."""

    path: Path
    box: tuple[float, float, float, float] | None = None


def read_crops(folder: str | os.PathLike[str]) -> list[Crop]:
    """Car crops from ``folder``: a KITTI layout (``training/image_2`` + ``label_2``, e.g. the
    crops pseudo-labelled by a teacher) gives each crop the box of its largest ``Car`` label (a
    neighbour may show at the edge) and skips crops without one; a plain folder of images gives
    crops without boxes."""
    root = Path(folder)
    try:
        layout = KittiLayout.find(root)
    except (FileNotFoundError, KittiFormatError, ValueError):
        layout = None
    if layout is None or not (layout.root / "label_2").is_dir():
        return [Crop(path) for path in list_images(root)]
    crops = []
    for frame_id in layout.frame_ids():
        cars = [o for o in read_label_file(layout.label(frame_id)) if o.type == "Car"]
        if cars:
            car = max(cars, key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
            crops.append(Crop(layout.image(frame_id), tuple(float(v) for v in car.bbox)))
    if not crops:
        raise SourceError(f"{root}: no crop has a Car label")
    return crops


class CopyPasteDataset(Dataset):
    """KITTI frames with real car crops (positives) and road patches (negatives) pasted on.

    A car of height ``h`` (source pixels, log-uniform in ``height_range``) stands on the road:
    its bottom edge lies ``h * U(ground)`` below the horizon row (``horizon`` of the frame
    height; KITTI's camera is 1.65 m above the road, a car about 1.5 m tall, so the bottom of a
    car is about 1.1 car heights below the horizon). The crop is scaled so that its car box
    (:func:`read_crops`) is ``h`` tall, its width by a further ``U(stretch)``. A paste that
    would cover more than ``max_overlap`` of an existing box (or of an earlier paste) is tried
    elsewhere, at most ``tries`` times; road patches are pasted at the sizes of cars. Items are
    ``(image, target)`` like :class:`KittiDetectionDataset`'s, with ``target["pasted"]`` the
    number of cars pasted.
    """

    def __init__(
        self,
        base: KittiDetectionDataset,
        crops: str | os.PathLike[str],
        negatives: str | os.PathLike[str] | None = None,
        transform: Transform | None = None,
        *,
        paste: tuple[int, int] = (1, 4),
        height_range: tuple[float, float] = (22.0, 110.0),
        stretch: tuple[float, float] = (0.9, 1.1),
        horizon: float = 0.47,
        ground: tuple[float, float] = (0.95, 1.25),
        margin: float = 0.06,
        max_overlap: float = 0.1,
        tries: int = 10,
        feather: int = 2,
    ) -> None:
        if base.transform is not None:
            raise SourceError("CopyPasteDataset needs its base dataset without a transform")
        self.base = base
        self.crops = read_crops(crops)
        self.negatives = [Crop(p) for p in list_images(negatives)] if negatives else []
        self.transform = transform
        self.paste = paste
        self.height_range = height_range
        self.stretch = stretch
        self.horizon = horizon
        self.ground = ground
        self.margin = margin
        self.max_overlap = max_overlap
        self.tries = tries
        self.feather = feather

    def __len__(self) -> int:
        return len(self.base)

    @property
    def frame_ids(self) -> list[str]:
        return self.base.frame_ids

    def _place(
        self,
        width: int,
        height: int,
        patch_hw: tuple[int, int],
        box: tuple[float, float, float, float],
        taken: list[tuple[float, ...]],
    ) -> tuple[int, int, float, float] | None:
        """Top-left corner and x/y scale of a patch whose car ``box`` stands on the road."""
        lo, hi = self.height_range
        for _ in range(self.tries):
            h = math.exp(_uniform(math.log(lo), math.log(hi)))
            sy = h / max(box[3] - box[1], 1.0)
            sx = sy * _uniform(*self.stretch)
            pw, ph = max(4, round(patch_hw[1] * sx)), max(4, round(patch_hw[0] * sy))
            bottom = self.horizon * height + h * _uniform(*self.ground)
            y = round(bottom - box[3] * sy)
            if y < 0 or y + ph > height or pw >= width:
                continue
            x = int(torch.randint(0, width - pw + 1, ()))
            rect = (x, y, x + pw, y + ph)
            if all(_covered(t, rect) <= self.max_overlap for t in taken) and all(
                _covered(rect, t) <= self.max_overlap for t in taken
            ):
                return x, y, pw / patch_hw[1], ph / patch_hw[0]
        return None

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.base[index]
        canvas = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy().copy()
        height, width = canvas.shape[:2]
        boxes = [tuple(b) for b in target["boxes"].tolist()]
        taken = boxes + [tuple(b) for b in target["ignore_boxes"].tolist()]
        count = int(torch.randint(self.paste[0], self.paste[1] + 1, ()))
        pasted = []
        for crops, is_car in ((self.crops, True), (self.negatives, False)):
            if not crops:
                continue
            for _ in range(count):
                crop = crops[int(torch.randint(0, len(crops), ()))]
                patch = read_rgb(crop.path)
                ph, pw = patch.shape[:2]
                box = crop.box or crop_box(0, 0, pw, ph, self.margin if is_car else 0.0)
                if is_car and float(torch.rand(())) < 0.5:
                    patch = np.ascontiguousarray(patch[:, ::-1])
                    box = (pw - box[2], box[1], pw - box[0], box[3])
                where = self._place(width, height, (ph, pw), box, taken)
                if where is None:
                    continue
                x, y, sx, sy = where
                new_w, new_h = round(pw * sx), round(ph * sy)
                patch = cv2.resize(patch, (new_w, new_h), interpolation=cv2.INTER_AREA)
                feathered_paste(canvas, patch, x, y, self.feather)
                taken.append((x, y, x + new_w, y + new_h))
                if is_car:
                    pasted.append(
                        (x + box[0] * sx, y + box[1] * sy, x + box[2] * sx, y + box[3] * sy)
                    )
        out = dict(target)
        out["boxes"] = torch.tensor(boxes + pasted, dtype=torch.float32).reshape(-1, 4)
        out["labels"] = torch.ones(len(out["boxes"]), dtype=torch.int64)
        out["pasted"] = len(pasted)
        result = tv_tensors.Image(torch.from_numpy(canvas).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            return self.transform(result, out)
        return result, out


def _covered(box: Sequence[float], by: Sequence[float]) -> float:
    """Fraction of ``box``'s area that ``by`` covers."""
    w = min(box[2], by[2]) - max(box[0], by[0])
    h = min(box[3], by[3]) - max(box[1], by[1])
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    return max(w, 0.0) * max(h, 0.0) / area


class MixtureDataset(Dataset):
    """``length`` items per epoch, each from source ``k`` with probability ``weights[k] / sum``.

    Item ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` (call :meth:`set_epoch`), so
    DataLoader workers and resumed runs agree on what each index means.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float],
        length: int,
        *,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise SourceError("need one weight per source and at least one source")
        for k, dataset in enumerate(datasets):
            if len(dataset) == 0:
                name = names[k] if names else f"source {k}"
                raise SourceError(f"{name}: has no frames")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.probabilities = np.asarray([w / total for w in weights], dtype=np.float64)
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        self.names = list(names) if names else [f"source {k}" for k in range(len(datasets))]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draws ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[int, int]:
        """(source, item in that source) of ``index`` in the current epoch."""
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        source = int(rng.choice(len(self.datasets), p=self.probabilities))
        return source, int(rng.integers(len(self.datasets[source])))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        source, item = self.locate(index)
        image, target = self.datasets[source][item]
        target = dict(target)
        target["source"] = self.names[source]
        return image, target
