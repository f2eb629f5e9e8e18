"""What the node adds per frame for planners: the tracker and the ground-plane distance.

Times :meth:`dds_perception.ros.planning.Planner.plan` -- the tracker update, the distance
estimate with its covariance, the id strings -- exactly as the node runs it after inference, on
a scripted KITTI-sized clip of ``cars`` cars moving with pixel noise (no network, no image), and
its two halves apart. The issue-19 budget: <= 0.5 ms per frame with 20 cars on the CPU.

  dds-perception bench --sections planning --out /tmp/bench_planning
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BUDGET_MS = 0.5
FRAME = (375, 1242)  # (height, width)
K = (721.5377, 0.0, 609.5593, 0.0, 721.5377, 172.854, 0.0, 0.0, 1.0)  # KITTI's P2 block


@dataclass
class _Detections:
    boxes: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)


class _NoPipeline:
    """Stands where the pipeline goes: the core only reads and sets its thresholds here."""

    device = "cpu"
    class_names = ("car",)
    score_threshold = nms_iou = max_detections = 0


def scripted_clip(cars: int, frames: int, seed: int = 0) -> list[_Detections]:
    """``frames`` frames of ``cars`` boxes on the road below the horizon, moving a few pixels
    per frame, with 1.5 px noise and scores in [0.3, 1) (some below the high threshold)."""
    rng = np.random.default_rng(seed)
    height, width = FRAME
    bottom = rng.uniform(200.0, height - 10.0, cars)
    size = (bottom - 172.0) * rng.uniform(1.2, 2.2, cars)  # nearer = bigger
    x = rng.uniform(0.0, width - size)
    speed = rng.uniform(-4.0, 4.0, cars)
    scores = rng.uniform(0.3, 1.0, cars)
    clip = []
    for index in range(frames):
        x1 = np.clip(x + speed * index, 0.0, width - size)
        boxes = np.stack([x1, bottom - 0.6 * size, x1 + size, bottom], axis=1)
        boxes = boxes + rng.normal(0.0, 1.5, boxes.shape)
        clip.append(_Detections(boxes, scores.copy(), ["car"] * cars))
    return clip


def measure_planning(cars: int = 20, frames: int = 300, repeats: int = 5) -> dict[str, Any]:
    """Per-frame times in ms (median of ``repeats`` passes over the clip, each pass a fresh
    tracker) of the node's planning stage and of its parts."""
    from dds_perception.detection import ground_plane, tracking
    from dds_perception.ros import core, messages

    classes = messages.rosbags_classes()
    params = core.DetectorParams(device="cpu", camera_height=ground_plane.KITTI_CAMERA_HEIGHT)
    clip = scripted_clip(cars, frames)
    headers = [messages.header_msg(i * 100_000_000, "camera", classes) for i in range(frames)]
    info = messages.camera_info_msg(
        np.hstack([np.reshape(K, (3, 3)), np.zeros((3, 1))]), FRAME[1], FRAME[0], headers[0],
        classes,
    )  # fmt: skip
    intrinsics = ground_plane.Intrinsics.from_camera_info(info)
    plane = ground_plane.GroundPlane(camera_height=params.camera_height)

    def whole() -> None:
        node = core.DetectorCore(_NoPipeline(), params, classes=classes)
        node.submit_camera_info(info)
        for dets, header in zip(clip, headers, strict=True):
            node.planner.plan(dets, FRAME, header, node.default_source, node.params)

    def tracker_only() -> None:
        tracker = tracking.ByteTracker()
        for index, dets in enumerate(clip):
            tracking.format_ids(tracker.update(dets.boxes, dets.scores, index * 0.1))

    def distance_only() -> None:
        for dets in clip:
            est = ground_plane.estimate(dets.boxes, intrinsics, plane, FRAME)
            ground_plane.pose_covariances(est.covariances)

    result: dict[str, Any] = {"cars": cars, "frames": frames, "repeats": repeats}
    parts = (("planning", whole), ("tracker", tracker_only), ("distance", distance_only))
    for name, work in parts:
        work()  # warm-up: imports, first allocations
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            passes.append((time.perf_counter() - start) * 1e3 / frames)
        result[f"{name}_ms_per_frame"] = float(np.median(passes))
        result[f"{name}_ms_min"] = float(min(passes))
    result["budget_ms"] = BUDGET_MS
    result["within_budget"] = result["planning_ms_per_frame"] <= BUDGET_MS
    return result
