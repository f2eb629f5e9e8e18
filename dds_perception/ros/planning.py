"""What planners get from the node, per camera: track ids and ground-plane positions (issue 19).

:class:`Planner` keeps one :class:`~dds_perception.detection.tracking.ByteTracker` and one camera
model (from sensor_msgs/CameraInfo) per camera, keyed by the camera's image topic, and turns one
frame's detections into the ``ids``, ``positions`` and ``covariances`` keyword arguments of
:func:`dds_perception.ros.messages.detections_to_msg`. Distances that cannot be estimated are
counted by reason, never raised. Thread-safe: the worker plans while runtimes deliver CameraInfo
and diagnostics read the counts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dds_perception.ros.diagnostics import stamp_seconds
from dds_perception.ros.params import DetectorParams


def tracker_config(params: DetectorParams) -> Any:
    """The tracker thresholds the parameters describe (``track_high_threshold``, buffer)."""
    from dds_perception.detection.tracking import TrackerConfig

    high = params.track_high_threshold
    return TrackerConfig(
        high_threshold=high,
        low_threshold=min(0.1, high),
        new_track_threshold=min(1.0, high + 0.1),
        track_buffer=params.track_buffer,
    )


class Planner:
    """Trackers and camera models per camera, and the distance outcomes of every frame."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._lock = threading.Lock()  # trackers
        self._camera_lock = threading.Lock()  # camera models, counts
        self._trackers: dict[str, Any] = {}
        self._cameras: dict[str, Any] = {}  # source -> Intrinsics
        self._camera_errors: dict[str, str] = {}  # source -> why its CameraInfo is unusable
        self.camera_info_received = 0
        self.distance_counts: dict[str, int] = {}

    def submit_camera_info(self, msg: Any, source: str) -> None:
        """Take ``source``'s camera model from a sensor_msgs/CameraInfo; an unusable one (zero
        focal length, K not 3x3, ...) is kept as the reason why that camera's boxes get no
        distance (logged once per new problem), never raised."""
        from dds_perception.detection.ground_plane import CameraModelError, Intrinsics

        try:
            intrinsics, problem = Intrinsics.from_camera_info(msg), ""
        except (CameraModelError, AttributeError, TypeError, ValueError) as error:
            intrinsics, problem = None, f"{type(error).__name__}: {error}"
        with self._camera_lock:
            self.camera_info_received += 1
            known_problem = self._camera_errors.get(source)
            if intrinsics is None:
                self._cameras.pop(source, None)
                self._camera_errors[source] = problem
            else:
                self._cameras[source] = intrinsics
                self._camera_errors.pop(source, None)
        if problem and problem != known_problem:
            self.logger.warning(f"CameraInfo for {source} unusable, no distances: {problem}")

    def plan(
        self, detections: Any, image_size: tuple[int, int], header: Any, source: str,
        params: DetectorParams,
    ) -> dict[str, Any]:  # fmt: skip
        """Track ids and ground-plane positions of one frame's detections (keyword arguments
        of ``messages.detections_to_msg``)."""
        from dds_perception.detection import ground_plane, tracking

        boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
        extras: dict[str, Any] = {}
        with self._lock:
            if params.tracking:
                tracker = self._trackers.get(source)
                config = tracker_config(params)
                if tracker is None:
                    tracker = self._trackers[source] = tracking.ByteTracker(config)
                tracker.config = config
                scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
                extras["ids"] = tracking.format_ids(
                    tracker.update(boxes, scores, stamp_seconds(header))
                )
            elif source in self._trackers:  # tracking switched off: start afresh when back
                self._trackers[source].reset()
        with self._camera_lock:
            intrinsics = self._cameras.get(source)
            bad_info = source in self._camera_errors
        if bad_info:
            estimates = ground_plane.GroundEstimates.omitted(
                len(boxes), ground_plane.BAD_CAMERA_INFO
            )
        else:
            plane = ground_plane.GroundPlane(
                camera_height=params.camera_height,
                pitch=params.camera_pitch,
                center_offset=params.distance_offset,
            )
            estimates = ground_plane.estimate(boxes, intrinsics, plane, image_size)
        counts: dict[str, int] = {}
        for reason in estimates.reasons:
            key = reason or "estimated"
            counts[key] = counts.get(key, 0) + 1
        with self._camera_lock:
            for key, value in counts.items():
                self.distance_counts[key] = self.distance_counts.get(key, 0) + value
        if len(boxes):
            extras["positions"] = estimates.positions
            extras["covariances"] = ground_plane.pose_covariances(estimates.covariances)
        return extras

    def reset_tracks(self) -> None:
        """Forget every camera's tracks (ids keep counting: never reused while the node runs)."""
        with self._lock:
            for tracker in self._trackers.values():
                tracker.reset()

    def camera_state(self, source: str, topic: str) -> tuple[str, bool]:
        """The ``camera_info`` diagnostic text of ``source`` (its CameraInfo ``topic``) and
        whether a usable camera model is known."""
        with self._camera_lock:
            intrinsics = self._cameras.get(source)
            error = self._camera_errors.get(source, "")
        if intrinsics is not None:
            text = (
                f"ok: {intrinsics.width}x{intrinsics.height}, fx {intrinsics.fx:.1f}, "
                f"fy {intrinsics.fy:.1f}"
            )
        elif error:
            text = f"invalid: {error}"
        else:
            text = f"none received on {topic}"
        return text, intrinsics is not None

    def tracks(self, source: str | None = None) -> tuple[int, int, int]:
        """(tracked, lost, ids issued) of ``source``'s tracker, or of every camera's (None)."""
        with self._lock:
            trackers = [
                tracker
                for key, tracker in self._trackers.items()
                if source is None or key == source
            ]
            return (
                sum(t.num_tracked for t in trackers),
                sum(t.num_lost for t in trackers),
                sum(t.next_id - 1 for t in trackers),
            )

    def values(
        self, params: DetectorParams, cameras: Sequence[tuple[str, str, int]]
    ) -> tuple[list[tuple[str, str]], str]:
        """Diagnostic key/values of tracking and distance, and a problem to warn about ("").

        ``cameras``: (key, CameraInfo topic, frames processed) of each camera; with one, the
        ``camera_info`` value describes its model, with several it counts the usable ones.
        """
        from dds_perception.detection.ground_plane import REASONS

        active, lost, issued = self.tracks()
        states = [(topic, *self.camera_state(key, topic), done) for key, topic, done in cameras]
        if len(states) == 1:
            camera = states[0][1]
        else:
            camera = f"{sum(usable for _, _, usable, _ in states)} of {len(states)} cameras ok"
        with self._camera_lock:
            received = self.camera_info_received
            counts = dict(self.distance_counts)
        missing = [topic for topic, _, usable, done in states if not usable and done]
        problem = ""
        if params.camera_height > 0 and missing:
            problem = (
                f"no usable CameraInfo on {', '.join(missing)}: cars published without distance"
            )
        values = [
            ("tracking", "on" if params.tracking else "off"),
            ("tracks_active", str(active)),
            ("tracks_lost", str(lost)),
            ("track_ids_issued", str(issued)),
            ("camera_info", camera),
            ("camera_info_received", str(received)),
            ("camera_height_m", f"{params.camera_height:.3f}"),
            ("distance_estimated", str(counts.get("estimated", 0))),
            *((f"distance_omitted_{reason}", str(counts.get(reason, 0))) for reason in REASONS),
        ]
        return values, problem
