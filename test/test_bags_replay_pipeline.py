"""Replay with the real inference pipeline on a bag of generated KITTI scenes (bags area).

AP from the bag equals AP from the label files, and the detections equal those of the pipeline
run on the PNG files directly (the bag carries the same pixels).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dds_perception import pipeline as pipeline_module
from dds_perception.data import kitti
from dds_perception.data.scenes import generate_kitti_scenes
from dds_perception.evaluation.kitti import evaluate_folders
from dds_perception.ros import bag, kitti2bag, replay
from dds_perception.ros import messages as m

FRAMES = 3
INPUT_SIZE = (96, 320)  # 1/16 of the default input: the same code path, far less compute


def _weights(tmp: Path) -> Path:
    """The shipped weights, else an untrained detector saved like a trained one."""
    try:
        shipped = Path(pipeline_module.default_weights())
    except (FileNotFoundError, OSError, ValueError):
        shipped = None
    if shipped is not None and shipped.is_file():
        return shipped
    from dds_perception.detection import build_detector, save_detector

    return save_detector(tmp / "untrained.safetensors", build_detector().eval())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("scenes")
    root = generate_kitti_scenes(tmp / "scenes", FRAMES, seed=5, val_fraction=0)
    raw = tmp / "scenes_bag"
    kitti2bag.convert(root, raw, progress=False)
    weights = _weights(tmp)
    pipeline = pipeline_module.Pipeline.from_weights(
        weights, device="cpu", score_threshold=0.05, input_size=INPUT_SIZE
    )  # a low threshold: an untrained detector still gives boxes
    return SimpleNamespace(root=root, raw=raw, weights=weights, pipeline=pipeline, tmp=tmp)


def test_bags_replay_pipeline_ap_from_bag_equals_label_files(scenes, tmp_path) -> None:
    out = tmp_path / "replay"
    report = replay.replay(scenes.raw, scenes.pipeline, out, annotate_frames=1, progress=False)
    assert report["frames"]["processed"] == FRAMES and report["frames"]["failed"] == 0
    layout = kitti.KittiLayout.find(scenes.root)
    from_files = evaluate_folders(layout.label_dir, out / "results")
    assert report["evaluation"] == json.loads(json.dumps(from_files.to_json()))
    for stage in ("decode", "preprocess", "inference", "postprocess", "end_to_end"):
        summary = report["latency_ms"][stage]
        assert summary["count"] == FRAMES
        assert 0 <= summary["p50"] <= summary["p95"] <= summary["max"]
    # the same detections as the pipeline on the PNG files themselves
    for frame_id in layout.frame_ids():
        rgb = cv2.cvtColor(cv2.imread(str(layout.image(frame_id))), cv2.COLOR_BGR2RGB)
        direct = scenes.pipeline(rgb, "rgb8")
        written = kitti.read_label_file(out / "results" / f"{frame_id}.txt")
        assert len(written) == len(direct.scores)
        if written:
            np.testing.assert_allclose([o.bbox for o in written], direct.boxes, atol=0.006)
            np.testing.assert_allclose([o.score for o in written], direct.scores, atol=1e-6)
    with bag.BagReader(out / "detections") as reader:
        stamps = [m.stamp_ns(i.msg.header) for i in reader.messages([bag.DETECTIONS_TOPIC])]
    assert stamps == [bag.frame_stamp_ns(i) for i in range(FRAMES)]


def test_bags_replay_command(scenes, tmp_path, capsys) -> None:
    """`dds-perception replay` end to end (in-process: torch is imported once per session)."""
    from dds_perception.cli import main

    out = tmp_path / "cli_out"
    status = main(
        ["replay", str(scenes.raw), "--weights", str(scenes.weights), "--out", str(out),
         "--device", "cpu", "--score-threshold", "0.05", "--annotate", "1", "--quiet",
         "--input-size", *map(str, INPUT_SIZE)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    assert "| end_to_end |" in printed and "AP_40" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["frames"]["processed"] == FRAMES and saved["weights"] == str(scenes.weights)
    assert len(list((out / "annotated").glob("*.png"))) == 1
    assert main(["replay", str(scenes.raw), "--weights", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "x")]) == 1  # fmt: skip
    assert "none.safetensors" in capsys.readouterr().err
