"""Training sources: pasted real cars land where their boxes say, mixtures draw reproducibly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dds_perception.data.detection_dataset import KittiDetectionDataset
from dds_perception.data.sources import (
    CopyPasteDataset,
    MixtureDataset,
    SourceError,
    SourceSpec,
    crop_box,
    feathered_paste,
    list_images,
)
from dds_perception.data.transforms import DetectionTrainTransform


def _kitti_root(root: Path, frames: int = 2, label: str = "") -> Path:
    """Black 1242x375 frames with the given label text (a tiny KITTI layout)."""
    for sub in ("image_2", "label_2"):
        (root / "training" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        cv2.imwrite(str(root / "training" / "image_2" / f"{i:06d}.png"), np.zeros((375, 1242, 3)))
        (root / "training" / "label_2" / f"{i:06d}.txt").write_text(label)
    return root


def _crops(folder: Path, colour: tuple[int, int, int], count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((64, 64, 3), colour[::-1], np.uint8))
    return folder


def test_crop_box_by_hand():
    # a 50x40 crop at (10, 20), margin 0.1: 5 px off each side, 4 px off the top, none below
    assert crop_box(10, 20, 50, 40, 0.1) == (15.0, 24.0, 55.0, 60.0)


def test_feathered_paste_blends_only_the_border():
    canvas = np.zeros((20, 20, 3), np.uint8)
    feathered_paste(canvas, np.full((10, 10, 3), 200, np.uint8), 5, 5, feather=2)
    assert canvas[10, 10, 0] == 200  # interior: the patch
    assert canvas[5, 10, 0] == 100  # first row: half way (ramp 1/2)
    assert canvas[4, 10, 0] == 0 and canvas[15, 10, 0] == 0  # outside: untouched


def test_pasted_cars_are_labelled_where_they_are(tmp_path):
    root = _kitti_root(tmp_path / "kitti")
    crops = _crops(tmp_path / "cars", (255, 0, 0))
    negatives = _crops(tmp_path / "road", (0, 0, 255))
    dataset = CopyPasteDataset(
        KittiDetectionDataset(root), crops, negatives, paste=(3, 3), margin=0.0, feather=1
    )
    torch.manual_seed(0)
    for index in range(2):
        image, target = dataset[index]
        array = image.permute(1, 2, 0).numpy()
        assert target["pasted"] == len(target["boxes"]) > 0
        red = (array[:, :, 0] > 0) & (array[:, :, 2] == 0)
        blue = (array[:, :, 2] > 0) & (array[:, :, 0] == 0)
        assert blue.any()  # road patches pasted too, and never labelled as cars
        painted = np.zeros_like(red)
        for x1, y1, x2, y2 in target["boxes"].round().int().tolist():
            painted[y1:y2, x1:x2] = True
            assert red[y1:y2, x1:x2].all()  # the box holds the pasted car
            assert 22 <= y2 - y1 <= 110 and y2 > 0.47 * 375  # on the road, below the horizon
        assert not (red & ~painted).any()  # and no car pixel lies outside a box


def test_labelled_crops_paste_with_their_own_box(tmp_path):
    """A crop whose car fills only part of it (as the teacher labelled it): the pasted box is
    the car's, scaled with the crop, not the whole crop."""
    root = _kitti_root(tmp_path / "kitti")
    crops = _kitti_root(tmp_path / "crops", frames=0)
    crop = np.zeros((64, 64, 3), np.uint8)
    crop[8:56, 10:50] = (0, 0, 255)  # BGR red: the car, x 10..50, y 8..56
    cv2.imwrite(str(crops / "training" / "image_2" / "000000.png"), crop)
    label = "Car -1 -1 -10 10.00 8.00 50.00 56.00 -1 -1 -1 -1000 -1000 -1000 -10 0.9\n"
    (crops / "training" / "label_2" / "000000.txt").write_text(label)
    cv2.imwrite(str(crops / "training" / "image_2" / "000001.png"), crop)
    (crops / "training" / "label_2" / "000001.txt").write_text("")  # the teacher saw no car
    dataset = CopyPasteDataset(KittiDetectionDataset(root), crops, paste=(3, 3), feather=1)
    assert [c.path.name for c in dataset.crops] == ["000000.png"]
    torch.manual_seed(2)
    image, target = dataset[0]
    red = (image[0] > 128) & (image[2] < 64)
    assert target["pasted"] == len(target["boxes"]) > 0
    for x1, y1, x2, y2 in target["boxes"].tolist():
        inside = red[round(y1) + 1 : round(y2) - 1, round(x1) + 1 : round(x2) - 1]
        assert inside.all()  # the box holds the car...
        ring = red[round(y1) - 3 : round(y2) + 3, round(x1) - 3 : round(x2) + 3]
        assert ring.sum() <= (x2 - x1 + 2) * (y2 - y1 + 2)  # ...and no more than the car
        assert 22 <= y2 - y1 <= 110.5


