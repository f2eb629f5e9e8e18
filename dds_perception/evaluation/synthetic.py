"""Generated KITTI-format ground truth and detections for timing and cross-checking the evaluator.

Only label and result files (no images): KITTI-like class mix, truncation, occlusion and box
sizes, detections as jittered ground truth (some duplicated, some missed) plus background false
positives, all rounded to the precision of the file format so files and memory agree.

    python -m dds_perception.evaluation.synthetic OUT_DIR [--frames 3769] [--seed 0] [--clutter 0]

writes ``OUT_DIR/label_2`` and ``OUT_DIR/results`` (one ``NNNNNN.txt`` per frame).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from dds_perception.data.kitti import KittiObject
from dds_perception.utils.io import atomic_path

IMAGE_W, IMAGE_H = 1242.0, 375.0
# class, probability, width / height
_CLASS_MIX = (
    ("Car", 0.55, 1.7),
    ("Van", 0.06, 1.3),
    ("Truck", 0.02, 1.2),
    ("Pedestrian", 0.09, 0.4),
    ("Person_sitting", 0.01, 0.7),
    ("Cyclist", 0.04, 0.8),
    ("DontCare", 0.20, 1.5),
    ("Misc", 0.03, 1.0),
)
_DETECTED_AS = {"Car": "Car", "Van": "Car", "Pedestrian": "Pedestrian",
                "Person_sitting": "Pedestrian", "Cyclist": "Cyclist"}  # fmt: skip


def generate(
    n_frames: int = 3769, seed: int = 0, objects_per_frame: float = 4.0, clutter: int = 0
) -> tuple[dict[str, list[KittiObject]], dict[str, list[KittiObject]]]:
    """Return ``(ground_truth, detections)`` keyed by 6-digit frame id.

    ``clutter`` adds that many low-score Car detections per frame, half of them loosely around
    ground truth (like a detector's output before a score threshold), to time the worst case.
    """
    rng = np.random.default_rng(seed)
    names = [c[0] for c in _CLASS_MIX]
    probs = np.array([c[1] for c in _CLASS_MIX])
    aspect = {c[0]: c[2] for c in _CLASS_MIX}
    gt: dict[str, list[KittiObject]] = {}
    dt: dict[str, list[KittiObject]] = {}
    for frame in range(n_frames):
        frame_id = f"{frame:06d}"
        labels, dets = [], []
        for _ in range(rng.poisson(objects_per_frame)):
            cls = names[rng.choice(len(names), p=probs)]
            h = float(np.clip(rng.lognormal(np.log(45.0), 0.6), 12.0, 300.0))
            w = h * aspect[cls] * rng.uniform(0.8, 1.2)
            x1 = rng.uniform(-0.1 * w, IMAGE_W - 0.9 * w)
            y1 = rng.uniform(120.0, max(121.0, IMAGE_H - h))
            box = _clip_round((x1, y1, x1 + w, y1 + h))
            if cls == "DontCare":
                labels.append(KittiObject(cls, -1.0, -1, -10.0, box))
                continue
            truncated = round(float(rng.choice([0.0, rng.uniform(0.0, 0.9)], p=[0.7, 0.3])), 2)
            occluded = int(rng.choice(4, p=[0.5, 0.25, 0.2, 0.05]))
            alpha = round(float(rng.uniform(-np.pi, np.pi)), 2)
            labels.append(KittiObject(cls, truncated, occluded, alpha, box))
            detected_as = _DETECTED_AS.get(cls)
            if detected_as is None or rng.random() > 0.85:
                continue
            for copy in range(1 + int(rng.random() < 0.1)):  # occasional duplicate
                quality = rng.uniform(0.0, 0.12) * (1 + copy)
                jitter = rng.normal(0.0, quality, 4) * np.array([w, h, w, h])
                score = float(np.clip(0.95 - 4 * quality + rng.normal(0, 0.1), 0.01, 1.0))
                dets.append(_det(detected_as, np.array(box) + jitter, score))
        for _ in range(rng.poisson(2.0)):  # background false positives
            h = float(np.clip(rng.lognormal(np.log(40.0), 0.5), 15.0, 200.0))
            w = h * rng.uniform(0.4, 2.0)
            x1 = rng.uniform(0.0, IMAGE_W - w)
            y1 = rng.uniform(100.0, max(101.0, IMAGE_H - h))
            cls = str(rng.choice(["Car", "Car", "Pedestrian", "Cyclist"]))
            dets.append(_det(cls, np.array((x1, y1, x1 + w, y1 + h)), rng.uniform(0.01, 0.6)))
        for k in range(clutter):
            if labels and k % 2 == 0:
                x1, y1, x2, y2 = labels[rng.integers(len(labels))].bbox
                w, h = x2 - x1, y2 - y1
                box = np.array((x1, y1, x2, y2)) + rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
            else:
                x1, y1 = rng.uniform(0.0, IMAGE_W - 80.0), rng.uniform(100.0, IMAGE_H - 50.0)
                box = np.array((x1, y1, x1 + 80.0, y1 + 50.0))
            dets.append(_det("Car", box, rng.uniform(0.0, 0.5)))
        gt[frame_id] = labels
        dt[frame_id] = dets
    return gt, dt


def _clip_round(box) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    x1, x2 = max(0.0, x1), min(IMAGE_W - 1, x2)
    y1, y2 = max(0.0, y1), min(IMAGE_H - 1, y2)
    return (round(x1, 2), round(y1, 2), round(max(x2, x1 + 1), 2), round(max(y2, y1 + 1), 2))


def _det(cls: str, box: np.ndarray, score: float) -> KittiObject:
    return KittiObject(cls, -1.0, -1, -10.0, _clip_round(box), score=round(float(score), 6))


def write_set(
    out_dir: str | os.PathLike[str],
    gt: dict[str, list[KittiObject]],
    dt: dict[str, list[KittiObject]],
) -> None:
    """Write ``out_dir/label_2`` and ``out_dir/results`` atomically (each folder as a whole)."""
    for sub, records in (("label_2", gt), ("results", dt)):
        with atomic_path(Path(out_dir) / sub) as tmp:
            tmp.mkdir()
            for frame_id, objects in records.items():
                text = "".join(obj.to_line() + "\n" for obj in objects)
                (tmp / f"{frame_id}.txt").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir")
    parser.add_argument("--frames", type=int, default=3769)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clutter", type=int, default=0, help="extra low-score dets per frame")
    args = parser.parse_args(argv)
    gt, dt = generate(args.frames, args.seed, clutter=args.clutter)
    write_set(args.out_dir, gt, dt)
    n_gt = sum(len(v) for v in gt.values())
    n_dt = sum(len(v) for v in dt.values())
    print(f"{args.out_dir}: {len(gt)} frames, {n_gt} ground-truth boxes, {n_dt} detections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
