"""How far off are the node's ground-plane distances? KITTI frames with labelled 3-D locations.

Reports the median and 90th-percentile relative error |z_est - z| / z of the cars within
--max-distance (default 40 m), as the node computes it (camera_height, camera_pitch,
distance_offset; K from each frame's calib P2, as kitti2bag writes camera_info):
  labels    the labels' own 2-D boxes (the geometry alone: a perfect detector);
  detector  with --weights (this project's detector) or --teacher (a NanoDet ONNX, its "car"
            class): its boxes scoring >= --score-threshold, each matched to a labelled car by
            IoU >= 0.5.
Cars whose box touches the image bottom (truncated) get no distance and are counted apart.

examples:
  dds-perception distance-eval --kitti-root ../shared/data/kitti_sample
  dds-perception distance-eval --kitti-root ../shared/data/kitti_sample \\
      --teacher ../shared/data/teachers/nanodet_m.onnx --json /tmp/distance.json
  dds-perception distance-eval --kitti-root ../shared/data/kitti_sample \\
      --weights models/dds_detector_kitti.safetensors --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dds_perception.detection.ground_plane import KITTI_CAMERA_HEIGHT, GroundPlane
from dds_perception.evaluation import distance
from dds_perception.utils.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kitti-root", type=Path, required=True, help="KITTI object folder (training/...)"
    )
    parser.add_argument("--weights", type=Path, help="this project's detector weights")
    parser.add_argument("--teacher", type=Path, help="a NanoDet-style ONNX detector instead")
    parser.add_argument("--device", default="cpu", help="device for --weights (default cpu)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, help="detector boxes kept (default 0.3)"
    )
    parser.add_argument(
        "--camera-height",
        type=float,
        default=KITTI_CAMERA_HEIGHT,
        help=f"metres above the road (default KITTI's {KITTI_CAMERA_HEIGHT})",
    )
    parser.add_argument("--pitch", type=float, default=0.0, help="camera pitch, rad (default 0)")
    parser.add_argument(
        "--offset",
        type=float,
        default=GroundPlane.center_offset,
        help=f"distance_offset, m (default {GroundPlane.center_offset})",
    )
    parser.add_argument(
        "--max-distance", type=float, default=40.0, help="cars up to this z, m (default 40)"
    )
    parser.add_argument("--json", type=Path, help="write the summaries and every row here")


def _detector(args: argparse.Namespace) -> tuple[distance.Detect | None, str]:
    """``detect(rgb) -> (boxes, scores)`` of the chosen detector, and its name."""
    if args.weights and args.teacher:
        raise UsageError("--weights and --teacher: choose one detector")
    threshold = float(args.score_threshold)
    if args.weights:
        from dds_perception.pipeline import Pipeline

        pipeline = Pipeline.from_weights(
            args.weights, device=args.device, score_threshold=threshold
        )

        def detect(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            found = pipeline(rgb)
            return np.asarray(found.boxes), np.asarray(found.scores)

        return detect, str(args.weights)
    if args.teacher:
        from dds_perception.data.teacher import OnnxTeacher

        teacher = OnnxTeacher(args.teacher, score_floor=min(threshold, 0.05))
        cars = {i for i, name in enumerate(teacher.class_names) if name == "car"}
        if not cars:
            raise UsageError(f"--teacher {args.teacher}: the model has no 'car' class")

        def detect(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            boxes = [b for b in teacher.detect(rgb) if b.class_index in cars]
            kept = [b for b in boxes if b.score >= threshold]
            return (
                np.array([b.box for b in kept], dtype=np.float64).reshape(-1, 4),
                np.array([b.score for b in kept], dtype=np.float64),
            )

        return detect, str(args.teacher)
    return None, ""


def _line(name: str, summary: dict[str, Any]) -> str:
    if not summary["count"]:
        return f"{name}: no car within {summary['max_distance_m']:.0f} m got a distance"
    omitted = ", ".join(f"{k} {v}" for k, v in sorted(summary["omitted"].items())) or "none"
    return (
        f"{name}: {summary['count']} cars within {summary['max_distance_m']:.0f} m: "
        f"median relative error {100 * summary['median']:.1f} %, "
        f"90th percentile {100 * summary['p90']:.1f} % "
        f"(ground distance {100 * summary['median_ground']:.1f} % / "
        f"{100 * summary['p90_ground']:.1f} %; median signed {100 * summary['median_signed']:+.1f}"
        f" %, median |error| {summary['median_abs_m']:.2f} m); omitted: {omitted}"
    )


def run(args: argparse.Namespace) -> int:
    root = args.kitti_root
    settings = {
        "camera_height": args.camera_height,
        "pitch": args.pitch,
        "center_offset": args.offset,
    }
    report: dict[str, Any] = {"kitti_root": str(root), **settings}
    rows = distance.label_distance_errors(root, **settings)
    labels = distance.summarize(rows, args.max_distance)
    clear = distance.summarize([r for r in rows if r.occluded == 0], args.max_distance)
    print(_line("labels (all cars)", labels))
    print(_line("labels (not occluded)", clear))
    report["labels"] = {"all": labels, "not_occluded": clear}
    report["label_rows"] = distance.rows_as_dicts(rows)
    detect, name = _detector(args)
    if detect is not None:
        det_rows, counts = distance.detection_distance_errors(root, detect, **settings)
        summary = distance.summarize(det_rows, args.max_distance)
        print(
            f"detector {name}: {counts['matched']} of {counts['cars']} labelled cars matched "
            f"(IoU >= {distance.MATCH_IOU}) by {counts['detections']} boxes in "
            f"{counts['frames']} frames"
        )
        print(_line("detector (matched cars)", summary))
        report["detector"] = {"name": name, "counts": counts, "summary": summary}
        report["detector_rows"] = distance.rows_as_dicts(det_rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
