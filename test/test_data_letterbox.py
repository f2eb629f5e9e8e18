"""Letterbox maths: hand-computed geometry at KITTI sizes and 640x480, round trips, the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dds_perception.data.letterbox import (
    boxes_to_network,
    boxes_to_source,
    letterbox_image,
    letterbox_params,
)

NET = (384, 1248)  # (H, W)


@pytest.mark.parametrize(
    ("src_hw", "dst_hw", "expected"),
    [
        # 1242x375: width-bound, 1248/1242; 375 * 1.00483 = 376.81 -> 377 rows, (384-377)//2 = 3
        ((375, 1242), NET, dict(scale=1248 / 1242, pad_x=0, pad_y=3, new_w=1248, new_h=377)),
        # 1224x370: width-bound, 1248/1224; 370 * 1.01961 = 377.25 -> 377 rows, pad 3
        ((370, 1224), NET, dict(scale=1248 / 1224, pad_x=0, pad_y=3, new_w=1248, new_h=377)),
        # 640x480: height-bound, 0.8 -> 512x384, (1248-512)//2 = 368 columns on the left
        ((480, 640), NET, dict(scale=0.8, pad_x=368, pad_y=0, new_w=512, new_h=384)),
        # 640x480 into a square: 0.5 -> 320x240, 40 rows on top
        ((480, 640), (320, 320), dict(scale=0.5, pad_x=0, pad_y=40, new_w=320, new_h=240)),
        # identity
        ((375, 1242), (375, 1242), dict(scale=1.0, pad_x=0, pad_y=0, new_w=1242, new_h=375)),
    ],
)
def test_data_letterbox_params_hand_computed(src_hw, dst_hw, expected):
    lb = letterbox_params(src_hw, dst_hw)
    assert lb.scale == pytest.approx(expected["scale"])
    for key in ("pad_x", "pad_y", "new_w", "new_h"):
        assert getattr(lb, key) == expected[key], key
    assert (lb.src_h, lb.src_w, lb.dst_h, lb.dst_w) == (*src_hw, *dst_hw)


@pytest.mark.parametrize(
    ("src_hw", "box", "expected"),
    [
        # x * 1248/1242, y * 377/375 + 3
        ((375, 1242), (100, 50, 200, 150), (100.483092, 53.266667, 200.966184, 153.8)),
        # x * 1248/1224, y * 377/370 + 3
        ((370, 1224), (612, 0, 1224, 370), (624.0, 3.0, 1248.0, 380.0)),
        # x * 0.8 + 368, y * 0.8
        ((480, 640), (0, 0, 640, 480), (368.0, 0.0, 880.0, 384.0)),
        ((480, 640), (100, 60, 300, 460), (448.0, 48.0, 608.0, 368.0)),
    ],
)
def test_data_letterbox_boxes_hand_computed_and_round_trip(src_hw, box, expected):
    lb = letterbox_params(src_hw, NET)
    net = boxes_to_network(np.array([box], dtype=np.float32), lb)
    np.testing.assert_allclose(net[0], expected, atol=1e-3)
    back = boxes_to_source(net, lb, src_hw)
    np.testing.assert_allclose(back[0], box, atol=1e-3)
    # torch in, torch out, same numbers
    net_t = boxes_to_network(torch.tensor([box], dtype=torch.float32), lb)
    assert isinstance(net_t, torch.Tensor)
    torch.testing.assert_close(net_t[0], torch.tensor(expected, dtype=torch.float32))
    assert isinstance(boxes_to_source(net_t, lb), torch.Tensor)


def test_data_letterbox_to_source_clips_to_the_image():
    lb = letterbox_params((480, 640), NET)
    # a box spanning the left padding and beyond the right edge of the content
    back = boxes_to_source(np.array([[0.0, -10.0, 1000.0, 400.0]]), lb)
    np.testing.assert_allclose(back[0], (0.0, 0.0, 640.0, 480.0))
    # inside the padding only: collapses onto the border
    back = boxes_to_source(np.array([[10.0, 10.0, 100.0, 50.0]]), lb)
    assert back[0, 0] == back[0, 2] == 0.0


def test_data_letterbox_image_places_content_centred():
    image = np.full((480, 640, 3), 200, dtype=np.uint8)
    canvas, lb = letterbox_image(image, NET)
    assert canvas.shape == (384, 1248, 3) and canvas.dtype == np.uint8
    assert (canvas[:, :368] == 114).all() and (canvas[:, 368 + 512 :] == 114).all()
    assert (canvas[:, 368 : 368 + 512] == 200).all()
    # a grey image keeps its channels count; a marker lands where boxes_to_network says
    marked = np.zeros((375, 1242), dtype=np.uint8)
    marked[100:150, 600:700] = 255
    canvas, lb = letterbox_image(marked, NET, pad_value=0)
    assert canvas.shape == (384, 1248)
    x1, y1, x2, y2 = boxes_to_network(np.array([[600, 100, 700, 150]]), lb)[0]
    rows, cols = np.nonzero(canvas > 127)
    assert abs(cols.min() - x1) <= 1 and abs(cols.max() + 1 - x2) <= 1
    assert abs(rows.min() - y1) <= 1 and abs(rows.max() + 1 - y2) <= 1


def test_data_letterbox_empty_box_sets():
    lb = letterbox_params((375, 1242), NET)
    for empty in (np.zeros((0,)), np.zeros((0, 4)), torch.zeros(0), torch.zeros(0, 4)):
        assert tuple(boxes_to_network(empty, lb).shape) == (0, 4)
        assert tuple(boxes_to_source(empty, lb).shape) == (0, 4)


def test_data_letterbox_rejects_bad_sizes():
    with pytest.raises(ValueError, match="dst_hw"):
        letterbox_params((375, 1242), (0, 1248))
    with pytest.raises(ValueError, match="src_hw"):
        letterbox_params((375,), (384, 1248))
    with pytest.raises(ValueError, match="array"):
        letterbox_image(np.zeros((0, 0, 3), np.uint8), NET)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        boxes_to_network(np.zeros((3, 3)), letterbox_params((10, 10), (10, 10)))
    with pytest.raises(ValueError, match="does not match"):
        boxes_to_source(np.zeros((1, 4)), letterbox_params((10, 10), (10, 10)), (20, 20))
