"""Generated KITTI scenes: a real KITTI folder, consistent labels, all difficulties, seeded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dds_perception.data.kitti import (
    KittiLayout,
    image_size,
    read_calib_p2,
    read_label_file,
    read_split,
)
from dds_perception.data.scenes import KITTI_SIZES, camera_matrix, generate_kitti_scenes

FRAMES = 24


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_kitti_scenes(tmp_path_factory.mktemp("scenes") / "kitti", FRAMES, seed=3)


def _difficulty(obj) -> str | None:
    """The hardest KITTI difficulty an object first qualifies for (devkit limits)."""
    for name, (min_h, max_occ, max_trunc) in (
        ("easy", (40, 0, 0.15)),
        ("moderate", (25, 1, 0.30)),
        ("hard", (25, 2, 0.50)),
    ):
        if obj.height >= min_h and obj.occluded <= max_occ and obj.truncated <= max_trunc:
            return name
    return None


def _footprint_uv(p2: np.ndarray, obj) -> tuple[np.ndarray, np.ndarray]:
    _h, w, l = obj.dimensions  # noqa: E741
    c, s = math.cos(obj.rotation_y), math.sin(obj.rotation_y)
    xs = np.array([l, l, -l, -l]) / 2
    zs = np.array([w, -w, -w, w]) / 2
    x = c * xs + s * zs + obj.location[0]
    z = -s * xs + c * zs + obj.location[2]
    y = np.full(4, obj.location[1])
    uvw = p2 @ np.stack([x, y, z, np.ones(4)])
    return uvw[0] / uvw[2], uvw[1] / uvw[2]


def test_data_scenes_are_a_readable_kitti_folder(scenes):
    layout = KittiLayout.find(scenes)
    ids = layout.frame_ids()
    assert ids == [f"{i:06d}" for i in range(FRAMES)]
    sets = scenes / "ImageSets"
    train, val = read_split(sets / "train.txt"), read_split(sets / "val.txt")
    assert sorted(train + val) == ids == read_split(sets / "trainval.txt") and val
    meta = json.loads((scenes / "scenes.json").read_text())
    assert meta["seed"] == 3 and meta["num_frames"] == FRAMES and meta["generator_version"] >= 1
    for i, frame_id in enumerate(ids):
        # PNG at KITTI's native sizes, cycling through the four
        assert image_size(layout.image(frame_id)) == KITTI_SIZES[i % 4]
        # calib: seven KITTI lines with the right number of values; P2 as rendered
        lines = dict(
            line.split(":", 1) for line in layout.calib(frame_id).read_text().splitlines()
        )
        counts = {k: len(v.split()) for k, v in lines.items()}
        assert counts == {"P0": 12, "P1": 12, "P2": 12, "P3": 12, "R0_rect": 9,
                          "Tr_velo_to_cam": 12, "Tr_imu_to_velo": 12}  # fmt: skip
        p2 = read_calib_p2(layout.calib(frame_id))
        np.testing.assert_allclose(p2, camera_matrix(KITTI_SIZES[i % 4]), rtol=1e-9)
        read_label_file(layout.label(frame_id))  # parses


def test_data_scenes_labels_are_consistent(scenes):
    layout = KittiLayout.find(scenes)
    types, difficulties, cars = set(), set(), []
    for frame_id in layout.frame_ids():
        width, height = image_size(layout.image(frame_id))
        p2 = read_calib_p2(layout.calib(frame_id))
        for obj in read_label_file(layout.label(frame_id)):
            types.add(obj.type)
            x1, y1, x2, y2 = obj.bbox
            assert 0 <= x1 < x2 <= width - 1 and 0 <= y1 < y2 <= height - 1, obj
            if obj.type == "DontCare":
                assert obj.to_line().endswith("-1000.00 -1000.00 -1000.00 -10.00")
                continue
            difficulties.add(_difficulty(obj))
            assert 0.0 <= obj.truncated <= 0.75 and obj.occluded in (0, 1, 2)
            x, y, z = obj.location
            assert 1.5 <= y <= 1.8 and z > 0  # on the ground, in front of the camera
            alpha = obj.rotation_y - math.atan2(x, z)
            alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
            assert abs(math.remainder(alpha - obj.alpha, 2 * math.pi)) < 0.02
            # the box's left, right and bottom edges are the projection of the 3-D box's
            # footprint (KITTI devkit corner formula), which the rendered body reaches
            if obj.truncated == 0 and obj.type == "Car":
                u, v = _footprint_uv(p2, obj)
                assert abs(x1 - u.min()) < 0.05 and abs(x2 - u.max()) < 0.05, obj
                assert abs(y2 - v.max()) < 0.05, obj
                cars.append((z, y2 - y1, (x2 - x1) / (y2 - y1)))
    assert {"Car", "Van", "DontCare"} <= types
    assert {"easy", "moderate", "hard", None} <= difficulties  # None: under 25 px etc.
    z, h, aspect = (np.array(c) for c in zip(*cars, strict=True))
    # perspective: nearer cars are bigger (rank correlation of depth and height strongly < 0)
    rank_z, rank_h = np.argsort(np.argsort(z)), np.argsort(np.argsort(h))
    assert np.corrcoef(rank_z, rank_h)[0, 1] < -0.9
    assert h.min() < 25 and h.max() > 60
    assert aspect.min() > 0.8 and aspect.max() < 4.0 and np.median(aspect) > 1.1


def test_data_scenes_are_deterministic_per_seed(scenes, tmp_path):
    again = generate_kitti_scenes(tmp_path / "again", 3, seed=3)
    other = generate_kitti_scenes(tmp_path / "other", 3, seed=4)
    for frame_id in ("000000", "000001", "000002"):
        for sub, ext in (("image_2", "png"), ("label_2", "txt"), ("calib", "txt")):
            name = f"training/{sub}/{frame_id}.{ext}"
            # frame i does not depend on the number of frames made
            assert (again / name).read_bytes() == (scenes / name).read_bytes(), name
        name = f"training/image_2/{frame_id}.png"
        assert (other / name).read_bytes() != (scenes / name).read_bytes()


def test_data_scenes_refuse_to_replace_a_folder(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_kitti_scenes(target, 1)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="num_frames"):
        generate_kitti_scenes(tmp_path / "none", 0)
    generate_kitti_scenes(target, 1, sizes=((320, 96),), overwrite=True)
    assert not (target / "keep.txt").exists()
    assert image_size(target / "training/image_2/000000.png") == (320, 96)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_data_scenes_cli(cli, tmp_path):
    result = cli("make-scenes", str(tmp_path / "s"), "--frames", "2", "--seed", "5",
                 "--size", "621", "188", "--size", "320", "96")  # fmt: skip
    assert "wrote 2 frames" in result.stdout
    layout = KittiLayout.find(tmp_path / "s")
    assert [image_size(layout.image(f)) for f in layout.frame_ids()] == [(621, 188), (320, 96)]
    # a resized KITTI camera: focal length halves with the width
    assert read_calib_p2(layout.calib("000000"))[0, 0] == pytest.approx(721.5377 / 2)
    result = cli("make-scenes", str(tmp_path / "s"), "--frames", "2", check=False)
    assert result.returncode == 1 and "not empty" in result.stderr
    assert "make-scenes /tmp/scenes" in cli("make-scenes", "--help").stdout


def test_data_scenes_score_perfectly_against_themselves_in_every_difficulty(scenes):
    from dds_perception.data.kitti import detection_to_object
    from dds_perception.evaluation.kitti import evaluate

    layout = KittiLayout.find(scenes)
    gt = {f: read_label_file(layout.label(f)) for f in layout.frame_ids()}
    perfect = {
        f: [
            detection_to_object(o.bbox, 0.5 + 0.01 * i)
            for i, o in enumerate(objs)
            if o.type == "Car"
        ]
        for f, objs in gt.items()
    }
    result = evaluate(gt, perfect)
    for difficulty in ("easy", "moderate", "hard"):
        # the devkit needs more than 40 valid boxes before perfect detections reach 100 AP_40
        assert result.curves["Car"][difficulty].num_gt > 40, difficulty
        assert result.ap("Car", difficulty) == pytest.approx(100.0)
    # boxes shifted by half their width miss every car
    shifted = {
        f: [
            detection_to_object((x1 + (x2 - x1) / 2, y1, x2 + (x2 - x1) / 2, y2), 0.9)
            for x1, y1, x2, y2 in (d.bbox for d in dets)
        ]
        for f, dets in perfect.items()
    }
    assert evaluate(gt, shifted).ap("Car", "moderate") == pytest.approx(0.0)


def test_data_scenes_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    import dds_perception.data.scenes as scenes_module

    real = scenes_module.render_scene
    calls = []

    def failing(rng, size):
        calls.append(size)
        if len(calls) == 2:
            raise RuntimeError("renderer broke")
        return real(rng, size)

    monkeypatch.setattr(scenes_module, "render_scene", failing)
    with pytest.raises(RuntimeError, match="renderer broke"):
        generate_kitti_scenes(tmp_path / "out", 3, sizes=((320, 96),))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
