"""The main job end to end: detect cars on real KITTI frames with the shipped weights, report AP.

Steps: take the four real KITTI frames shipped in ``samples/kitti`` (never used to train the
shipped real-data detector; ``$KITTI_ROOT`` or ``--kitti-root`` for others), or with
``--generated`` write generated KITTI-format scenes (PNG + label_2 + calib, seeds unseen in
training; detected by the synthetic-scene model); run every frame's PNG bytes through the inference
pipeline (decode, letterbox, detector, NMS, back to source pixels), write KITTI result files, score
them with the KITTI evaluator (easy / moderate / hard, AP_11 and AP_40), and draw a few annotated
frames (ground truth green, Van/DontCare grey, detections red with their score).

Then the same frames live, over real middleware (unless --no-live): the frames become a ROS 2
bag (kitti2bag), and the node (`dds-perception node`), a player (`play --lockstep`) and a
recorder (`record`) run as separate processes on an isolated Cyclone DDS domain on loopback; the
recorded /detections are scored against the bag's ground truth by header stamp (evaluate-bag),
and the node's latency (its /diagnostics) and annotated frames (its ~/debug_image) are read from
the recording. Both APs are printed; they agree when the node saw every frame (the node runs the
same --backend).

With KITTI_ROOT set (or --kitti-root), the first --frames of that folder's training/ are used.

Outputs under --out: scenes/ (the generated KITTI folder, with --generated), results/ (one
NNNNNN.txt per frame), ap.json and ap.md, latency.json, frames/NNNNNN.png, bag/ (the scenes as a
ROS 2 bag, replayed in-process: bag/replay/report.json with the same AP; skip with --no-bag), and
live/: kitti_bag/, recorded/ (the bag of /detections, /diagnostics, debug images), report.json,
node/play/record logs, frames/live_NNNNNN.png (skip with --no-live).

examples:
  dds-perception demo
  KITTI_ROOT=/data/kitti dds-perception demo --frames 100
  dds-perception demo --generated --no-live --no-bag --frames 10
  dds-perception demo --generated --out /tmp/demo --frames 60 --seed 7 --device cpu
  dds-perception demo --weights runs/det_synth/model.safetensors --draw 8
  dds-perception demo --backend onnxruntime --device cpu          # the exported network
  dds-perception demo --device cuda --half --no-live              # fp16 on a GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from dds_perception.data.kitti import (
    KittiLayout,
    detection_to_object,
    read_label_file,
    write_label_file,
)
from dds_perception.data.scenes import generate_kitti_scenes
from dds_perception.evaluation.kitti import evaluate
from dds_perception.pipeline import (
    STAGES,
    SYNTHETIC_WEIGHTS,
    Pipeline,
    default_weights,
    shipped_candidates,
)
from dds_perception.utils.io import atomic_open, write_json

DEMO_SEED = 1000  # the synthetic model was trained on seeds 0 and 1: these scenes are unseen
SAMPLES = "samples/kitti"  # four real KITTI frames the shipped real-data model never saw


def default_samples() -> Path:
    """The shipped real KITTI frames (repository ``samples/kitti`` or the installed share)."""
    candidates = shipped_candidates(SAMPLES)
    for path in candidates:
        if (path / "training" / "image_2").is_dir():
            return path
    raise FileNotFoundError(
        f"shipped KITTI frames not found; looked in: {', '.join(map(str, candidates))}; "
        "pass --kitti-root or --generated"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument(
        "--frames", type=int, default=40, help="frames to detect on (generated, or at most)"
    )
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="scene generator seed")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="default: the shipped real-data model (the synthetic one with --generated)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 inference (CUDA only)")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime", "tensorrt"),
        help="network backend (onnxruntime/tensorrt: the weights are exported once to ONNX, "
        "or pass an exported .onnx as --weights)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.05,
        help="detections kept for the AP (low: AP integrates over the PR curve)",
    )
    parser.add_argument(
        "--draw-threshold", type=float, default=0.5, help="score above which boxes are drawn"
    )
    parser.add_argument("--draw", type=int, default=4, help="number of annotated frames")
    parser.add_argument(
        "--no-bag",
        action="store_true",
        help="skip the ROS 2 bag round (scenes -> bag -> in-process replay -> AP, latency)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--kitti-root",
        type=Path,
        default=os.environ.get("KITTI_ROOT") or None,
        help="real KITTI folder (default: $KITTI_ROOT, else the four shipped frames)",
    )
    source.add_argument(
        "--generated",
        action="store_true",
        help="generated road scenes (make-scenes) instead of real frames",
    )
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="skip the live leg (node, player and recorder processes over Cyclone DDS)",
    )
    parser.add_argument(
        "--reuse-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let glibc keep freed feature maps for reuse in this process (CPU inference: "
        "otherwise each large map is mmap'd and page-faulted in again on every frame)",
    )


def annotate(
    rgb: np.ndarray, ground_truth: list, boxes: np.ndarray, scores: np.ndarray, threshold: float
) -> np.ndarray:
    """A BGR copy of ``rgb`` with ground truth and detections drawn."""
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for obj in ground_truth:
        colour = (0, 200, 0) if obj.type == "Car" else (160, 160, 160)
        x1, y1, x2, y2 = (round(v) for v in obj.bbox)
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, 1)
    for box, score in zip(boxes, scores, strict=True):
        if score < threshold:
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 0, 255), 2)
        cv2.putText(
            image, f"car {score:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
            (0, 0, 255), 1, cv2.LINE_AA,
        )  # fmt: skip
    return image


def run(args: argparse.Namespace) -> int:
    from dds_perception.deploy.runtime import freed_memory_reuse

    # a process-wide allocator setting: the command's choice, never the pipeline's
    with freed_memory_reuse(args.reuse_freed_memory):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    if args.weights:
        weights = Path(args.weights)
    else:
        weights = default_weights(SYNTHETIC_WEIGHTS) if args.generated else default_weights()
    pipeline = Pipeline.from_weights(
        weights, device=args.device, half=args.half, backend=args.backend
    )
    pipeline.score_threshold = args.score_threshold
    print(
        f"weights: {weights} ({pipeline.backend.name} on {pipeline.device}, "
        f"input {pipeline.input_size})"
    )

    if not args.generated:
        scenes = Path(args.kitti_root) if args.kitti_root is not None else default_samples()
        layout = KittiLayout.find(scenes)
        frame_ids = layout.frame_ids()[: args.frames]
        source = f"{len(frame_ids)} real KITTI frames from {scenes}"
        print(source)
    else:
        scenes = out / "scenes"
        generate_kitti_scenes(scenes, args.frames, seed=args.seed, val_fraction=0, overwrite=True)
        layout = KittiLayout.find(scenes)
        frame_ids = layout.frame_ids()
        source = f"{len(frame_ids)} generated scenes (seed {args.seed})"
        print(f"generated {len(frame_ids)} scenes (seed {args.seed}) in {scenes}")

    results = out / "results"
    shutil.rmtree(results, ignore_errors=True)
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    ground_truth, detections, timings = {}, {}, {stage: [] for stage in (*STAGES, "total")}
    for index, frame_id in enumerate(tqdm(frame_ids, desc="detect", dynamic_ncols=True)):
        data = layout.image(frame_id).read_bytes()
        result = pipeline(data, "png")  # the camera's compressed bytes, decoded by the pipeline
        for stage in STAGES:
            timings[stage].append(result.timings[stage])
        timings["total"].append(sum(result.timings.values()))
        objects = [
            detection_to_object(box, score)
            for box, score in zip(result.boxes.tolist(), result.scores.tolist(), strict=True)
        ]
        write_label_file(results / f"{frame_id}.txt", objects)
        ground_truth[frame_id] = read_label_file(layout.label(frame_id))
        detections[frame_id] = objects
        if index < args.draw:
            rgb = cv2.cvtColor(cv2.imread(str(layout.image(frame_id))), cv2.COLOR_BGR2RGB)
            drawn = annotate(
                rgb, ground_truth[frame_id], result.boxes, result.scores, args.draw_threshold
            )
            cv2.imwrite(str(frames_dir / f"{frame_id}.png"), drawn)

    evaluation = evaluate(ground_truth, detections, classes=("Car",))
    table = evaluation.markdown()
    write_json(out / "ap.json", evaluation.to_json())
    with atomic_open(out / "ap.md", "w", encoding="utf-8") as handle:
        handle.write(f"Car AP on {source}\n\n")
        handle.write(table + "\n")
    latency = {
        stage: {
            "mean_ms": float(np.mean(values)),
            "p50_ms": float(np.percentile(values, 50)),
            "p95_ms": float(np.percentile(values, 95)),
        }
        for stage, values in timings.items()
    }
    write_json(out / "latency.json", {"device": str(pipeline.device), "stages": latency})
    print(table)
    print(
        f"paper mAP (mean of easy/moderate/hard Car AP_40): {evaluation.mean_ap('AP_40'):.2f}; "
        f"AP_11: {evaluation.mean_ap('AP_11'):.2f}"
    )
    print(
        "latency per frame (mean ms): "
        + ", ".join(f"{stage} {latency[stage]['mean_ms']:.1f}" for stage in timings)
    )
    print(f"annotated frames: {frames_dir}; results: {results}; AP: {out / 'ap.json'}")
    if not args.no_bag:
        _bag_round(scenes, out / "bag", pipeline, evaluation.to_json(), weights)
    if args.live:
        return live_leg(args, scenes, weights, len(frame_ids), evaluation)
    return 0


def _bag_round(scenes: Path, out: Path, pipeline: Pipeline, file_ap: dict, weights: Path) -> None:
    """The same scenes as a ROS 2 bag, replayed in-process: the AP must not change."""
    from dds_perception.ros.replay import bag_demo

    report = bag_demo(scenes, out, pipeline, weights=str(weights))
    print((out / "replay" / "report.md").read_text(encoding="utf-8"), end="")
    same = report["evaluation"] == file_ap
    print(
        f"bag {out / 'kitti_bag'} replayed: AP {'equals' if same else 'DIFFERS FROM'} the "
        f"label files' AP; report: {out / 'replay' / 'report.json'}"
    )


def live_leg(
    args: argparse.Namespace, root: Path, weights: Path, frames: int, in_process: object
) -> int:
    """The same frames through node, player and recorder processes over Cyclone DDS."""
    from dds_perception.ros.dds import DdsError

    print("\nlive: the same frames as a ROS 2 bag through node, player and recorder processes")
    try:
        from dds_perception.ros.dds.live import run_live

        live = run_live(
            root,
            Path(args.out) / "live",
            weights=weights,
            device=args.device,
            backend=args.backend,
            half=args.half,
            score_threshold=args.score_threshold,
            limit=frames,
            draw=args.draw,
        )
    except DdsError as error:
        print(f"demo: live leg failed: {error}")
        return 1
    report = live.report
    write_json(
        Path(args.out) / "live" / "report.json", {**report, "diagnostics": live.diagnostics}
    )
    print(
        f"{report['frames']} frames played, {report['matched_frames']} answered with the "
        f"image's header, {len(report['frames_without_detections_message'])} without an answer"
    )
    print(live.evaluation.markdown().rstrip())
    same = live.evaluation.to_json() == in_process.to_json()
    print(f"live AP equals the in-process AP: {'yes' if same else 'NO'}")
    d = live.diagnostics
    if d:
        print(
            "node latency (ms, its /diagnostics): end-to-end p50 "
            f"{d.get('end_to_end_ms_p50')} p95 {d.get('end_to_end_ms_p95')}, inference mean "
            f"{d.get('inference_ms_mean')}; frames received {d.get('frames_received')}, "
            f"processed {d.get('frames_processed')}, dropped {d.get('frames_dropped')}, "
            f"failed {d.get('frames_failed')} (device {d.get('device')})"
        )
    drawn = _draw_live_frames(live, Path(args.out) / "live" / "frames", args)
    print(f"live annotated frames (detections >= {args.draw_threshold}): {', '.join(drawn)}")
    print(
        f"the node's own ~/debug_image frames: {live.frames[0].parent if live.frames else 'none'}"
    )
    return 0 if same else 1


def _draw_live_frames(live: object, folder: Path, args: argparse.Namespace) -> list[str]:
    """The first --draw frames of the live bag with ground truth and the recorded detections."""
    from dds_perception.ros import messages
    from dds_perception.ros.bag import BagReader
    from dds_perception.ros.evaluate_bag import read_ground_truth

    folder.mkdir(parents=True, exist_ok=True)
    with BagReader(live.recorded) as reader:
        answers = {
            messages.stamp_ns(m.msg.header): messages.msg_to_detections(m.msg)
            for m in reader.messages(["/detections"])
        }
    written = []
    with BagReader(live.bag) as reader:
        frames = {f.stamp_ns: f for f in read_ground_truth(reader)}
        camera = reader.first_topic(
            "/kitti/camera/image_raw", "/kitti/camera/image_raw/compressed"
        )
        for item in reader.messages([camera]):
            if len(written) >= args.draw:
                break
            stamp = messages.stamp_ns(item.msg.header)
            if stamp not in answers or stamp not in frames:
                continue
            dets = answers[stamp]
            image = annotate(
                messages.image_msg_to_rgb(item.msg),
                frames[stamp].objects,
                dets.boxes,
                dets.scores,
                args.draw_threshold,
            )
            path = folder / f"live_{frames[stamp].name}.png"
            cv2.imwrite(str(path), image)
            written.append(str(path))
    return written
