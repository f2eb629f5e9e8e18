"""Detection transforms: boxes, labels and ignore regions follow the image (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from dds_perception.data.transforms import DetectionEvalTransform, DetectionTrainTransform

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _target(boxes, ignore=()):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "ignore_boxes": torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
        "frame_id": "000007",
        "orig_size": (100, 200),
    }


def _coord_image(h: int = 100, w: int = 200) -> tv_tensors.Image:
    """R = column, G = row: any crop tells where it came from."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0] = torch.arange(w, dtype=torch.uint8)[None, :]
    img[1] = torch.arange(h, dtype=torch.uint8)[:, None]
    return tv_tensors.Image(img)


def test_data_transforms_flip_hand_computed():
    t = DetectionTrainTransform((100, 200), scale_range=(1, 1), hflip_prob=1.0, **NO_JITTER)
    image, target = t(_coord_image(), _target([[10, 20, 50, 60]], [[0, 0, 30, 10]]))
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 100, 200)
    assert image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == 199  # mirrored
    # x -> 200 - x, corners swap
    torch.testing.assert_close(target["boxes"], torch.tensor([[150.0, 20.0, 190.0, 60.0]]))
    torch.testing.assert_close(target["ignore_boxes"], torch.tensor([[170.0, 0.0, 200.0, 10.0]]))
    assert target["labels"].tolist() == [1]
    assert target["frame_id"] == "000007" and target["orig_size"] == (100, 200)


@pytest.mark.parametrize("seed", range(6))
def test_data_transforms_crop_moves_clips_and_drops(seed):
    # network 50x100 from a 100x200 image, scale factor 2 on top of the letterbox scale 0.5:
    # no resize, a random 50x100 window
    torch.manual_seed(seed)
    t = DetectionTrainTransform(
        (50, 100), scale_range=(2, 2), hflip_prob=0.0, min_size=2, min_visible=0.4, **NO_JITTER
    )
    boxes = [[20, 10, 60, 40], [90, 30, 130, 70], [150, 60, 190, 95], [5, 5, 8, 90]]
    ignore = [[100, 0, 120, 20]]
    image, target = t(_coord_image(), _target(boxes, ignore))
    left, top = int(image[0, 0, 0]), int(image[1, 0, 0])
    assert image.shape == (3, 50, 100)
    assert int(image[0, 0, 99]) == left + 99 and int(image[1, 49, 0]) == top + 49

    expect_pos, expect_ign = [], []
    for box, is_pos in [(b, True) for b in boxes] + [(b, False) for b in ignore]:
        x1, y1, x2, y2 = box
        c = [min(max(x1 - left, 0), 100), min(max(y1 - top, 0), 50),
             min(max(x2 - left, 0), 100), min(max(y2 - top, 0), 50)]  # fmt: skip
        if c[2] - c[0] < 2 or c[3] - c[1] < 2:
            continue  # too small: dropped
        kept = (c[2] - c[0]) * (c[3] - c[1]) / ((x2 - x1) * (y2 - y1))
        (expect_pos if is_pos and kept >= 0.4 else expect_ign).append(c)
    got_pos = sorted(target["boxes"].tolist())
    got_ign = sorted(target["ignore_boxes"].tolist())
    assert got_pos == sorted(map(list, map(lambda b: [float(v) for v in b], expect_pos)))
    assert got_ign == sorted(map(list, map(lambda b: [float(v) for v in b], expect_ign)))
    assert target["labels"].shape == (len(got_pos),)


def test_data_transforms_downscale_pads_and_drops_small_boxes():
    torch.manual_seed(0)
    # letterbox scale 1 x jitter 0.5 -> 50x100 content placed at random in a 100x200 canvas
    t = DetectionTrainTransform((100, 200), scale_range=(0.5, 0.5), hflip_prob=0.0,
                                min_size=2, **NO_JITTER)  # fmt: skip
    img = tv_tensors.Image(torch.full((3, 100, 200), 200, dtype=torch.uint8))
    image, target = t(img, _target([[20, 10, 60, 40], [100, 50, 103, 90]]))
    rows, cols = torch.nonzero(image[0] == 200, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    assert (int(rows.max()) - top + 1, int(cols.max()) - left + 1) == (50, 100)
    assert int(image[0, (top + 50) % 100, (left + 100) % 200]) == 114  # padding value
    # x * 0.5 + left; the 3 px wide box becomes 1.5 px and is dropped
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[10.0 + left, 5.0 + top, 30.0 + left, 20.0 + top]])
    )
    assert target["scale"] == (0.5, 0.5)


def test_data_transforms_random_outputs_stay_valid():
    torch.manual_seed(1)
    t = DetectionTrainTransform((96, 320))
    img = tv_tensors.Image(torch.randint(0, 255, (3, 375, 1242), dtype=torch.uint8))
    target = _target([[100, 150, 300, 300], [600, 170, 640, 200], [1200, 100, 1241, 374]],
                     [[500, 160, 560, 190]])  # fmt: skip
    for _ in range(10):
        image, out = t(img, target)
        assert image.shape == (3, 96, 320)
        every = torch.cat([out["boxes"], out["ignore_boxes"]])
        assert (every[:, 0] >= 0).all() and (every[:, 2] <= 320).all()
        assert (every[:, 1] >= 0).all() and (every[:, 3] <= 96).all()
        assert (every[:, 2] - every[:, 0] >= 2).all() and (every[:, 3] - every[:, 1] >= 2).all()
        assert len(out["labels"]) == len(out["boxes"])
    with pytest.raises(ValueError, match="scale_range"):
        DetectionTrainTransform((96, 320), scale_range=(2, 1))


def test_data_transforms_eval_is_the_letterbox():
    t = DetectionEvalTransform((384, 1248))
    img = tv_tensors.Image(torch.full((3, 480, 640), 50, dtype=torch.uint8))
    target = _target([[0, 0, 640, 480]], [[100, 60, 300, 460]])
    image, out = t(img, target)
    assert image.shape == (3, 384, 1248) and image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == 114 and int(image[0, 0, 368]) == 50
    np.testing.assert_allclose(np.asarray(out["boxes"]), [[368, 0, 880, 384]])
    np.testing.assert_allclose(np.asarray(out["ignore_boxes"]), [[448, 48, 608, 368]])
    assert out["letterbox"].pad_x == 368 and out["letterbox"].scale == pytest.approx(0.8)