def test_crop_folders_without_cars_are_refused(tmp_path):
    crops = _kitti_root(tmp_path / "crops", frames=2, label="")  # labelled, but no car at all
    with pytest.raises(SourceError, match=r"crops: no crop has a Car label"):
        CopyPasteDataset(KittiDetectionDataset(_kitti_root(tmp_path / "kitti")), crops)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: no image files"):
        CopyPasteDataset(KittiDetectionDataset(_kitti_root(tmp_path / "k2")), tmp_path / "empty")


def test_pasted_cars_keep_the_frames_own_labels(tmp_path):
    label = "Car 0.00 0 0.0 100.00 150.00 300.00 250.00 1.5 1.6 3.9 0.0 1.6 10.0 0.0\n"
    root = _kitti_root(tmp_path / "kitti", frames=1, label=label)
    dataset = CopyPasteDataset(
        KittiDetectionDataset(root), _crops(tmp_path / "cars", (255, 0, 0)), paste=(2, 2)
    )
    torch.manual_seed(1)
    _, target = dataset[0]
    assert target["boxes"][0].tolist() == [100.0, 150.0, 300.0, 250.0]
    for box in target["boxes"][1:].tolist():  # pastes do not cover the labelled car
        overlap_w = min(box[2], 300) - max(box[0], 100)
        overlap_h = min(box[3], 250) - max(box[1], 150)
        assert max(overlap_w, 0) * max(overlap_h, 0) <= 0.1 * 200 * 100 + 1e-6


def test_mixture_draws_by_weight_and_reproducibly():
    a, b = list(range(10)), list(range(100, 130))
    mixture = MixtureDataset([a, b], [3.0, 1.0], 4000, seed=5, names=["a", "b"])
    first = [mixture.locate(i) for i in range(4000)]
    counts = Counter(source for source, _ in first)
    assert abs(counts[0] / 4000 - 0.75) < 0.03
    assert first == [mixture.locate(i) for i in range(4000)]  # a function of the index
    mixture.set_epoch(1)
    assert first != [mixture.locate(i) for i in range(4000)]  # another epoch, other draws
    assert all(0 <= item < (10, 30)[source] for source, item in first)
    with pytest.raises(SourceError, match="empty source: has no frames"):
        MixtureDataset([a, []], [1, 1], 10, names=["a", "empty source"])


def test_source_specs_parse_and_name_what_is_wrong(tmp_path):
    spec = SourceSpec.parse("kind=copy_paste,crops=/c,negatives=/n,weight=0.5,paste=2-5")
    assert (spec.kind, spec.crops, spec.weight, spec.paste) == ("copy_paste", "/c", 0.5, (2, 5))
    assert SourceSpec.parse(spec.to_dict()) == spec  # round trip through run records
    assert SourceSpec.parse({"kind": "kitti", "root": "/k", "split": "all"}).root == "/k"
    with pytest.raises(SourceError, match="kind must be one of"):
        SourceSpec.parse({"kind": "coco"})
    with pytest.raises(SourceError, match="needs 'crops'"):
        SourceSpec.parse({"kind": "copy_paste"})
    with pytest.raises(SourceError, match="unknown key"):
        SourceSpec.parse({"kind": "kitti", "wieght": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty: no image files"):
        list_images(tmp_path / "empty")


def test_focused_crops_hold_the_car():
    transform = DetectionTrainTransform(
        (384, 1248), crop_size=(128, 256), focus_prob=1.0, scale_range=(1.0, 1.0)
    )
    image = torch.zeros(3, 375, 1242, dtype=torch.uint8)
    target = {
        "boxes": torch.tensor([[1000.0, 200.0, 1060.0, 240.0]]),
        "labels": torch.ones(1, dtype=torch.int64),
        "ignore_boxes": torch.zeros(0, 4),
    }
    scale = 1248 / 1242  # the letterbox scale of the network input: width-bound
    for seed in range(20):
        torch.manual_seed(seed)
        out, result = transform(image, target)
        assert tuple(out.shape) == (3, 128, 256)
        ((x1, y1, x2, y2),) = result["boxes"].tolist()
        # the whole car, not clipped by the window
        assert x2 - x1 == pytest.approx(60 * scale, abs=0.1)
        assert y2 - y1 == pytest.approx(40 * scale, abs=0.1)
        assert x1 >= 0 and x2 <= 256 and y1 >= 0 and y2 <= 128
