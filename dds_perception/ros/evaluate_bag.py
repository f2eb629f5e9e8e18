"""KITTI AP of a /detections bag recorded live, against the ground truth of a KITTI bag.

For detections recorded on a ROS 2 machine while the KITTI bag played, e.g.
`ros2 launch dds_perception kitti_replay.launch.py bag:=kitti_bag` (or `ros2 bag record
/detections`). Detection messages are matched to frames by header stamp (the node copies the
image's header), so the recording's own timing does not matter. Frames without a detections
message (dropped by the node, or the recording stopped early) are listed and count as frames
without detections; messages whose stamp matches no frame are counted.

examples:
  dds-perception evaluate-bag --ground-truth kitti_bag --detections rosbag2_2026_01_01-12_00_00
  dds-perception evaluate-bag --ground-truth kitti_bag --detections replay_out/detections \\
      --out bag_eval
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dds_perception.data import kitti
from dds_perception.ros import bag
from dds_perception.ros import messages as m
from dds_perception.ros.replay import detections_to_objects, parse_label_text
from dds_perception.utils.io import atomic_open, atomic_path, write_json


@dataclass(frozen=True)
class GroundTruthFrame:
    """One frame of a KITTI bag: its stamp, KITTI id and label records."""

    stamp_ns: int
    name: str
    objects: list[kitti.KittiObject]


def read_ground_truth(reader: bag.BagReader) -> list[GroundTruthFrame]:
    """Frames of a KITTI bag from ``/kitti/labels`` (and ``/kitti/frame_id``), by log time."""
    reader.require(bag.LABELS_TOPIC)
    topics = [bag.LABELS_TOPIC]
    if bag.FRAME_ID_TOPIC in reader.topics:
        topics.append(bag.FRAME_ID_TOPIC)
    parts: dict[int, dict[str, str]] = {}
    for item in reader.messages(topics):
        parts.setdefault(item.log_ns, {})[item.topic] = str(item.msg.data)
    frames = []
    for index, stamp in enumerate(sorted(s for s in parts if bag.LABELS_TOPIC in parts[s])):
        name = parts[stamp].get(bag.FRAME_ID_TOPIC) or f"{index:06d}"
        source = f"{reader.path}:{bag.LABELS_TOPIC}@{stamp}"
        frames.append(
            GroundTruthFrame(stamp, name, parse_label_text(parts[stamp][bag.LABELS_TOPIC], source))
        )
    return frames


@dataclass
class BagMatch:
    """Detections matched to ground-truth frames by stamp, and what did not match."""

    detections: dict[str, list[kitti.KittiObject]] = field(default_factory=dict)
    missing: list[tuple[str, int]] = field(default_factory=list)  # (frame, stamp)
    unmatched_stamps: list[int] = field(default_factory=list)
    duplicates: int = 0
    messages: int = 0


def match_detections(
    reader: bag.BagReader, frames: Sequence[GroundTruthFrame], topic: str
) -> BagMatch:
    """Read ``topic`` (Detection2DArray) and assign each message to the frame of its stamp."""
    by_stamp = {f.stamp_ns: f.name for f in frames}
    result = BagMatch()
    for item in reader.messages([topic]):
        if item.msgtype != "vision_msgs/msg/Detection2DArray":
            raise bag.BagError(f"{reader.path}: topic {topic} holds {item.msgtype}")
        result.messages += 1
        try:
            detections = m.msg_to_detections(item.msg)
        except m.MessageError as error:
            raise bag.BagError(f"{reader.path}: topic {topic}: {error}") from error
        name = by_stamp.get(detections.stamp_ns)
        if name is None:
            result.unmatched_stamps.append(detections.stamp_ns)
            continue
        if name in result.detections:
            result.duplicates += 1  # the later message wins
        result.detections[name] = detections_to_objects(detections)
    result.missing = [(f.name, f.stamp_ns) for f in frames if f.name not in result.detections]
    return result


def evaluate_bags(
    ground_truth_bag: str | os.PathLike[str],
    detections_bag: str | os.PathLike[str],
    *,
    topic: str = bag.DETECTIONS_TOPIC,
    classes: Sequence[str] = ("Car",),
) -> tuple[Any, dict[str, Any], dict[str, list[kitti.KittiObject]]]:
    """AP of the detections bag against the ground-truth bag.

    Returns the evaluator's result, the report (JSON-ready) and the detections per frame (an
    empty list for a frame without a message).
    """
    from dds_perception.evaluation.kitti import evaluate

    with bag.BagReader(ground_truth_bag) as reader:
        frames = read_ground_truth(reader)
    if not frames:
        raise bag.BagError(f"{ground_truth_bag}: no frames on {bag.LABELS_TOPIC}")
    with bag.BagReader(detections_bag) as reader:
        match = match_detections(reader, frames, topic)
    gt = {f.name: f.objects for f in frames}
    result = evaluate(gt, match.detections, classes=classes)
    report = {
        "ground_truth_bag": str(ground_truth_bag),
        "detections_bag": str(detections_bag),
        "topic": topic,
        "frames": len(frames),
        "messages": match.messages,
        "matched_frames": len(match.detections),
        "frames_without_detections_message": [
            {"frame": name, "stamp_ns": stamp} for name, stamp in match.missing
        ],
        "messages_without_frame": len(match.unmatched_stamps),
        "duplicate_messages": match.duplicates,
        "evaluation": result.to_json(),
    }
    per_frame = {f.name: match.detections.get(f.name, []) for f in frames}
    return result, report, per_frame


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ground-truth", type=Path, required=True, help="KITTI bag (kitti2bag)")
    parser.add_argument("--detections", type=Path, required=True, help="bag with /detections")
    parser.add_argument("--topic", default=bag.DETECTIONS_TOPIC, help="detections topic")
    parser.add_argument("--classes", nargs="+", default=["Car"], help="classes to evaluate")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and results/")


def run(args: argparse.Namespace) -> int:
    result, report, per_frame = evaluate_bags(
        args.ground_truth, args.detections, topic=args.topic, classes=args.classes
    )
    missing = report["frames_without_detections_message"]
    names = ", ".join(x["frame"] for x in missing[:10]) + (" ..." if len(missing) > 10 else "")
    lines = [
        f"{report['frames']} frames, {report['messages']} messages on {args.topic}, "
        f"{report['matched_frames']} frames matched by header stamp",
        f"frames without a detections message: {len(missing)}"
        + (f" ({names})" if missing else ""),
        f"messages matching no frame: {report['messages_without_frame']}; "
        f"duplicates: {report['duplicate_messages']}",
        "",
        result.markdown().rstrip(),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "report.json", report)
        with atomic_open(args.out / "report.md", "w", encoding="utf-8") as handle:
            handle.write(text)
        with atomic_path(args.out / "results") as results:
            results.mkdir()
            for name, objects in per_frame.items():
                kitti.write_label_file(results / f"{name}.txt", objects)
    return 0
