"""Classification datasets: official Caltech layouts, RGB conversion, bad images, the split."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds_perception.data.classification import (
    ClassificationDataError,
    collate_skip_bad,
    eval_transform,
    load_caltech101,
    load_caltech256,
    load_dataset,
    load_image_folder,
    load_or_create_split,
    random_split,
    read_split,
    train_transform,
    write_split,
)


def _jpeg(path: Path, mode: str = "RGB", size: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def caltech101_tree(tmp_path: Path) -> Path:
    """The official Caltech-101 layout: 101_ObjectCategories/<class>/image_NNNN.jpg."""
    top = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls, n in (("BACKGROUND_Google", 2), ("Faces", 3), ("accordion", 2)):
        for i in range(n):
            _jpeg(top / cls / f"image_{i + 1:04d}.jpg", seed=i)
    _jpeg(top / "accordion" / "image_0003.jpg", mode="L")  # greyscale
    _jpeg(top / "Faces" / "image_0004.jpg", mode="CMYK")  # CMYK
    _truncated_jpeg(top / "Faces" / "image_0005.jpg")  # truncated
    (top / "Faces" / "Thumbs.db").write_bytes(b"not an image")  # stray file, ignored
    (top / "accordion" / "image_0004.jpg").write_bytes(b"")  # empty file
    return tmp_path / "caltech101"


def test_classification_caltech101_layout(caltech101_tree: Path) -> None:
    with pytest.warns(UserWarning, match="empty file"):
        data = load_caltech101(caltech101_tree)
    assert data.class_names == ["BACKGROUND_Google", "Faces", "accordion"]
    assert len(data) == 2 + 5 + 3  # the empty file is skipped and counted
    assert data.skipped == ["accordion/image_0004.jpg"]
    assert data.targets.count(1) == 5
    # the folder itself works as the root too
    with pytest.warns(UserWarning):
        same = load_caltech101(caltech101_tree / "101_ObjectCategories")
    assert same.records == data.records
    with pytest.warns(UserWarning):
        dropped = load_caltech101(caltech101_tree, drop_background=True)
    assert dropped.class_names == ["Faces", "accordion"]
    assert len(dropped) == 8 and dropped.targets[0] == 0


def test_classification_greyscale_and_cmyk_become_rgb(caltech101_tree: Path) -> None:
    with pytest.warns(UserWarning):
        data = load_caltech101(caltech101_tree)
    paths = [r.path for r in data.records]
    grey = data.load_image(paths.index("accordion/image_0003.jpg"))
    cmyk = data.load_image(paths.index("Faces/image_0004.jpg"))
    assert grey.mode == "RGB" and cmyk.mode == "RGB"
    data.transform = train_transform(16)
    image, label, n_bad = data[paths.index("accordion/image_0003.jpg")]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert (label, n_bad) == (2, 0)
    data.transform = eval_transform(16)
    assert data[paths.index("Faces/image_0004.jpg")][0].shape == (3, 16, 16)


def test_classification_truncated_image_skipped(caltech101_tree: Path) -> None:
    with pytest.warns(UserWarning):
        data = load_caltech101(caltech101_tree)
    index = [r.path for r in data.records].index("Faces/image_0005.jpg")
    data.transform = eval_transform(16)
    # training: replaced by the next readable image, counted
    data.substitute_bad = True
    with pytest.warns(UserWarning, match=r"unreadable image .*image_0005"):
        _image, label, n_bad = data[index]
    assert n_bad == 1 and label == data.records[index + 1].label
    # evaluation: dropped from the batch, counted
    data.substitute_bad = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = [data[index - 1], data[index], data[index + 1]]
    assert batch[1] is None
    images, labels, bad = collate_skip_bad(batch)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [1, 2] and bad == 1
    # a full decode at scan time drops it up front
    with pytest.warns(UserWarning):
        verified = load_caltech101(caltech101_tree, verify=True)
    assert sorted(verified.skipped) == ["Faces/image_0005.jpg", "accordion/image_0004.jpg"]
    assert len(verified) == 9


def test_classification_caltech256_layout(tmp_path: Path) -> None:
    top = tmp_path / "256_ObjectCategories"
    for folder in ("001.ak47", "002.american-flag", "257.clutter"):
        number = folder[:3]
        for i in range(2):
            _jpeg(top / folder / f"{number}_{i + 1:04d}.jpg", seed=i)
    _jpeg(top / "002.american-flag" / "greg" / "x.jpg")  # nested folder: not part of the class
    data = load_dataset("caltech256", tmp_path)
    assert data.class_names == ["ak47", "american-flag", "clutter"]
    assert len(data) == 6 and data.records[0].path == "001.ak47/001_0001.jpg"
    (top / "bad_folder").mkdir()
    with pytest.raises(ClassificationDataError, match=r"bad_folder.*NNN\.name"):
        load_caltech256(tmp_path)


def test_classification_folder_layout_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ClassificationDataError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClassificationDataError, match="empty"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ClassificationDataError, match="no '101_ObjectCategories'"):
        load_caltech101(tmp_path / "empty")
    root = tmp_path / "folders"
    _jpeg(root / "cat" / "a.jpg")
    _jpeg(root / "dog" / "b.JPEG")  # upper-case extension
    data = load_image_folder(root)
    assert data.class_names == ["cat", "dog"] and len(data) == 2
    (root / "eel").mkdir()
    (root / "eel" / "notes.txt").write_text("no images here")
    with pytest.raises(ClassificationDataError, match=r"class folder without images: .*eel"):
        load_image_folder(root)
    with pytest.raises(ClassificationDataError, match="unknown dataset"):
        load_dataset("imagenet", root)


def test_classification_real_caltech101(caltech101_root: Path) -> None:
    data = load_caltech101(caltech101_root)
    assert data.num_classes == 102 and len(data) == 9143
    assert "BACKGROUND_Google" in data.class_names
    assert load_caltech101(caltech101_root, drop_background=True).num_classes == 101
    split = random_split(data, 2000, seed=0)
    assert len(split.test) == 2000 and len(split.train) == 9143 - 2000
    assert not set(split.test) & set(split.train)
    assert set(split.test) | set(split.train) == {r.path for r in data.records}
    again = random_split(data, 2000, seed=0)
    assert again.test == split.test and again.train == split.train
    assert random_split(data, 2000, seed=1).test != split.test
    # an image from the real set decodes to a normalised 224 crop
    data.transform = train_transform(224)
    assert data[0][0].shape == (3, 224, 224)


def test_classification_real_caltech256_subset(caltech256_root: Path) -> None:
    data = load_caltech256(caltech256_root)
    assert data.num_classes == 5 and len(data) == 533
    assert data.class_names[0] == "motorbikes-101"
    counts = np.bincount(data.targets)
    assert counts.tolist() == [99, 98, 110, 110, 116]


def test_classification_split_file_roundtrip(tmp_path: Path, caltech101_tree: Path) -> None:
    with pytest.warns(UserWarning):
        data = load_caltech101(caltech101_tree)
    split = random_split(data, 0.3, seed=5)
    assert len(split.test) == 3
    write_split(tmp_path / "split.json", split)
    assert read_split(tmp_path / "split.json") == split
    # reused, not remade, even with another seed
    reused = load_or_create_split(tmp_path / "split.json", data, test_size=5, seed=9)
    assert reused == split
    with pytest.raises(ClassificationDataError, match="leaves no training"):
        random_split(data, 100, seed=0)
    with pytest.warns(UserWarning):
        other = load_caltech101(caltech101_tree, drop_background=True)
    with pytest.raises(ClassificationDataError, match="split was made for 3 classes"):
        load_or_create_split(tmp_path / "split.json", other, test_size=2, seed=0)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ClassificationDataError, match=r"bad\.json"):
        read_split(tmp_path / "bad.json")
