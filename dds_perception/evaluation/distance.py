"""How far off is the ground-plane distance? KITTI labels carry each car's true 3-D location.

Two measurements on a KITTI object folder (``training/image_2``, ``label_2``, ``calib``):

- :func:`label_distance_errors`: pure geometry on the labels' own 2-D boxes (what the estimate
  can do with a perfect detector);
- :func:`detection_distance_errors`: a detector's boxes, each matched to a labelled car by IoU
  (>= 0.5, greedy by IoU), then the same estimate.

The label's ``location`` is the bottom centre of the car's 3-D box in the rectified reference
camera frame; it is moved into camera 2's frame (the images' camera; ``P2``'s translation, a few
centimetres) before comparing. :func:`summarize` gives the median and 90th percentile of the
relative error ``|z_est - z| / z`` (and of the ground distance ``hypot(x, z)``) for the cars
within a distance, and counts the cars whose distance was omitted, by reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dds_perception.data.kitti import image_size, read_calib_p2, read_label_file
from dds_perception.detection import ground_plane
from dds_perception.detection.tracking import box_iou, greedy_match

MATCH_IOU = 0.5


@dataclass(frozen=True)
class DistanceRow:
    """One labelled car: its true and estimated position (camera 2 frame, metres)."""

    frame: str
    x_true: float
    z_true: float
    x_est: float  # NaN when omitted
    z_est: float
    reason: str  # "" = estimated; else a ground_plane reason
    occluded: int
    truncated: float
    score: float = float("nan")  # the matched detection's score (detector rows)

    @property
    def rel_error_z(self) -> float:
        return abs(self.z_est - self.z_true) / self.z_true

    @property
    def rel_error_ground(self) -> float:
        true = math.hypot(self.x_true, self.z_true)
        return abs(math.hypot(self.x_est, self.z_est) - true) / true


def _frames(root: Path) -> list[str]:
    folder = Path(root) / "training" / "label_2"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no KITTI labels (expected ROOT/training/label_2)")
    return sorted(p.stem for p in folder.glob("*.txt"))


def _camera(root: Path, frame: str) -> tuple[ground_plane.Intrinsics, np.ndarray]:
    training = Path(root) / "training"
    p2 = read_calib_p2(training / "calib" / f"{frame}.txt")
    width, height = image_size(training / "image_2" / f"{frame}.png")
    return ground_plane.Intrinsics.from_k(p2[:, :3], width, height), p2


def _cars(root: Path, frame: str, p2: np.ndarray) -> list[tuple[Any, float, float]]:
    """(label, x, z) of every Car, its location moved into camera 2's frame."""
    fx = p2[0, 0]
    shift_x, shift_z = p2[0, 3] / fx, p2[2, 3]  # camera 2's offset from the reference camera
    labels = read_label_file(Path(root) / "training" / "label_2" / f"{frame}.txt")
    return [
        (obj, obj.location[0] + shift_x, obj.location[2] + shift_z)
        for obj in labels
        if obj.type == "Car" and obj.location[2] > 0
    ]


def _plane(camera_height: float, pitch: float, center_offset: float) -> ground_plane.GroundPlane:
    return ground_plane.GroundPlane(
        camera_height=camera_height, pitch=pitch, center_offset=center_offset
    )


def label_distance_errors(
    root: str | Path,
    *,
    camera_height: float = ground_plane.KITTI_CAMERA_HEIGHT,
    pitch: float = 0.0,
    center_offset: float = ground_plane.GroundPlane.center_offset,
) -> list[DistanceRow]:
    """The estimate from every labelled car's own 2-D box, against its 3-D location."""
    rows = []
    plane = _plane(camera_height, pitch, center_offset)
    for frame in _frames(Path(root)):
        camera, p2 = _camera(Path(root), frame)
        cars = _cars(Path(root), frame, p2)
        if not cars:
            continue
        est = ground_plane.estimate(
            [obj.bbox for obj, _x, _z in cars], camera, plane, (camera.height, camera.width)
        )
        for (obj, x, z), pos, reason in zip(cars, est.positions, est.reasons, strict=True):
            rows.append(
                DistanceRow(frame, x, z, pos[0], pos[2], reason, obj.occluded, obj.truncated)
            )
    return rows


Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def detection_distance_errors(
    root: str | Path,
    detect: Detect,
    *,
    camera_height: float = ground_plane.KITTI_CAMERA_HEIGHT,
    pitch: float = 0.0,
    center_offset: float = ground_plane.GroundPlane.center_offset,
    frames: Iterable[str] | None = None,
) -> tuple[list[DistanceRow], dict[str, int]]:
    """The estimate from a detector's boxes (``detect(rgb) -> (boxes, scores)``), each matched
    to a labelled car by IoU; returns the matched rows and the counts of labelled cars,
    detections and matches."""
    import cv2

    root = Path(root)
    plane = _plane(camera_height, pitch, center_offset)
    rows: list[DistanceRow] = []
    counts = {"frames": 0, "cars": 0, "detections": 0, "matched": 0}
    for frame in frames if frames is not None else _frames(root):
        camera, p2 = _camera(root, frame)
        cars = _cars(root, frame, p2)
        bgr = cv2.imread(str(root / "training" / "image_2" / f"{frame}.png"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"{frame}.png: cannot read the image")
        boxes, scores = detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        counts["frames"] += 1
        counts["cars"] += len(cars)
        counts["detections"] += len(boxes)
        truth = np.array([obj.bbox for obj, _x, _z in cars], dtype=np.float64).reshape(-1, 4)
        pairs = greedy_match(box_iou(truth, boxes), MATCH_IOU)
        if not pairs:
            continue
        counts["matched"] += len(pairs)
        est = ground_plane.estimate(
            boxes[[d for _t, d in pairs]], camera, plane, (camera.height, camera.width)
        )
        for (t, d), pos, reason in zip(pairs, est.positions, est.reasons, strict=True):
            obj, x, z = cars[t]
            rows.append(
                DistanceRow(
                    frame, x, z, pos[0], pos[2], reason, obj.occluded, obj.truncated, scores[d]
                )
            )
    return rows, counts


def summarize(rows: Iterable[DistanceRow], max_distance: float = 40.0) -> dict[str, Any]:
    """Median / 90th percentile of the relative errors of the cars whose true z is at most
    ``max_distance`` m, and the counts of omitted ones by reason."""
    near = [r for r in rows if r.z_true <= max_distance]
    done = [r for r in near if not r.reason]
    omitted: dict[str, int] = {}
    for r in near:
        if r.reason:
            omitted[r.reason] = omitted.get(r.reason, 0) + 1
    result: dict[str, Any] = {
        "max_distance_m": max_distance,
        "cars": len(near),
        "count": len(done),
        "omitted": omitted,
    }
    if not done:
        return {**result, "median": float("nan"), "p90": float("nan")}
    rel_z = np.array([r.rel_error_z for r in done])
    rel_ground = np.array([r.rel_error_ground for r in done])
    signed = np.array([(r.z_est - r.z_true) / r.z_true for r in done])
    abs_z = np.array([abs(r.z_est - r.z_true) for r in done])
    result.update(
        median=float(np.median(rel_z)),
        p90=float(np.percentile(rel_z, 90)),
        median_ground=float(np.median(rel_ground)),
        p90_ground=float(np.percentile(rel_ground, 90)),
        median_signed=float(np.median(signed)),
        median_abs_m=float(np.median(abs_z)),
    )
    return result


def rows_as_dicts(rows: Iterable[DistanceRow]) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN -> None)."""
    out = []
    for row in rows:
        data = asdict(row)
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in data.items()})  # fmt: skip
    return out
