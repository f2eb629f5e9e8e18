"""Track-id metrics (hand-checked), generated sequences (make-scenes --sequence) and the
track-eval command on one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dds_perception.data.scenes import generate_kitti_scenes
from dds_perception.evaluation.tracking import FrameTracks, id_metrics


def frame(truth: dict[int, list[float]], found: list[tuple[list[float], str]]) -> FrameTracks:
    return FrameTracks(
        np.array(list(truth.values()), dtype=float).reshape(-1, 4),
        list(truth),
        np.array([b for b, _ in found], dtype=float).reshape(-1, 4),
        [i for _, i in found],
    )


A, B = [0, 0, 10, 10], [20, 0, 30, 10]


def test_track_metrics_by_hand():
    frames = [
        frame({1: A, 2: B}, [(A, "1"), (B, "2")]),
        frame({1: A, 2: B}, [(A, "1")]),  # car 2 missed
        frame({1: A, 2: B}, [(A, "1"), (B, "2")]),  # car 2 back with its id: a fragmentation
        frame({1: A, 2: B}, [(A, "2"), (B, "1")]),  # both swapped: two switches, two ids moved
        frame({1: A, 2: B}, [(A, "3"), (B, "3")]),  # one id twice in a frame
        frame({1: A}, [([50, 50, 60, 60], "4")]),  # a false box matches nothing
    ]
    m = id_metrics(frames)
    assert (m["frames"], m["truth_boxes"], m["matched"], m["with_id"]) == (6, 11, 9, 9)
    assert (m["id_switches"], m["fragmentations"], m["duplicates"]) == (4, 1, 1)
    assert m["ids_on_two_cars"] == 3  # ids 2 and 1 in frame 3, id 3 in frame 4
    assert m["cars"] == 2 and m["coverage"] == pytest.approx(9 / 11)


def test_track_sequence_scenes_move_and_name_their_cars(tmp_path):
    root = generate_kitti_scenes(tmp_path / "clip", 6, seed=2, sizes=((621, 188),),
                                 sequence=True)  # fmt: skip
    meta = json.loads((root / "scenes.json").read_text())
    ids = meta["sequence"]["track_ids"]
    assert meta["sequence"]["fps"] == 10.0 and sorted(ids) == [f"{i:06d}" for i in range(6)]
    labels = {
        name: (root / "training" / "label_2" / f"{name}.txt").read_text().splitlines()
        for name in ids
    }
    assert all(len(labels[name]) == len(ids[name]) for name in ids)
    assert all(len(set(frame_ids)) == len(frame_ids) for frame_ids in ids.values())
    # some labelled car moves between the first and the last frame
    first = dict(zip(ids["000000"], labels["000000"], strict=True))
    last = dict(zip(ids["000005"], labels["000005"], strict=True))
    assert any(first[car] != last[car] for car in set(first) & set(last))
    again = generate_kitti_scenes(tmp_path / "again", 2, seed=2, sizes=((621, 188),),
                                  sequence=True)  # fmt: skip
    for name in ("000000.png", "000001.png"):
        same = (again / "training" / "image_2" / name).read_bytes()
        assert same == (root / "training" / "image_2" / name).read_bytes()


def test_track_eval_command_on_truth_boxes(cli, tmp_path):
    clip = tmp_path / "clip"
    cli("make-scenes", str(clip), "--sequence", "--frames", "20", "--seed", "1",
        "--size", "621", "188")  # fmt: skip
    out = tmp_path / "tracks.json"
    result = cli("track-eval", str(clip), "--truth-boxes", "--miss-rate", "0.1",
                 "--json", str(out))  # fmt: skip
    assert "id switches" in result.stdout
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert metrics["duplicates"] == 0 and metrics["frames"] == 20
    assert metrics["coverage"] > 0.5
    bad = cli("track-eval", str(tmp_path), "--truth-boxes", check=False)
    assert bad.returncode == 1 and "not a make-scenes --sequence folder" in bad.stderr
