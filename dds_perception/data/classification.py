"""Image classification datasets in their official layouts: Caltech-101, Caltech-256, folders.

Layouts (``root`` may be the folder itself or the folder that holds it):

- Caltech-101: ``101_ObjectCategories/<class>/image_NNNN.jpg``, 102 folders (101 classes and
  ``BACKGROUND_Google``, kept by default as in the paper's 102-way protocol; ``drop_background``
  removes it).
- Caltech-256: ``256_ObjectCategories/NNN.name/NNN_NNNN.jpg``, 257 folders (256 classes and
  ``257.clutter``); the class name is the folder name without its ``NNN.`` prefix.
- Generic: ``root/<class>/*.{jpg,jpeg,png,bmp,webp}``, one folder per class.

Classes are ordered by folder name; only image files directly inside a class folder count (the
official archives hold a few stray files and one sub-folder). Every image is converted to RGB
(the Caltech sets hold greyscale and CMYK JPEGs). Empty files are dropped with a warning when the
folder is scanned (and a full decode check is available with ``verify=True``); an image that fails
to decode later is replaced by the next readable one (training) or dropped from the batch
(evaluation), with a warning and a count, so one bad JPEG never ends a long run.

The paper's protocol holds out 2,000 random test images and trains on the rest:
:func:`random_split` makes that split from a seed, :func:`write_split` / :func:`read_split` keep it
in a JSON file beside a run's outputs so a resumed run and the evaluator use the same images.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DATASETS = ("caltech101", "caltech256", "folder")
CALTECH101_DIR = "101_ObjectCategories"
CALTECH256_DIR = "256_ObjectCategories"
CALTECH101_BACKGROUND = "BACKGROUND_Google"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FORMAT = "dds_perception.split/1"
_CALTECH256_FOLDER = re.compile(r"^(\d{3})\.(.+)$")
# What PIL raises for unreadable, truncated or corrupt image files.
DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


class ClassificationDataError(DdsPerceptionError, ValueError):
    """A classification dataset folder, class folder, image or split file is unusable."""


@dataclass(frozen=True)
class ImageRecord:
    """One image: path relative to the dataset root and its class index."""

    path: str
    label: int


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Images listed as ``(relative path, label)`` under ``root``, decoded to RGB on access.

    ``__getitem__`` returns ``(image, label, n_bad)`` where ``image`` is the transformed image and
    ``n_bad`` counts the unreadable files passed over to produce it. With ``substitute_bad=True``
    (training) an unreadable image is replaced by the next readable one; otherwise ``None`` is
    returned and :func:`collate_skip_bad` drops it from the batch.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        *,
        name: str = "folder",
        transform: Callable[[Image.Image], Any] | None = None,
        substitute_bad: bool = False,
        skipped: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.records = list(records)
        self.class_names = list(class_names)
        self.name = name
        self.transform = transform
        self.substitute_bad = substitute_bad
        self.skipped = list(skipped)  # files dropped while scanning (empty/unreadable)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return [record.label for record in self.records]

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` fully and return it as an RGB PIL image."""
        path = self.root / self.records[index].path
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        tries = len(self.records) if self.substitute_bad else 1
        for n_bad in range(min(tries, 16)):
            current = (index + n_bad) % len(self.records)
            try:
                image = self.load_image(current)
            except DECODE_ERRORS as error:
                warnings.warn(
                    f"skipping unreadable image {self.root / self.records[current].path}: {error}",
                    stacklevel=2,
                )
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, self.records[current].label, n_bad
        if self.substitute_bad:
            raise ClassificationDataError(
                f"{self.root}: 16 unreadable images in a row from {self.records[index].path}"
            )
        return None

    def subset(self, paths: Sequence[str], **changes: Any) -> ImageClassificationDataset:
        """Return a dataset over the records named by ``paths`` (relative), in that order."""
        by_path = {record.path: record for record in self.records}
        missing = [path for path in paths if path not in by_path]
        if missing:
            raise ClassificationDataError(
                f"{self.root}: {len(missing)} image(s) of the split are not in the dataset "
                f"(first: {missing[0]}); the split belongs to other data"
            )
        options = {
            "name": self.name,
            "transform": self.transform,
            "substitute_bad": self.substitute_bad,
            "skipped": self.skipped,
            **changes,
        }
        return ImageClassificationDataset(
            self.root, [by_path[path] for path in paths], self.class_names, **options
        )


