"""Replay a ROS 2 bag through the detector in-process and report KITTI AP and latency.

Reads the bag in order (deterministic, unlike `ros2 bag play`), runs every image through the
inference pipeline and writes into OUT:
  detections/             a bag with /detections (vision_msgs/Detection2DArray; every header
                          equals its image's header, log time = header stamp)
  results/NNNNNN.txt      KITTI result files, named by the bag's /kitti/frame_id (empty for a
                          frame without detections or that failed to decode)
  report.json, report.md  AP (when the bag has /kitti/labels), latency per stage (mean, p50,
                          p95, max in ms) and frame counts; failed frames (e.g. an unsupported
                          encoding) are counted, not fatal
  annotated/NNNNNN.png    a few frames with detections (green) and ground-truth cars (blue)

examples:
  dds-perception kitti2bag ../shared/data/kitti_sample sample_bag
  dds-perception replay sample_bag --weights models/dds_detector_kitti.safetensors --out replay_out
  dds-perception replay camera_bag --image-topic /camera/image_raw/compressed --out live_eval
  dds-perception replay sample_bag --weights model.onnx --backend onnxruntime --out replay_onnx
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from dds_perception.data import kitti
from dds_perception.data.images import ImageDecodeError
from dds_perception.ros import bag
from dds_perception.ros import messages as m
from dds_perception.utils.io import atomic_open, atomic_path, write_json

STAGES = ("decode", "preprocess", "inference", "postprocess")
DEFAULT_ANNOTATE = 4
_KITTI_NAMES = {c.lower(): c for c in kitti.CLASSES}


def kitti_class(name: str) -> str:
    """KITTI's spelling of a class name (``car`` -> ``Car``); unknown names stay as they are."""
    return _KITTI_NAMES.get(str(name).lower(), str(name))


def detections_to_objects(detections: Any) -> list[kitti.KittiObject]:
    """Pipeline (or message) detections as KITTI result records."""
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    return [
        kitti.detection_to_object(box, score, kitti_class(name))
        for box, score, name in zip(boxes, scores, detections.class_names, strict=True)
    ]


def parse_label_text(text: str, source: str) -> list[kitti.KittiObject]:
    """Label records of a label file's text (as carried on ``/kitti/labels``)."""
    return [
        kitti.parse_line(line, source=source, lineno=lineno)
        for lineno, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p95 and max of milliseconds (None when there are none)."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "count": int(arr.size),
    }


def run_pipeline(pipeline: Any, msg: Any) -> Any:
    """Call the pipeline on an Image's raw buffer or a CompressedImage's bytes (it decodes)."""
    data, encoding, keywords = m.pipeline_args(msg)
    return pipeline(data, encoding, **keywords)


def evaluation_classes(class_names: Iterable[str]) -> tuple[str, ...]:
    """The detector's classes the KITTI devkit evaluates (``Car`` when none is)."""
    from dds_perception.evaluation.kitti import EVAL_CLASSES

    wanted = {kitti_class(n) for n in class_names}
    found = tuple(c for c in EVAL_CLASSES if c in wanted)
    return found or ("Car",)


def annotate(
    rgb: np.ndarray,
    detections: Sequence[kitti.KittiObject],
    ground_truth: Sequence[kitti.KittiObject] = (),
) -> np.ndarray:
    """BGR image with ground-truth cars (blue) and detections with scores (green)."""
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for obj in ground_truth:
        if obj.type in ("Car", "Van"):
            x1, y1, x2, y2 = (round(v) for v in obj.bbox)
            cv2.rectangle(image, (x1, y1), (x2, y2), (255, 80, 0), 1)
    for obj in detections:
        x1, y1, x2, y2 = (round(v) for v in obj.bbox)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 220, 0), 2)
        cv2.putText(
            image,
            f"{obj.type} {obj.score:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (0, 220, 0),
            1,
            cv2.LINE_AA,
        )
    return image


def _write_image(path: Path, bgr: np.ndarray) -> None:
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"{path}: cannot write image")


