"""Track ids on a generated 10 Hz clip: id switches, duplicates and coverage of the node's tracker.

CLIP is a folder written by `dds-perception make-scenes CLIP --sequence` (its scenes.json names
each label's car). Every frame goes through a detector and then the node's tracker (the same
ByteTracker and settings as the node: track_high_threshold, track_buffer), stamped at the clip's
frame rate; the tracker's ids are matched to the labelled cars (IoU >= 0.5) and counted as in
CLEAR MOT (see dds_perception.evaluation.tracking): id switches, fragmentations, duplicate ids in
a frame, ids that named two cars, and the share of labelled boxes that carry an id.

Detector: --weights (default: the shipped synthetic-scene weights, which fit generated clips), or
--truth-boxes: the labelled boxes themselves with seeded misses (--miss-rate), jitter and scores
that drop with occlusion, to see the tracker alone.

examples:
  dds-perception make-scenes /tmp/clip --sequence --frames 100 --seed 0
  dds-perception track-eval /tmp/clip --device cpu
  dds-perception track-eval /tmp/clip --truth-boxes --miss-rate 0.2 --json /tmp/tracks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dds_perception.data.kitti import read_label_file
from dds_perception.detection.tracking import ByteTracker, format_ids
from dds_perception.evaluation.tracking import FrameTracks, id_metrics
from dds_perception.ros.params import DetectorParams
from dds_perception.utils.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("clip", type=Path, metavar="CLIP", help="make-scenes --sequence folder")
    parser.add_argument("--weights", type=Path, help="detector (default: synthetic weights)")
    parser.add_argument("--device", default="cpu", help="device for the detector (default cpu)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, help="detector boxes kept (default 0.3)"
    )
    parser.add_argument(
        "--truth-boxes", action="store_true", help="the labelled boxes instead of a detector"
    )
    parser.add_argument(
        "--miss-rate", type=float, default=0.1, help="with --truth-boxes: boxes dropped (0.1)"
    )
    parser.add_argument(
        "--track-high-threshold", type=float, default=0.5, help="as the node's (default 0.5)"
    )
    parser.add_argument("--track-buffer", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--json", type=Path, help="write the counts and per-frame ids here")


def read_clip(clip: Path) -> tuple[float, list[tuple[Path, list[Any], list[int]]]]:
    """(fps, [(image, car labels, their track ids)]) of a make-scenes --sequence folder."""
    meta_path = clip / "scenes.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        sequence = meta["sequence"]
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"{clip}: not a make-scenes --sequence folder (no sequence in scenes.json)"
        ) from error
    frames = []
    for name in sorted(sequence["track_ids"]):
        labels = read_label_file(clip / "training" / "label_2" / f"{name}.txt")
        ids = sequence["track_ids"][name]
        cars = [(o, i) for o, i in zip(labels, ids, strict=True) if o.type == "Car"]
        frames.append(
            (
                clip / "training" / "image_2" / f"{name}.png",
                [o for o, _ in cars],
                [i for _, i in cars],
            )
        )
    return float(sequence["fps"]), frames


def _detector(args: argparse.Namespace) -> Any:
    from dds_perception.pipeline import SYNTHETIC_WEIGHTS, Pipeline, default_weights

    weights = args.weights or default_weights(SYNTHETIC_WEIGHTS)
    pipeline = Pipeline.from_weights(
        weights, device=args.device, score_threshold=args.score_threshold
    )

    def detect(path: Path, _labels: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        found = pipeline(rgb)
        return np.asarray(found.boxes), np.asarray(found.scores)

    return detect, str(weights)


def _truth_detector(miss_rate: float, seed: int = 0) -> Any:
    """The labelled boxes as a detector would give them: each dropped with ``miss_rate``,
    jittered by 1.5 px, scored lower the more the car is hidden or cut (as detectors do)."""
    rng = np.random.default_rng(seed)

    def detect(_path: Path, labels: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.array([o.bbox for o in labels], dtype=np.float64).reshape(-1, 4)
        hidden = np.array([0.25 * max(o.occluded, 0) + 0.4 * o.truncated for o in labels])
        scores = np.clip(0.95 - hidden + rng.normal(0.0, 0.05, len(labels)), 0.05, 1.0)
        keep = rng.random(len(boxes)) >= miss_rate
        boxes = boxes[keep] + rng.normal(0.0, 1.5, (int(keep.sum()), 4))
        return boxes, scores[keep]

    return detect


def evaluate_clip(
    clip: Path, detect: Any, params: DetectorParams
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``detect(image_path, labels) -> (boxes, scores)`` and the node's tracker over the
    clip; return the id metrics and per-frame records."""
    fps, frames = read_clip(clip)
    high = params.track_high_threshold
    from dds_perception.detection.tracking import TrackerConfig

    tracker = ByteTracker(
        TrackerConfig(
            high_threshold=high,
            low_threshold=min(0.1, high),
            new_track_threshold=min(1.0, high + 0.1),
            track_buffer=params.track_buffer,
        )
    )
    records, tracks = [], []
    for index, (path, labels, car_ids) in enumerate(frames):
        boxes, scores = detect(path, labels)
        ids = format_ids(tracker.update(boxes, scores, index / fps))
        truth = np.array([o.bbox for o in labels], dtype=np.float64).reshape(-1, 4)
        tracks.append(FrameTracks(truth, car_ids, boxes, ids))
        records.append({"frame": path.stem, "cars": car_ids, "ids": ids})
    return id_metrics(tracks), records


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.miss_rate < 1.0:
        raise UsageError(f"--miss-rate {args.miss_rate}: must lie in [0, 1)")
    params = DetectorParams(
        track_high_threshold=args.track_high_threshold, track_buffer=args.track_buffer
    )
    read_clip(args.clip)  # a wrong folder fails before the model loads
    if args.truth_boxes:
        detect, name = _truth_detector(args.miss_rate), f"labelled boxes, {args.miss_rate} missed"
    else:
        detect, name = _detector(args)
    metrics, records = evaluate_clip(args.clip, detect, params)
    print(
        f"{args.clip} ({name}): {metrics['frames']} frames, {metrics['cars']} cars, "
        f"{metrics['truth_boxes']} labelled boxes, {metrics['matched']} matched, "
        f"{100 * metrics['coverage']:.1f} % with an id"
    )
    print(
        f"id switches {metrics['id_switches']}, fragmentations {metrics['fragmentations']}, "
        f"ids on two cars {metrics['ids_on_two_cars']}, duplicate ids in a frame "
        f"{metrics['duplicates']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"detector": name, "metrics": metrics, "frames": records}, indent=1),
            encoding="utf-8",
        )
        print(f"wrote {args.json}")
    return 0
