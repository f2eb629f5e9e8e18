"""The teacher detector (NanoDet ONNX decoding, tiling, class map, ignore regions) and the
``dds-perception pseudo-label`` command on real KITTI frames."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from dds_perception.cli import main
from dds_perception.data import teacher as t
from dds_perception.data.kitti import read_label_file

TEACHER_FILE = Path(t.__file__)
FRAMES = ("000010", "000025", "000047")  # 4, 3 and 4 unoccluded cars >= 40 px tall


@pytest.fixture(scope="module")
def teacher_path() -> Path:
    from conftest import SHARED_DATA

    pytest.importorskip(
        "onnxruntime", reason="the teacher needs onnxruntime (pip install '.[onnx]')"
    )
    path = SHARED_DATA / "teachers" / "nanodet_m.onnx"
    if not path.is_file():
        pytest.skip(f"teacher model not found at {path} (set DDS_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="module")
def car_teacher(teacher_path: Path) -> t.OnnxTeacher:
    """The real teacher, decoding COCO car only, one thread (the test machine is shared)."""
    return t.OnnxTeacher(teacher_path, threads=1, score_floor=0.05, classes=[2])


def _rgb(path: Path) -> np.ndarray:
    from dds_perception.data.detection_dataset import read_rgb

    return read_rgb(path)


# --------------------------------------------------------------------------------------------
# Decoding maths (no model)


def test_decode_level_by_hand():
    """Softmax expectation over the bins, times the stride, from the cell centre to each side."""
    stride, grid_w, bins = 8, 2, 8
    scores = np.zeros((4, 3), np.float32)
    scores[3, 1] = 0.9  # cell (col 1, row 1), class 1
    scores[0, 2] = 0.3  # cell (col 0, row 0), class 2
    scores[2, 0] = 0.01  # below the floor
    dist = np.zeros((4, 4 * bins), np.float32)
    left, _top, right, bottom = (dist[3, i * bins : (i + 1) * bins] for i in range(4))
    left[2] = 50.0  # one-hot on bin 2: expectation 2
    # _top stays all zeros: uniform, expectation 3.5
    right[[1, 3]] = 20.0  # two equal bins: expectation 2
    bottom[[0, 1]] = np.log([1.0, 3.0]) + 30.0  # p = 0.25, 0.75: expectation 0.75
    level = t.Level(stride, grid_w, scores, dist)

    boxes, found, labels = t.decode_level(level, score_floor=0.05)

    order = np.argsort(-found)
    boxes, found, labels = boxes[order], found[order], labels[order]
    assert labels.tolist() == [1, 2]
    np.testing.assert_allclose(found, [0.9, 0.3], rtol=1e-6)
    cx = cy = (1 + 0.5) * stride  # 12
    expected = [cx - 2 * 8, cy - 3.5 * 8, cx + 2 * 8, cy + 0.75 * 8]
    np.testing.assert_allclose(boxes[0], expected, atol=1e-4)
    np.testing.assert_allclose(boxes[1], [4 - 28, 4 - 28, 4 + 28, 4 + 28], atol=1e-4)  # uniform
    # restricting the classes decodes only those
    only, _, only_labels = t.decode_level(level, 0.05, classes=[2])
    assert only_labels.tolist() == [2] and only.shape == (1, 4)


def test_tiles_cover_a_kitti_frame_with_overlap():
    origins = t.tile_origins(1242, 469, 0.2)
    assert origins[0] == 0 and origins[-1] == 1242 - 469 and len(origins) == 4
    assert min(np.diff(origins)) > 0 and 469 - max(np.diff(origins)) >= 0.2 * 469
    assert t.tile_origins(375, 469, 0.2) == [0]


def test_cut_boxes_only_at_inner_window_edges():
    boxes = np.array([[0, 10, 50, 60], [100, 10, 200, 60], [400, 10, 469, 60]], np.float64)
    # a middle tile: both vertical edges are inside the frame
    assert t.cut_boxes(boxes, (300, 0, 469, 375), (375, 1242), 2.0).tolist() == [
        True, False, True,
    ]  # fmt: skip
    # the first tile: its left edge is the frame's border, so a box there is not cut
    assert t.cut_boxes(boxes, (0, 0, 469, 375), (375, 1242), 2.0).tolist() == [
        False, False, True,
    ]  # fmt: skip


def test_onnxruntime_is_imported_lazily():
    """Importing the module (as the node's process might) never needs onnxruntime."""
    tree = ast.parse(TEACHER_FILE.read_text(encoding="utf-8"))
    top_level = [
        alias.name
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ] + [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not any("onnxruntime" in str(name) for name in top_level)


def test_missing_onnxruntime_says_to_install_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(t.TeacherError, match=r"onnx.*extra") as info:
        t.OnnxTeacher(tmp_path / "model.onnx")
    assert "model.onnx" in str(info.value)


# --------------------------------------------------------------------------------------------
# Class map and ignore regions (no model)


def test_parse_class_map():
    assert t.parse_class_map(["car=Car", " truck = Van ", "bus=Van"]) == t.DEFAULT_CLASS_MAP
    assert t.parse_class_map(["motorbike=DontCare"]) == {"motorbike": "DontCare"}
    for bad, words in (
        (["car"], "COCO_NAME=KittiType"),
        (["car=car"], "not a KITTI type"),
        (["car=Car", "car=Van"], "mapped twice"),
        ([], "empty"),
    ):
        with pytest.raises(ValueError, match=words):
            t.parse_class_map(bad)
    assert t.class_indices({"car": "Car", "truck": "Van"}, t.COCO_NAMES) == {2: "Car", 7: "Van"}
    with pytest.raises(ValueError, match="lorry"):
        t.class_indices({"lorry": "Van"}, t.COCO_NAMES)


def test_boxes_between_the_thresholds_become_dont_care():
    far = [(10.0 + 100 * i, 10.0, 60.0 + 100 * i, 40.0) for i in range(6)]
    detections = [
        t.TeacherBox(far[0], 0.90, 2),  # car, sure -> Car
        t.TeacherBox(far[1], 0.30, 2),  # car, unsure -> DontCare
        t.TeacherBox(far[2], 0.10, 2),  # car, below the ignore threshold -> dropped
        t.TeacherBox(far[3], 0.50, 7),  # truck -> Van
        t.TeacherBox(far[4], 0.95, 0),  # person: not in the class map -> dropped
        t.TeacherBox((12.0, 11.0, 61.0, 40.0), 0.35, 7),  # an unsure truck on the car: dropped
    ]
    objects = t.to_kitti_objects(
        detections, {2: "Car", 7: "Van"}, score_threshold=0.4, ignore_threshold=0.25
    )
    assert [(o.type, o.bbox) for o in objects] == [
        ("Car", far[0]),
        ("Van", far[3]),
        ("DontCare", far[1]),
    ]
    assert all(o.score is None and len(o.to_line().split()) == 15 for o in objects)
    scored = t.to_kitti_objects(detections, {2: "Car"}, keep_scores=True)
    assert [(o.type, o.score) for o in scored] == [("Car", 0.9), ("DontCare", 0.3)]
    # equal thresholds: no ignore regions
    plain = t.to_kitti_objects(detections, {2: "Car"}, score_threshold=0.4, ignore_threshold=0.4)
    assert [o.type for o in plain] == ["Car"]
    with pytest.raises(
        ValueError, match=r"ignore threshold 0\.5 is above the score threshold 0\.4"
    ):
        t.to_kitti_objects(detections, {2: "Car"}, score_threshold=0.4, ignore_threshold=0.5)


# --------------------------------------------------------------------------------------------
# The real teacher


def test_teacher_outputs_are_paired_by_shape(car_teacher):
    assert car_teacher.input_name == "input.1" and car_teacher.input_size == 416
    assert car_teacher.strides == (8, 16, 32)
    assert car_teacher.class_names[2] == "car" and len(car_teacher.class_names) == 80


def test_teacher_finds_the_labelled_cars_of_real_frames(car_teacher, kitti_sample):
    found = total = 0
    for frame_id in ("000010", "000047"):
        image = _rgb(kitti_sample / "training" / "image_2" / f"{frame_id}.png")
        labels = read_label_file(kitti_sample / "training" / "label_2" / f"{frame_id}.txt")
        cars = [o.bbox for o in labels if o.type == "Car" and o.occluded == 0 and o.height >= 40]
        detections = car_teacher.detect(image)
        assert all(d.class_index == 2 and 0.05 <= d.score <= 1.0 for d in detections)
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        boxes = torch.tensor([d.box for d in detections if d.score >= 0.4]).reshape(-1, 4)
        assert len(boxes) and boxes[:, 0::2].min() >= 0 and boxes[:, 2].max() <= image.shape[1]
        total += len(cars)
        if len(boxes):
            found += int((box_iou(torch.tensor(cars), boxes).max(dim=1).values >= 0.5).sum())
    assert total == 8
    assert found >= 7, f"teacher matched {found} of {total} labelled cars at IoU 0.5"


def test_corrupt_onnx_file_is_a_teacher_error_naming_it(tmp_path, teacher_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(64))
    with pytest.raises(t.TeacherError, match="not a loadable ONNX model") as info:
        t.OnnxTeacher(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(t.TeacherError, match="no such teacher model file"):
        t.OnnxTeacher(tmp_path / "absent.onnx")


def test_a_model_that_is_not_nanodet_is_a_teacher_error(tmp_path, teacher_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"])],
        "not_nanodet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 3, 1, 1])],
    )
    path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(t.TeacherError, match=r"output pooled has shape \[1, 3, 1, 1\]") as info:
        t.OnnxTeacher(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# The command


def _copy_frames(kitti_sample: Path, folder: Path) -> Path:
    folder.mkdir()
    for frame_id in FRAMES:
        shutil.copy(kitti_sample / "training" / "image_2" / f"{frame_id}.png", folder)
    return folder


def test_command_labels_a_folder_that_the_dataset_reads(
    tmp_path, kitti_sample, teacher_path, capsys
):
    from dds_perception.data.detection_dataset import KittiDetectionDataset

    source = _copy_frames(kitti_sample, tmp_path / "frames")
    out = tmp_path / "pseudo"
    options = ["--teacher", str(teacher_path), "--quiet", "--threads", "1"]
    assert main(["pseudo-label", str(source), str(out), *options]) == 0
    assert "3 frames" in capsys.readouterr().out

    dataset = KittiDetectionDataset(out)
    assert dataset.frame_ids == list(FRAMES)
    for index, frame_id in enumerate(FRAMES):
        image, target = dataset[index]
        assert tuple(image.shape[1:]) == target["orig_size"]
        assert len(target["boxes"]) >= 3, f"{frame_id}: too few pseudo-labelled cars"
        labels = out / "training" / "label_2" / f"{frame_id}.txt"
        objects = read_label_file(labels)
        assert {o.type for o in objects} <= {"Car", "Van", "DontCare"}
        assert all(len(line.split()) == 15 for line in labels.read_text().splitlines())
    copied = out / "training" / "image_2" / f"{FRAMES[0]}.png"
    assert copied.read_bytes() == (source / f"{FRAMES[0]}.png").read_bytes()
    leftovers = [p for p in (out / "training").rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers

    summary = json.loads((out / "pseudo_label.json").read_text())
    assert summary["teacher"] == str(teacher_path)
    assert summary["score_threshold"] == 0.4 and summary["ignore_threshold"] == 0.25
    assert summary["class_map"] == t.DEFAULT_CLASS_MAP
    assert summary["counts"]["frames"] == 3 and summary["counts"]["failed"] == 0
    assert summary["counts"]["objects"]["Car"] >= 9

    # an OUT_ROOT that already holds frames is refused, naming the folder
    assert main(["pseudo-label", str(source), str(out), *options]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and str(out / "training" / "image_2") in err
    # --with-scores writes result files (16 fields) for `evaluate`
    scored = tmp_path / "scored"
    code = main(
        ["pseudo-label", str(source), str(scored), *options, "--with-scores", "--limit", "1"]
    )
    assert code == 0
    lines = (scored / "training" / "label_2" / f"{FRAMES[0]}.txt").read_text().splitlines()
    assert lines and all(len(line.split()) == 16 for line in lines)


def test_command_on_an_empty_folder_fails_naming_it(tmp_path, teacher_path, capsys):
    empty = tmp_path / "no_images"
    empty.mkdir()
    code = main(
        ["pseudo-label", str(empty), str(tmp_path / "out"), "--teacher", str(teacher_path)]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dds-perception pseudo-label: error:") and str(empty) in err
    assert not (tmp_path / "out").exists()


def test_command_labels_a_bag_like_the_folder(tmp_path, kitti_sample, teacher_path, capsys):
    pytest.importorskip("rosbags")
    from dds_perception.ros.kitti2bag import convert

    bag_path = tmp_path / "bag"
    convert(kitti_sample, bag_path, limit=2, compressed=True, progress=False)
    options = ["--teacher", str(teacher_path), "--quiet", "--threads", "1"]
    out = tmp_path / "from_bag"
    missing = ["--image-topic", "/camera/missing"]
    assert main(["pseudo-label", str(bag_path), str(out), *options, *missing]) == 1
    assert "/camera/missing" in capsys.readouterr().err and not out.exists()

    assert main(["pseudo-label", str(bag_path), str(out), *options]) == 0
    labels = out / "training" / "label_2"
    assert sorted(p.stem for p in labels.glob("*.txt")) == ["000000", "000001"]  # /kitti/frame_id
    # the bag carries the PNG bytes: the folder path gives the same labels for the same frame
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(kitti_sample / "training" / "image_2" / "000000.png", folder)
    other = tmp_path / "from_folder"
    assert main(["pseudo-label", str(folder), str(other), *options]) == 0
    expected = (labels / "000000.txt").read_text()
    assert (other / "training" / "label_2" / "000000.txt").read_text() == expected
