"""The detector node's frame bookkeeping and its diagnostic reports, safe across threads.

:class:`NodeStatistics` counts every frame once in the node's :class:`FrameStats` and, with
several cameras, once more in its camera's; it remembers the batch sizes the worker ran and the
frames that arrived while the node was disabled. :meth:`NodeStatistics.report` and
:meth:`NodeStatistics.camera_reports` turn that, the parameters and the planner's state into the
``detector`` status and one ``camera`` status per camera (docs/node.md, "Topics").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from dds_perception.ros.diagnostics import (
    CAMERA_TASK,
    DIAGNOSTIC_TASK,
    OK,
    Counters,
    DiagnosticReport,
    FrameStats,
    FrameSummary,
    RollingStats,
    assess,
)
from dds_perception.ros.params import DetectorParams


def level(params: DetectorParams, summary: FrameSummary, problem: str) -> tuple[int, str]:
    """OK while disabled (saying so), else :func:`assess` against the latency budget."""
    if not params.enable:
        return OK, "disabled (enable is false): not subscribed to images, no inference"
    return assess(summary, params.latency_budget_ms, problem)


class NodeStatistics:
    """Frame counters and latency windows of the node and of each of its cameras.

    With one camera (``image_topics`` empty) the node's statistics are that camera's and no
    camera report is made. A frame from a topic the parameters do not list gets statistics of
    its own when it first arrives.
    """

    def __init__(self, params: DetectorParams) -> None:
        self._lock = threading.Lock()
        self._window = params.stats_window
        self._node = FrameStats(self._window)  # every camera's frames together
        self._cameras = {
            camera.key: FrameStats(self._window)
            for camera in (params.cameras if params.image_topics else ())
        }
        self._batch_sizes = RollingStats(self._window)
        self.frames_ignored = 0  # frames that arrived while disabled (before unsubscribing)

    @property
    def several_cameras(self) -> bool:
        return bool(self._cameras)

    @property
    def counters(self) -> Counters:
        """The node's frames received, processed, dropped and failed (a live ``Counters``)."""
        return self._node.counters

    @property
    def last_error(self) -> str:
        return self._node.last_error

    def _streams(self, source: str) -> tuple[FrameStats, ...]:
        """The statistics a frame of ``source`` counts in. Call under the lock."""
        if not self._cameras:
            return (self._node,)
        camera = self._cameras.get(source)
        if camera is None:
            camera = self._cameras[source] = FrameStats(self._window)
        return (self._node, camera)

    # ------------------------------------------------------------------ events
    def received(self, source: str, now: float) -> None:
        with self._lock:
            for stats in self._streams(source):
                stats.received(now)

    def dropped(self, source: str) -> None:
        with self._lock:
            for stats in self._streams(source):
                stats.dropped()

    def ignored(self) -> None:
        with self._lock:
            self.frames_ignored += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self._batch_sizes.add(size)

    def processed(
        self, source: str, timings: Mapping[str, float], age_ms: float, now: float
    ) -> None:
        with self._lock:
            for stats in self._streams(source):
                stats.processed(timings, age_ms, now)

    def failed(self, source: str, reason: str) -> int:
        """Count a failed frame; the node's number of failed frames so far."""
        with self._lock:
            for stats in self._streams(source):
                stats.failed(reason)
            return self._node.counters.failed

    # ------------------------------------------------------------------ reports
    def report(
        self, params: DetectorParams, planner: Any, device: str, now: float
    ) -> DiagnosticReport:
        """The ``detector`` status: every camera's frames together.

        ERROR while a frame of the recent window failed, WARN when the window's p95 end-to-end
        latency exceeds ``latency_budget_ms`` or when distances are asked for
        (``camera_height`` > 0) but no usable CameraInfo arrived, OK otherwise (and while
        disabled, saying so). Latencies in ms.
        """
        with self._lock:
            summary = self._node.summary(now)
            ignored = self.frames_ignored
            processed = {key: s.counters.processed for key, s in self._cameras.items()}
            batches = self._batch_sizes.summary()
        cameras = [
            (camera.key, camera.camera_info_topic, processed.get(camera.key, 0))
            for camera in params.cameras
        ]
        if not self._cameras:  # one camera: its frames are the node's
            cameras = [(cameras[0][0], cameras[0][1], summary.counters.processed)]
        planning, problem = planner.values(params, cameras)
        values = [
            *summary.values(),
            ("device", device),
            ("latency_budget_ms", f"{params.latency_budget_ms:.1f}"),
            ("last_error", summary.last_error),
            ("enabled", "true" if params.enable else "false"),
            ("frames_ignored_disabled", str(ignored)),
            *planning,
        ]
        if self._cameras:
            values += [
                ("cameras", str(len(params.cameras))),
                ("batch_size_mean", f"{batches.mean:.2f}" if batches else "nan"),
                ("batch_size_max", f"{batches.max:.0f}" if batches else "nan"),
            ]
        return DiagnosticReport(DIAGNOSTIC_TASK, *level(params, summary, problem), device, values)

    def camera_reports(
        self, params: DetectorParams, planner: Any, device: str, now: float
    ) -> list[DiagnosticReport]:
        """One ``camera`` status per camera when there are several (none with one camera): its
        frames, rates and latencies, its CameraInfo and its tracks."""
        if not self._cameras:
            return []
        reports = []
        for camera in params.cameras:
            with self._lock:
                summary = self._streams(camera.key)[1].summary(now)
            info, usable = planner.camera_state(camera.key, camera.camera_info_topic)
            active, lost, issued = planner.tracks(camera.key)
            problem = ""
            if params.camera_height > 0 and not usable and summary.counters.processed:
                problem = f"no usable CameraInfo on {camera.camera_info_topic}"
            values = [
                ("image_topic", camera.subscribed_topic),
                ("detections_topic", camera.detections_topic),
                *summary.values(),
                ("last_error", summary.last_error),
                ("camera_info", info),
                ("tracks_active", str(active)),
                ("tracks_lost", str(lost)),
                ("track_ids_issued", str(issued)),
            ]
            name = f"{CAMERA_TASK} {camera.image_topic}"
            reports.append(
                DiagnosticReport(name, *level(params, summary, problem), device, values)
            )
        return reports