def replay(
    bag_path: str | os.PathLike[str],
    pipeline: Any,
    out_dir: str | os.PathLike[str],
    *,
    image_topic: str | None = None,
    annotate_frames: int = DEFAULT_ANNOTATE,
    storage: str = "mcap",
    weights: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every image of ``bag_path`` through ``pipeline``; write OUT (see module doc).

    ``pipeline`` is the inference pipeline (or anything with its call signature and
    ``class_names``). Returns the report that is also written to ``report.json``.
    """
    from dds_perception.evaluation.kitti import evaluate

    out = Path(out_dir)
    for name in ("detections", "results", "annotated"):
        target = out / name
        if target.exists():
            raise bag.BagError(f"{target}: exists already; choose a new --out folder")
    classes = m.rosbags_classes()
    timings: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "end_to_end")}
    failures: Counter[str] = Counter()
    gt: dict[str, list[kitti.KittiObject]] = {}
    dt: dict[str, list[kitti.KittiObject]] = {}
    annotated: list[str] = []
    counts = {"total": 0, "processed": 0, "failed": 0, "with_ground_truth": 0, "detections": 0}

    with bag.BagReader(bag_path) as reader:
        topic = image_topic or reader.first_topic(bag.IMAGE_TOPIC, bag.COMPRESSED_TOPIC)
        reader.require(topic)
        total = reader.message_count(topic)
        out.mkdir(parents=True, exist_ok=True)
        picks = set(
            np.linspace(0, max(0, total - 1), min(annotate_frames, total)).round().astype(int)
        )
        with (
            bag.BagWriter(out / "detections", storage=storage, classes=classes) as writer,
            atomic_path(out / "results") as results_dir,
            atomic_path(out / "annotated") as annotated_dir,
        ):
            results_dir.mkdir()
            annotated_dir.mkdir()
            frames = bag.read_kitti_frames(
                reader, topic, optional=(bag.LABELS_TOPIC, bag.FRAME_ID_TOPIC)
            )
            for frame in tqdm(frames, total=total, desc="replay", disable=not progress):
                counts["total"] += 1
                name = frame.name
                if name in dt or name in gt:
                    raise bag.BagError(f"{reader.path}: frame id {name} appears twice")
                if frame.labels is not None:
                    gt[name] = parse_label_text(frame.labels, f"{reader.path}:{name}")
                    counts["with_ground_truth"] += 1
                start = time.perf_counter()
                try:
                    detections = run_pipeline(pipeline, frame.image)
                except ImageDecodeError as error:
                    counts["failed"] += 1
                    failures[_failure_reason(frame.image, error)] += 1
                    # an empty result file: the folder evaluates like the report (no detections)
                    dt[name] = []
                    kitti.write_label_file(results_dir / f"{name}.txt", [])
                    continue
                end_to_end = (time.perf_counter() - start) * 1000.0
                counts["processed"] += 1
                for stage in STAGES:
                    if stage in detections.timings:
                        timings[stage].append(float(detections.timings[stage]))
                timings["end_to_end"].append(end_to_end)
                msg = m.detections_to_msg(detections, frame.image.header, classes)
                writer.write(bag.DETECTIONS_TOPIC, msg, frame.stamp_ns)
                objects = detections_to_objects(detections)
                counts["detections"] += len(objects)
                dt[name] = objects
                kitti.write_label_file(results_dir / f"{name}.txt", objects)
                if frame.index in picks:
                    image = annotate(m.image_msg_to_rgb(frame.image), objects, gt.get(name, ()))
                    _write_image(annotated_dir / f"{name}.png", image)
                    annotated.append(f"annotated/{name}.png")
            if counts["total"] == 0:
                raise bag.BagError(f"{reader.path}: no messages on {topic}")

    evaluation = None
    eval_md = ""
    if gt:
        eval_classes = evaluation_classes(getattr(pipeline, "class_names", ("Car",)))
        result = evaluate(gt, {k: v for k, v in dt.items() if k in gt}, classes=eval_classes)
        evaluation = result.to_json()
        eval_md = result.markdown()
    report = {
        "bag": str(Path(bag_path)),
        "image_topic": topic,
        "weights": weights,
        "device": str(getattr(pipeline, "device", "")),
        "frames": {**counts, "failed_by_reason": dict(sorted(failures.items()))},
        "latency_ms": {stage: latency_summary(v) for stage, v in timings.items()},
        "evaluation": evaluation,
        "outputs": {
            "detections_bag": "detections",
            "results": "results",
            "annotated": annotated,
        },
    }
    write_json(out / "report.json", report)
    with atomic_open(out / "report.md", "w", encoding="utf-8") as handle:
        handle.write(report_markdown(report, eval_md))
    return report


def _failure_reason(msg: Any, error: Exception) -> str:
    text = str(error)
    if "unsupported" in text:
        encoding = msg.format if m.is_compressed(msg) else msg.encoding
        return f"unsupported encoding {encoding!r}"
    return text.split(":")[0]


def report_markdown(report: Mapping[str, Any], evaluation_md: str = "") -> str:
    """Human-readable form of a replay report: frames, latency table, AP table."""
    frames = report["frames"]
    lines = [
        f"# Replay of {report['bag']} ({report['image_topic']})",
        "",
        f"weights: {report.get('weights')}  device: {report.get('device')}",
        "",
        f"frames: {frames['total']} read, {frames['processed']} processed, "
        f"{frames['failed']} failed, {frames['with_ground_truth']} with ground truth, "
        f"{frames['detections']} detections",
    ]
    for reason, count in frames.get("failed_by_reason", {}).items():
        lines.append(f"- failed: {count} x {reason}")
    lines += [
        "",
        "| stage | mean ms | p50 ms | p95 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for stage, s in report["latency_ms"].items():
        if s["count"]:
            lines.append(
                f"| {stage} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['max']:.2f} |"
            )
    if evaluation_md:
        lines += ["", "## KITTI AP (percent)", "", evaluation_md.rstrip()]
    return "\n".join(lines) + "\n"


def bag_demo(
    kitti_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    pipeline: Any,
    *,
    weights: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """KITTI folder -> bag -> replay, for ``make demo``: returns the replay report.

    ``out_dir`` (replaced when it exists) receives ``kitti_bag/`` and ``replay/``.
    """
    import shutil

    from dds_perception.ros.kitti2bag import convert

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    convert(kitti_root, out / "kitti_bag", progress=progress)
    return replay(out / "kitti_bag", pipeline, out / "replay", weights=weights, progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", type=Path, help="ROS 2 bag (e.g. from kitti2bag)")
    parser.add_argument("--weights", help="weights file (default: the shipped weights)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 inference (CUDA)")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime", "tensorrt"),
        help="network backend (a .safetensors file is exported to ONNX once; or an .onnx file)",
    )
    parser.add_argument("--score-threshold", type=float, help="override the checkpoint's")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="network input size (default: the checkpoint's)",
    )
    parser.add_argument(
        "--image-topic", help=f"default: {bag.IMAGE_TOPIC}, else {bag.COMPRESSED_TOPIC}"
    )
    parser.add_argument(
        "--annotate", type=int, default=DEFAULT_ANNOTATE, help="annotated frames to save"
    )
    parser.add_argument("--storage", choices=bag.STORAGES, default="mcap")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dds_perception.pipeline import Pipeline, default_weights

    with bag.BagReader(args.bag) as reader:  # a bad bag fails before the model loads
        reader.require(
            args.image_topic or reader.first_topic(bag.IMAGE_TOPIC, bag.COMPRESSED_TOPIC)
        )
    weights = args.weights or str(default_weights())
    pipeline = Pipeline.from_weights(
        weights,
        device=args.device,
        half=args.half,
        backend=args.backend,
        score_threshold=args.score_threshold,
        input_size=tuple(args.input_size) if args.input_size else None,
    )
    report = replay(
        args.bag,
        pipeline,
        args.out,
        image_topic=args.image_topic,
        annotate_frames=args.annotate,
        storage=args.storage,
        weights=weights,
        progress=not args.quiet,
    )
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"), end="")
    processed = report["frames"]["processed"]
    print(f"wrote {args.out}/report.json, results/, detections/ ({processed} frames)")
    return 0
