"""Replay and evaluate-bag: AP from a bag equals AP from the label files (bags area).

These tests drive the replay with a deterministic stand-in detector that recognises the sample
frames by their pixels and answers jittered ground truth, so the AP is neither 0 nor 100 and the
bag path (labels from /kitti/labels, frames from image messages, results files, headers) is
checked against the devkit evaluation of the original label files. The real pipeline is
exercised in test_bags_replay_pipeline.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dds_perception.data import kitti
from dds_perception.data.images import to_rgb
from dds_perception.evaluation.kitti import evaluate, evaluate_folders
from dds_perception.ros import bag, evaluate_bag, kitti2bag, replay
from dds_perception.ros import messages as m

LIMIT = 6


class OracleDetector:
    """Recognises a frame by its pixels; returns its Car/Van labels jittered, some missed."""

    def __init__(self, layout: kitti.KittiLayout, frame_ids: list[str]) -> None:
        import cv2

        self.class_names = ["car"]
        self.device = "cpu"
        self.answers = {}
        rng = np.random.default_rng(0)
        for frame_id in frame_ids:
            bgr = cv2.imread(str(layout.image(frame_id)))
            key = hashlib.sha1(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes()).hexdigest()
            boxes, scores = [], []
            for obj in kitti.read_label_file(layout.label(frame_id)):
                if obj.type in ("Car", "Van") and rng.random() > 0.2:
                    boxes.append(np.asarray(obj.bbox) + rng.normal(0, 3, 4))
                    scores.append(rng.uniform(0.3, 1.0))
            boxes.append([10.0, 150.0, 90.0, 220.0])  # a false positive
            scores.append(0.5)
            self.answers[key] = (np.asarray(boxes, np.float32), np.asarray(scores, np.float32))
        self.calls = []

    def __call__(self, image, encoding="rgb8", *, height=None, width=None, step=None, **kw):
        rgb = to_rgb(image, encoding, height=height, width=width, step=step)
        self.calls.append(encoding)
        boxes, scores = self.answers[hashlib.sha1(rgb.tobytes()).hexdigest()]
        timings = {"decode": 1.0, "preprocess": 2.0, "inference": 3.0, "postprocess": 4.0}
        return SimpleNamespace(
            boxes=boxes,
            scores=scores,
            class_names=["car"] * len(scores),
            image_size=rgb.shape[:2],
            timings=timings,
        )


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from conftest import SHARED_DATA

    root = SHARED_DATA / "kitti_sample"
    if not root.is_dir():
        pytest.skip(f"real sample data not found at {root} (set DDS_SHARED_DATA)")
    layout = kitti.KittiLayout.find(root)
    ids = layout.frame_ids()[:LIMIT]
    out = tmp_path_factory.mktemp("replay")
    raw = out / "raw_bag"
    png = out / "png_bag"
    kitti2bag.convert(root, raw, limit=LIMIT, progress=False)
    kitti2bag.convert(root, png, limit=LIMIT, compressed=True, storage="sqlite3", progress=False)
    return SimpleNamespace(root=root, layout=layout, ids=ids, raw=raw, png=png, out=out)


def _label_dir_subset(sample: SimpleNamespace, tmp: Path) -> Path:
    labels = tmp / "label_2"
    labels.mkdir()
    for frame_id in sample.ids:
        (labels / f"{frame_id}.txt").write_bytes(sample.layout.label(frame_id).read_bytes())
    return labels


@pytest.mark.parametrize("variant", ["raw", "png"])
def test_bags_replay_ap_equals_label_files(sample, tmp_path, variant) -> None:
    detector = OracleDetector(sample.layout, sample.ids)
    out = tmp_path / "out"
    report = replay.replay(
        getattr(sample, variant), detector, out, annotate_frames=2, progress=False
    )
    assert detector.calls == (["rgb8"] if variant == "raw" else ["compressed"]) * LIMIT
    frames = report["frames"]
    assert (frames["total"], frames["processed"], frames["failed"]) == (LIMIT, LIMIT, 0)
    assert frames["with_ground_truth"] == LIMIT
    assert sorted(p.stem for p in (out / "results").iterdir()) == sample.ids
    # AP of the bag replay == devkit evaluation of the original label files and these results
    from_files = evaluate_folders(_label_dir_subset(sample, tmp_path), out / "results")
    assert report["evaluation"] == json.loads(json.dumps(from_files.to_json()))
    assert 0.0 < report["evaluation"]["Car"]["moderate"]["AP_40"] < 100.0
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert "| inference | 3.00 | 3.00 | 3.00 | 3.00 |" in (out / "report.md").read_text()
    for stage in ("decode", "preprocess", "inference", "postprocess", "end_to_end"):
        assert report["latency_ms"][stage]["count"] == LIMIT
    assert report["latency_ms"]["postprocess"]["p95"] == 4.0
    assert report["outputs"]["annotated"] == [f"annotated/{sample.ids[i]}.png" for i in (0, 5)]
    assert all((out / p).is_file() for p in report["outputs"]["annotated"])
    # /detections: headers are the image headers, boxes the result files' boxes
    with bag.BagReader(getattr(sample, variant)) as reader:
        images = [f.image for f in bag.read_kitti_frames(reader)]
    with bag.BagReader(out / "detections") as reader:
        messages = list(reader.messages([bag.DETECTIONS_TOPIC]))
    assert len(messages) == LIMIT
    for image, item, frame_id in zip(images, messages, sample.ids, strict=True):
        assert m.message_to_dict(item.msg.header) == m.message_to_dict(image.header)
        assert item.log_ns == m.stamp_ns(image.header)
        for det in item.msg.detections:
            assert m.message_to_dict(det.header) == m.message_to_dict(image.header)
        objects = kitti.read_label_file(out / "results" / f"{frame_id}.txt")
        got = m.msg_to_detections(item.msg)
        np.testing.assert_allclose(got.boxes, [o.bbox for o in objects], atol=0.006)
        assert [o.type for o in objects] == ["Car"] * len(objects)


def test_bags_evaluate_bag_matches_replay_and_reports_missing(sample, tmp_path) -> None:
    detector = OracleDetector(sample.layout, sample.ids)
    out = tmp_path / "out"
    report = replay.replay(sample.raw, detector, out, annotate_frames=0, progress=False)
    # A live recording: log times differ from header stamps, one frame dropped, one stray
    # message, one duplicate. Matching by header stamp must recover the frames.
    recorded = tmp_path / "recorded"
    classes = m.rosbags_classes()
    with bag.BagReader(out / "detections") as reader:
        items = list(reader.messages([bag.DETECTIONS_TOPIC]))
    with bag.BagWriter(recorded, classes=classes) as writer:
        for i, item in enumerate(items):
            if i == 2:
                continue  # dropped by the node
            writer.write(bag.DETECTIONS_TOPIC, item.msg, 1_764_000_000_000_000_000 + i * 97)
        writer.write(bag.DETECTIONS_TOPIC, items[0].msg, 1_764_000_000_900_000_000)  # duplicate
        stray = m.detections_to_msg(
            SimpleNamespace(boxes=np.zeros((0, 4)), scores=[], class_names=[]),
            m.header_msg(999, "camera", classes),
            classes,
        )
        writer.write(bag.DETECTIONS_TOPIC, stray, 1_764_000_001_000_000_000)
    result, bag_report, per_frame = evaluate_bag.evaluate_bags(sample.raw, recorded)
    assert bag_report["frames"] == LIMIT and bag_report["messages"] == LIMIT + 1
    assert bag_report["frames_without_detections_message"] == [
        {"frame": sample.ids[2], "stamp_ns": bag.frame_stamp_ns(2)}
    ]
    assert (bag_report["messages_without_frame"], bag_report["duplicate_messages"]) == (1, 1)
    assert per_frame[sample.ids[2]] == []
    assert result.to_json() == bag_report["evaluation"]
    # expected: the replay's results with frame 2 emptied, against the label files
    gt = {i: kitti.read_label_file(sample.layout.label(i)) for i in sample.ids}
    dt = {i: kitti.read_label_file(out / "results" / f"{i}.txt") for i in sample.ids}
    dt[sample.ids[2]] = []
    assert bag_report["evaluation"] == evaluate(gt, dt).to_json()
    assert bag_report["evaluation"] != report["evaluation"]  # the dropped frame costs recall


def test_bags_evaluate_bag_cli(sample, tmp_path, cli) -> None:
    detector = OracleDetector(sample.layout, sample.ids)
    out = tmp_path / "out"
    report = replay.replay(sample.png, detector, out, annotate_frames=0, progress=False)
    result = cli(
        "evaluate-bag",
        "--ground-truth",
        str(sample.png),
        "--detections",
        str(out / "detections"),
        "--out",
        str(tmp_path / "eval"),
    )
    assert "frames without a detections message: 0" in result.stdout
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["evaluation"] == report["evaluation"]
    assert sorted(p.stem for p in (tmp_path / "eval" / "results").iterdir()) == sample.ids
    bad = cli("evaluate-bag", "--ground-truth", str(out / "detections"), "--detections",
              str(out / "detections"), check=False)  # fmt: skip
    assert bad.returncode == 1 and "no topic /kitti/labels" in bad.stderr
    assert "examples:" in cli("evaluate-bag", "--help").stdout
    assert "examples:" in cli("replay", "--help").stdout


def test_bags_replay_counts_unsupported_encodings(sample, tmp_path) -> None:
    """A frame in an encoding the pipeline cannot decode is counted, the rest still runs."""
    classes = m.rosbags_classes()
    mixed = tmp_path / "mixed"
    with bag.BagReader(sample.raw) as reader:
        frames = list(bag.read_kitti_frames(reader))[:3]
    with bag.BagWriter(mixed, classes=classes) as writer:
        for frame in frames:
            image = frame.image
            if frame.index == 1:
                image.encoding = "16UC1"
            writer.write(bag.IMAGE_TOPIC, image, frame.stamp_ns)
            writer.write(bag.LABELS_TOPIC, m.string_msg(frame.labels, classes), frame.stamp_ns)
            writer.write(bag.FRAME_ID_TOPIC, m.string_msg(frame.kitti_id, classes), frame.stamp_ns)
    detector = OracleDetector(sample.layout, sample.ids)
    report = replay.replay(mixed, detector, tmp_path / "out", annotate_frames=0, progress=False)
    frames_report = report["frames"]
    assert (frames_report["total"], frames_report["processed"], frames_report["failed"]) == (
        3,
        2,
        1,
    )
    assert frames_report["failed_by_reason"] == {"unsupported encoding '16UC1'": 1}
    results = tmp_path / "out" / "results"
    assert sorted(p.stem for p in results.iterdir()) == sample.ids[:3]
    assert (results / f"{sample.ids[1]}.txt").read_text() == ""  # failed: no detections
    assert (results / f"{sample.ids[0]}.txt").read_text() != ""
    with bag.BagReader(tmp_path / "out" / "detections") as reader:
        assert reader.message_count(bag.DETECTIONS_TOPIC) == 2  # none for the failed frame
    labels = _label_dir_subset(SimpleNamespace(ids=sample.ids[:3], layout=sample.layout), tmp_path)
    from_files = evaluate_folders(labels, results)
    assert report["evaluation"] == json.loads(json.dumps(from_files.to_json()))
    with pytest.raises(bag.BagError, match="exists already"):
        replay.replay(mixed, detector, tmp_path / "out", progress=False)


def test_bags_replay_errors(sample, tmp_path) -> None:
    detector = OracleDetector(sample.layout, sample.ids)
    with pytest.raises(bag.BagError, match="nothing: no such bag"):
        replay.replay(tmp_path / "nothing", detector, tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()
    labels_only = tmp_path / "labels_only"
    classes = m.rosbags_classes()
    with bag.BagWriter(labels_only, classes=classes) as writer:
        writer.write(bag.LABELS_TOPIC, m.string_msg("", classes), 1)
    with pytest.raises(bag.BagError, match=rf"{labels_only}: none of the topics"):
        replay.replay(labels_only, detector, tmp_path / "o2", progress=False)
    with pytest.raises(bag.BagError, match="no topic /camera/image_raw"):
        replay.replay(
            sample.raw, detector, tmp_path / "o3", image_topic="/camera/image_raw", progress=False
        )


def test_bags_replay_plain_camera_bag_without_ground_truth(sample, tmp_path) -> None:
    """A bag from any camera: one image topic, no KITTI topics -> detections, no AP."""
    classes = m.rosbags_classes()
    camera = tmp_path / "camera"
    with bag.BagReader(sample.raw) as reader:
        frames = list(bag.read_kitti_frames(reader))[:2]
    with bag.BagWriter(camera, classes=classes) as writer:
        for i, frame in enumerate(frames):
            rgb = m.image_msg_to_rgb(frame.image)
            header = m.header_msg(1_700_000_000_000_000_000 + i * 33_000_000, "cam0", classes)
            msg = m.rgb_to_image_msg(rgb, header, classes, "bgra8", step=rgb.shape[1] * 4 + 64)
            writer.write("/camera/image_raw", msg, m.stamp_ns(header) + 5_000_000)
    detector = OracleDetector(sample.layout, sample.ids)
    out = tmp_path / "out"
    report = replay.replay(camera, detector, out, image_topic="/camera/image_raw", progress=False)
    assert detector.calls == ["bgra8", "bgra8"]
    assert report["evaluation"] is None and report["frames"]["with_ground_truth"] == 0
    assert sorted(p.name for p in (out / "results").iterdir()) == ["000000.txt", "000001.txt"]
    with bag.BagReader(out / "detections") as reader:
        items = list(reader.messages([bag.DETECTIONS_TOPIC]))
    assert [i.msg.header.frame_id for i in items] == ["cam0", "cam0"]
    assert [m.stamp_ns(i.msg.header) for i in items] == [
        1_700_000_000_000_000_000,
        1_700_000_000_033_000_000,
    ]
    assert "KITTI AP" not in (out / "report.md").read_text()
