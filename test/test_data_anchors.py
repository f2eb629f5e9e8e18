"""Anchor statistics: shape IoU and torchvision's anchor layout by hand, k-means, the command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator

from dds_perception.data.anchor_stats import (
    grid_anchors,
    grid_wh,
    kmeans_anchors,
    load_box_sizes,
    png_size,
    shape_iou,
)


def test_data_anchors_shape_iou_hand_computed():
    wh = np.array([[10.0, 20.0], [40.0, 10.0]])
    anchors = np.array([[10.0, 10.0], [20.0, 20.0]])
    # [10x20 vs 10x10] 100/200; [10x20 vs 20x20] 200/400; [40x10 vs 10x10] 100/400;
    # [40x10 vs 20x20] 200/(400+400-200)
    np.testing.assert_allclose(shape_iou(wh, anchors), [[0.5, 0.5], [0.25, 1 / 3]])


def test_data_anchors_grid_matches_torchvision_anchor_generator():
    sizes, ratios = (32.0, 64.0), (0.5, 1.0)
    generator = AnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    cell = generator.cell_anchors[0] if generator.cell_anchors else generator.generate_anchors(
        sizes, ratios)  # fmt: skip
    tv_wh = torch.stack([cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]], dim=1).numpy()
    ours = grid_wh(sizes, ratios)
    # torchvision rounds its cell anchors to integers
    np.testing.assert_allclose(ours, tv_wh, atol=1.0)
    # h / w = ratio and sqrt(w * h) = size
    np.testing.assert_allclose(ours[:, 1] / ours[:, 0], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(np.sqrt(ours.prod(axis=1)), [32, 64, 32, 64])


def test_data_anchors_kmeans_and_grid_recover_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[20.0, 12.0], [60.0, 40.0], [150.0, 90.0]])
    wh = np.concatenate([c * rng.uniform(0.95, 1.05, size=(50, 2)) for c in centres])
    np.testing.assert_allclose(kmeans_anchors(wh, 3), centres, rtol=0.05)
    sizes, ratios = grid_anchors(wh, 3, 1)
    np.testing.assert_allclose(sizes, np.sqrt(centres.prod(axis=1)), rtol=0.05)
    assert 0.6 - 0.05 < ratios[0] < 0.667 + 0.05
    with pytest.raises(ValueError, match="k must be"):
        kmeans_anchors(wh, 0)


def test_data_anchors_command_on_real_labels(kitti_sample, cli, tmp_path):
    labels = kitti_sample / "training" / "label_2"
    first = kitti_sample / "training" / "image_2" / "000000.png"
    assert png_size(first) == cv2.imread(str(first)).shape[:2]
    wh = load_box_sizes(labels)
    n_cars = sum(
        line.split()[0] == "Car"
        for f in labels.glob("*.txt")
        for line in f.read_text().splitlines()
    )
    assert len(wh) == n_cars
    # at 192x624 every frame is scaled by about one half (each by its own letterbox)
    half = load_box_sizes(labels, input_size=(192, 624))
    np.testing.assert_allclose(half / wh, 0.5, atol=0.012)

    out = tmp_path / "anchors.json"
    result = cli("anchors", "--labels", str(labels), "--input-size", "384", "1248",
                 "--json", str(out))  # fmt: skip
    assert "AnchorGenerator(sizes=((" in result.stdout
    data = json.loads(out.read_text())
    assert data["num_boxes"] == n_cars and data["input_size"] == [384, 1248]
    assert len(data["sizes"]) == 5 and data["sizes"] == sorted(data["sizes"])
    assert len(data["aspect_ratios"]) == 3 and all(0.2 < r < 1.5 for r in data["aspect_ratios"])
    assert len(data["kmeans"]["anchors_wh"]) == 9
    assert 0.5 < data["grid"]["mean_iou"] <= data["kmeans"]["mean_iou"] <= 1.0
    bad = cli("anchors", "--labels", str(tmp_path), check=False)
    assert bad.returncode == 1 and "no label files" in bad.stderr
