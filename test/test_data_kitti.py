"""KITTI label files: parse / write / parse round trip on real labels, errors naming file:line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dds_perception.data.kitti import (
    KittiFormatError,
    KittiObject,
    detection_to_object,
    image_size,
    parse_line,
    read_calib_p2,
    read_label_file,
    read_split,
    write_label_file,
)


def _label_files(root: Path) -> list[Path]:
    files = sorted((root / "training" / "label_2").glob("*.txt"))
    assert len(files) == 60
    return files


def test_data_kitti_real_labels_round_trip(kitti_sample, tmp_path):
    n_objects = 0
    for path in _label_files(kitti_sample):
        objects = read_label_file(path)
        out = tmp_path / path.name
        write_label_file(out, objects)
        assert read_label_file(out) == objects
        # KITTI writes 2 decimals everywhere except DontCare's "-1 -1 -10 ... -1000" fields
        original = [line for line in path.read_text().splitlines() if line.strip()]
        for line, obj in zip(original, objects, strict=True):
            if obj.type != "DontCare":
                assert obj.to_line() == line.strip()
        n_objects += len(objects)
    assert n_objects == 405  # 175 Car, 165 DontCare, 25 Pedestrian, 18 Van, ... in the sample


def test_data_kitti_real_label_fields(kitti_sample):
    first = read_label_file(kitti_sample / "training" / "label_2" / "000000.txt")[0]
    # "Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 8.41 0.01"
    assert first == KittiObject(
        "Pedestrian",
        0.0,
        0,
        -0.2,
        (712.40, 143.00, 810.73, 307.92),
        (1.89, 0.48, 1.20),
        (1.84, 1.47, 8.41),
        0.01,
    )
    assert first.height == pytest.approx(164.92)
    assert first.score is None


def test_data_kitti_result_line_round_trip(tmp_path):
    obj = detection_to_object([10.0, 20.5, 110.25, 80.0], 0.8765432)
    assert obj.to_line().split()[-1] == "0.876543"
    write_label_file(tmp_path / "000001.txt", [obj])
    back = read_label_file(tmp_path / "000001.txt")[0]
    assert back.bbox == (10.0, 20.5, 110.25, 80.0)
    assert back.score == pytest.approx(0.876543)
    write_label_file(tmp_path / "000002.txt", [])
    assert (tmp_path / "000002.txt").read_text() == ""
    assert read_label_file(tmp_path / "000002.txt") == []


def test_data_kitti_real_calib_and_image(kitti_sample):
    p2 = read_calib_p2(kitti_sample / "training" / "calib" / "000000.txt")
    assert p2.shape == (3, 4)
    assert p2[2, 2] == 1.0 and p2[0, 0] > 500  # focal length in pixels
    width, height = image_size(kitti_sample / "training" / "image_2" / "000000.png")
    assert 1200 <= width <= 1250 and 370 <= height <= 376


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Car 0.00 0 1.0 1 2 3\n", r"labels\.txt:2: expected 15 or 16 fields, got 7"),
        ("Car 0.00 zero 1 1 2 3 4 1 1 1 1 1 1 1\n", r"labels\.txt:2: not a number: 'zero'"),
        ("Car 0.00 0 nan 1 2 3 4 1 1 1 1 1 1 1\n", r"labels\.txt:2: NaN"),
    ],
)
def test_data_kitti_malformed_label_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    good = "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59\n"
    path.write_text(good + text)
    with pytest.raises(KittiFormatError, match=message):
        read_label_file(path)


def test_data_kitti_parse_line_source_in_message():
    with pytest.raises(KittiFormatError, match=r"^frame\.txt:7: "):
        parse_line("Car 1 2", source="frame.txt", lineno=7)


def test_data_kitti_split_and_calib_errors(tmp_path):
    split = tmp_path / "val.txt"
    split.write_text("000001\n\n7\nabc\n")
    with pytest.raises(KittiFormatError, match=r"val\.txt:4: not a frame id: 'abc'"):
        read_split(split)
    split.write_text("000001\n\n7\n")
    assert read_split(split) == ["000001", "000007"]
    calib = tmp_path / "calib.txt"
    calib.write_text("P0: 1 2 3\n")
    with pytest.raises(KittiFormatError, match=r"calib\.txt: no 'P2:' line"):
        read_calib_p2(calib)
    calib.write_text("P0: 1\nP2: 1 2 3\n")
    with pytest.raises(KittiFormatError, match=r"calib\.txt:2: P2 needs 12 values, got 3"):
        read_calib_p2(calib)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(KittiFormatError, match=r"broken\.png: cannot read image"):
        image_size(broken)
    calib.write_text("P2: " + " ".join(str(float(i)) for i in range(12)) + "\n")
    np.testing.assert_array_equal(read_calib_p2(calib), np.arange(12.0).reshape(3, 4))
