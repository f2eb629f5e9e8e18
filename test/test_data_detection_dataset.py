"""KITTI detection dataset: real sample frames, generated scenes, bad input, batching."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from dds_perception.data.detection_dataset import (
    KittiBoxWarning,
    KittiDetectionDataset,
    detection_collate,
)
from dds_perception.data.kitti import KittiFormatError, KittiLayout, read_label_file, read_split
from dds_perception.data.scenes import generate_kitti_scenes
from dds_perception.data.transforms import DetectionEvalTransform, DetectionTrainTransform


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_kitti_scenes(tmp_path_factory.mktemp("ds") / "kitti", 8, seed=11)


def test_data_detection_dataset_on_real_kitti(kitti_sample):
    ds = KittiDetectionDataset(kitti_sample)
    layout = KittiLayout.find(kitti_sample)
    assert len(ds) == 60 and ds.frame_ids == layout.frame_ids()
    index = ds.frame_ids.index("000001")
    image, target = ds[index]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 375, 1242) and target["orig_size"] == (375, 1242)
    assert target["frame_id"] == "000001"
    # 000001: one Car (positive), four DontCare (ignored); Truck/Cyclist are background
    objects = read_label_file(layout.label("000001"))
    cars = [o.bbox for o in objects if o.type == "Car"]
    ignored = [o.bbox for o in objects if o.type in ("Van", "DontCare")]
    torch.testing.assert_close(target["boxes"], torch.tensor(cars))
    torch.testing.assert_close(target["ignore_boxes"], torch.tensor(ignored))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1]
    # every Car of the sample becomes a positive (none needs clipping)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KittiBoxWarning)  # real labels need no clipping
        total = sum(len(ds[i][1]["boxes"]) for i in range(0, len(ds), 6))
    expected = sum(
        sum(o.type == "Car" for o in read_label_file(layout.label(f))) for f in ds.frame_ids[::6]
    )
    assert total == expected > 0


def test_data_detection_dataset_min_height_moves_small_cars_to_ignore(kitti_sample):
    ds = KittiDetectionDataset(kitti_sample, ["000001"], min_height=25)
    _, target = ds[0]
    assert (
        len(target["boxes"]) == 0 and len(target["ignore_boxes"]) == 5
    )  # 21.6 px car + 4 DontCare


def test_data_detection_dataset_batches_with_transforms(kitti_sample, scenes):
    size = (96, 320)
    loader = DataLoader(
        KittiDetectionDataset(
            kitti_sample, ["000001", "000006", "000024"], DetectionEvalTransform(size)
        ),
        batch_size=3,
        collate_fn=detection_collate,
    )
    images, targets = next(iter(loader))
    assert images.shape == (3, 3, 96, 320) and images.dtype == torch.uint8
    assert [t["orig_size"] for t in targets] == [(375, 1242), (374, 1238), (376, 1241)]
    assert all(t["letterbox"].dst_w == 320 for t in targets)
    train = KittiDetectionDataset(scenes, "train", DetectionTrainTransform(size))
    assert train.frame_ids == read_split(scenes / "ImageSets" / "train.txt")
    images, targets = detection_collate([train[0], train[1]])
    assert images.shape == (2, 3, 96, 320)
    assert all(t["boxes"].shape[1] == 4 and len(t["labels"]) == len(t["boxes"]) for t in targets)
    with pytest.raises(ValueError, match="different sizes"):
        detection_collate([KittiDetectionDataset(kitti_sample)[i] for i in (0, 1)])


def test_data_detection_dataset_on_generated_scenes(scenes):
    val = KittiDetectionDataset(scenes, "val")
    assert val.frame_ids == read_split(scenes / "ImageSets" / "val.txt")
    everything = KittiDetectionDataset(scenes)
    n_pos = n_ign = 0
    for i in range(len(everything)):
        _, target = everything[i]
        objects = everything.objects(i)
        assert len(target["boxes"]) == sum(o.type == "Car" for o in objects)
        assert len(target["ignore_boxes"]) == sum(o.type in ("Van", "DontCare") for o in objects)
        n_pos += len(target["boxes"])
        n_ign += len(target["ignore_boxes"])
    assert n_pos > 10 and n_ign > 0
    with pytest.raises(FileNotFoundError, match="nope"):
        KittiDetectionDataset(scenes, "nope")


def test_data_detection_dataset_bad_input(tmp_path, scenes):
    root = tmp_path / "kitti"
    shutil.copytree(scenes, root)
    training = root / "training"
    (training / "label_2" / "000003.txt").unlink()
    with pytest.raises(KittiFormatError, match=r"labels missing .*000003"):
        KittiDetectionDataset(root)
    (training / "image_2" / "000004.png").unlink()
    (training / "label_2" / "000003.txt").write_text("")  # empty: a frame without objects
    with pytest.raises(KittiFormatError, match=r"labels without images .*000004"):
        KittiDetectionDataset(root)
    (training / "label_2" / "000004.txt").unlink()
    ds = KittiDetectionDataset(root)
    _, target = ds[ds.frame_ids.index("000003")]
    assert target["boxes"].shape == (0, 4) and target["ignore_boxes"].shape == (0, 4)

    # swapped corners and a box past the border: clipped with a warning; a sliver: dropped
    label = training / "label_2" / "000000.txt"  # frame 0 is 1242x375
    label.write_text(
        "Car 0.00 0 0.00 300.00 200.00 100.00 100.00 1.5 1.6 3.9 0 1.6 10 0\n"
        "Car 0.00 0 0.00 1200.00 300.00 1300.00 400.00 1.5 1.6 3.9 0 1.6 10 0\n"
        "Car 0.00 0 0.00 1250.00 100.00 1300.00 200.00 1.5 1.6 3.9 0 1.6 10 0\n"
        "Bad 1 2\n"
    )
    with pytest.raises(KittiFormatError, match=r"000000.txt:4"):
        ds[0]
    label.write_text("\n".join(label.read_text().splitlines()[:3]) + "\n")
    with pytest.warns(KittiBoxWarning) as record:
        _, target = ds[0]
    messages = " ".join(str(w.message) for w in record)
    assert "corners swapped" in messages and "outside the 1242x375" in messages
    assert "000000.txt:3: dropped" in messages
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[100.0, 100.0, 300.0, 200.0], [1200.0, 300.0, 1242, 375]])
    )