def collate_skip_bad(
    batch: Sequence[tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack ``(image, label, n_bad)`` items without the ``None`` ones; add up the bad images."""
    good = [item for item in batch if item is not None]
    n_bad = len(batch) - len(good) + sum(item[2] for item in good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_bad
    images = torch.stack([torch.as_tensor(item[0]) for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    return images, labels, n_bad


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _verify(path: Path) -> str | None:
    """Return why ``path`` cannot be decoded, or ``None`` when it can."""
    try:
        with Image.open(path) as image:
            image.load()
    except DECODE_ERRORS as error:
        return str(error) or type(error).__name__
    return None


def _find_layout(root: Path, folder_name: str, torchvision_dir: str) -> Path:
    """Find ``root/folder_name``, ``root`` itself, or torchvision's ``root/<set>/folder_name``."""
    if not root.exists():
        raise ClassificationDataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise ClassificationDataError(f"dataset path is not a folder: {root}")
    for candidate in (root / folder_name, root / torchvision_dir / folder_name):
        if candidate.is_dir():
            return candidate
    if root.name == folder_name:
        return root
    raise ClassificationDataError(
        f"{root}: no '{folder_name}' folder here (expected {root / folder_name}/<class>/*.jpg)"
    )


def scan_class_folders(
    folder: Path, class_dirs: Sequence[Path], class_names: Sequence[str], *, verify: bool = False
) -> tuple[list[ImageRecord], list[str]]:
    """List the images of each class folder; return records and the skipped files' paths."""
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise ClassificationDataError(
                f"class folder without images: {class_dir} (class {class_names[label]!r}; "
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        for file in files:
            reason = "empty file" if file.stat().st_size == 0 else None
            if reason is None and verify:
                reason = _verify(file)
            if reason is not None:
                warnings.warn(f"skipping unreadable image {file}: {reason}", stacklevel=2)
                skipped.append(file.relative_to(folder).as_posix())
                continue
            records.append(ImageRecord(file.relative_to(folder).as_posix(), label))
    return records, skipped


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ClassificationDataError(f"dataset folder is empty (no class folders): {folder}")
    return dirs


def load_caltech101(
    root: str | os.PathLike[str], *, drop_background: bool = False, verify: bool = False
) -> ImageClassificationDataset:
    """Caltech-101 from ``101_ObjectCategories``: 102 classes, or 101 with ``drop_background``."""
    folder = _find_layout(Path(root), CALTECH101_DIR, "caltech101")
    dirs = _class_dirs(folder)
    if drop_background:
        dirs = [d for d in dirs if d.name != CALTECH101_BACKGROUND]
    names = [d.name for d in dirs]
    records, skipped = scan_class_folders(folder, dirs, names, verify=verify)
    return ImageClassificationDataset(folder, records, names, name="caltech101", skipped=skipped)


def load_caltech256(
    root: str | os.PathLike[str], *, verify: bool = False
) -> ImageClassificationDataset:
    """Caltech-256 from ``256_ObjectCategories/NNN.name``: 257 classes with ``257.clutter``."""
    folder = _find_layout(Path(root), CALTECH256_DIR, "caltech256")
    dirs = _class_dirs(folder)
    names = []
    for d in dirs:
        match = _CALTECH256_FOLDER.match(d.name)
        if match is None:
            raise ClassificationDataError(
                f"{d}: not a Caltech-256 class folder (expected NNN.name, e.g. 001.ak47)"
            )
        names.append(match.group(2))
    records, skipped = scan_class_folders(folder, dirs, names, verify=verify)
    return ImageClassificationDataset(folder, records, names, name="caltech256", skipped=skipped)


def load_image_folder(
    root: str | os.PathLike[str], *, verify: bool = False
) -> ImageClassificationDataset:
    """A generic ``root/<class>/<image>`` layout; class names are the folder names."""
    folder = Path(root)
    if not folder.is_dir():
        raise ClassificationDataError(f"dataset folder not found: {folder}")
    dirs = _class_dirs(folder)
    names = [d.name for d in dirs]
    records, skipped = scan_class_folders(folder, dirs, names, verify=verify)
    return ImageClassificationDataset(folder, records, names, name="folder", skipped=skipped)


def load_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    drop_background: bool = False,
    verify: bool = False,
) -> ImageClassificationDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``root``."""
    if name == "caltech101":
        return load_caltech101(root, drop_background=drop_background, verify=verify)
    if name == "caltech256":
        return load_caltech256(root, verify=verify)
    if name == "folder":
        return load_image_folder(root, verify=verify)
    raise ClassificationDataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """A train/test split of a dataset by relative image paths."""

    train: list[str]
    test: list[str]
    seed: int
    dataset: str
    class_names: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT,
            "dataset": self.dataset,
            "seed": self.seed,
            "num_train": len(self.train),
            "num_test": len(self.test),
            "class_names": self.class_names,
            "train": self.train,
            "test": self.test,
        }


def resolve_test_size(test_size: float, total: int) -> int:
    """Return the number of test images: ``test_size`` images, or that fraction when < 1."""
    count = round(test_size * total) if 0 < test_size < 1 else int(test_size)
    if count != test_size and test_size >= 1:
        raise ClassificationDataError(f"test size {test_size} is neither a count nor a fraction")
    if not 0 < count < total:
        raise ClassificationDataError(
            f"test size {test_size} leaves no training or no test images out of {total} images"
        )
    return count


def random_split(dataset: ImageClassificationDataset, test_size: float, seed: int) -> Split:
    """Hold out ``test_size`` random images (count, or fraction when < 1); the rest train.

    The choice depends only on the seed and the sorted image list (NumPy's PCG64 generator), so the
    same data and seed give the same split on every machine.
    """
    paths = sorted(record.path for record in dataset.records)
    count = resolve_test_size(test_size, len(paths))
    order = np.random.default_rng(seed).permutation(len(paths))
    test_idx = sorted(order[:count].tolist())
    train_idx = sorted(order[count:].tolist())
    return Split(
        train=[paths[i] for i in train_idx],
        test=[paths[i] for i in test_idx],
        seed=seed,
        dataset=dataset.name,
        class_names=list(dataset.class_names),
    )


def write_split(path: str | os.PathLike[str], split: Split) -> None:
    """Save ``split`` as JSON (atomically)."""
    write_json(path, split.to_json())


def read_split(path: str | os.PathLike[str]) -> Split:
    """Read a split file written by :func:`write_split`; errors name the file."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ClassificationDataError(f"split file not found: {file}") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ClassificationDataError(f"{file}: unreadable split file ({error})") from error
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise ClassificationDataError(f"{file}: not a split file (format {SPLIT_FORMAT} expected)")
    try:
        split = Split(
            train=list(data["train"]),
            test=list(data["test"]),
            seed=int(data["seed"]),
            dataset=str(data["dataset"]),
            class_names=list(data["class_names"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ClassificationDataError(f"{file}: malformed split file ({error!r})") from error
    if set(split.train) & set(split.test):
        raise ClassificationDataError(f"{file}: train and test images overlap")
    return split


def load_or_create_split(
    path: str | os.PathLike[str],
    dataset: ImageClassificationDataset,
    *,
    test_size: float,
    seed: int,
    write: bool = True,
) -> Split:
    """Reuse the split saved at ``path`` (checked against ``dataset``) or make and save one."""
    file = Path(path)
    if file.exists():
        split = read_split(file)
        if split.class_names != list(dataset.class_names):
            raise ClassificationDataError(
                f"{file}: the split was made for {len(split.class_names)} classes "
                f"({split.dataset}), this dataset has {dataset.num_classes} ({dataset.name})"
            )
        return split
    split = random_split(dataset, test_size, seed)
    if write:
        write_split(file, split)
    return split


# ---------------------------------------------------------------------------------- transforms


def train_transform(
    size: int = 224,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + horizontal flip + normalisation (torchvision's ImageNet recipe)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_crop_transform(
    size: int = 224, *, resize: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The geometry of :func:`eval_transform` on a uint8 CHW tensor: shorter side to ``resize``,
    centre crop ``size`` (the decoded cache stores test images after it)."""
    from torchvision.transforms import v2

    resize = resize or round(size * 256 / 224)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])


def eval_transform(
    size: int = 224,
    *,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``resize`` (256/224 of ``size`` by default), centre-crop."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            eval_crop_transform(size, resize=resize),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
