"""One batch of received frames through the node: decode, detect, plan, publish.

:class:`FrameProcessor` is the detector node's per-frame work, run by the core's worker thread
(:class:`~dds_perception.ros.core.DetectorCore`): each frame is decoded on its own, the decoded
frames go through one pipeline call, then each gets its camera's track ids and distances
(:class:`~dds_perception.ros.planning.Planner`), a Detection2DArray with its own header on its
camera's ports, and, when asked for, an annotated debug image. A frame fails alone: it is
counted and logged (:class:`~dds_perception.ros.error_log.ErrorLog`) and the others go on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dds_perception.ros.diagnostics import stamp_seconds
from dds_perception.ros.drawing import annotate
from dds_perception.ros.error_log import ErrorLog, describe
from dds_perception.ros.node_stats import NodeStatistics
from dds_perception.ros.params import DetectorParams
from dds_perception.ros.planning import Planner
from dds_perception.ros.ports import Ports


@dataclass
class Frame:
    """A received frame waiting for the worker."""

    msg: Any
    received: float  # monotonic seconds
    source: str  # the image topic it came from (trackers and camera models are per camera)


@dataclass
class FrameProcessor:
    """Decode -> pipeline -> planning -> messages -> ports for a batch of frames.

    ``params`` returns the node's current parameters (they change at run time); ``clock`` is
    the runtime's "now" in seconds (ROS time, for the frame's age), ``monotonic`` times the
    stages.
    """

    pipeline: Any
    decoder: Callable[[Any], np.ndarray]
    messages: Any  # the dds_perception.ros.messages module
    classes: Any
    ports: Ports
    planner: Planner
    stats: NodeStatistics
    errors: ErrorLog
    params: Callable[[], DetectorParams]
    clock: Callable[[], float]
    monotonic: Callable[[], float]

    def process_batch(self, frames: Sequence[Frame]) -> list[Any | None]:
        """Each frame's Detection2DArray, None where one failed: a frame fails alone (bad
        input, a bug in its planning or publishing), except when the network call for the
        batch fails, which fails every frame in it."""
        clock = self.monotonic
        outputs: list[Any | None] = [None] * len(frames)
        ready: list[tuple[int, Frame, np.ndarray, float]] = []
        for index, frame in enumerate(frames):
            try:
                t0 = clock()
                rgb = self.decoder(frame.msg)
                ready.append((index, frame, rgb, (clock() - t0) * 1e3))
            except Exception as error:  # a bad frame must never stop the node
                self.record_failure(frame, error)
        if not ready:
            return outputs
        for (index, frame, rgb, decode_ms), found in zip(
            ready, self.detect([rgb for _, _, rgb, _ in ready]), strict=True
        ):
            if isinstance(found, Exception):
                self.record_failure(frame, found)
            else:
                outputs[index] = self.finish(frame, rgb, decode_ms, found)
        return outputs

    def detect(self, rgbs: list[np.ndarray]) -> list[Any]:
        """The pipeline's detections of each frame (or the exception it raised): several frames
        in one ``detect_batch`` call (each letterboxed to the network input on its own)."""
        if len(rgbs) > 1 and hasattr(self.pipeline, "detect_batch"):
            self.stats.batch(len(rgbs))
            try:
                found = list(self.pipeline.detect_batch(rgbs))
                if len(found) != len(rgbs):
                    raise RuntimeError(f"detect_batch gave {len(found)} results for {len(rgbs)}")
                return found
            except Exception as error:  # neither a bad frame nor a bug may stop the node
                return [error] * len(rgbs)
        results: list[Any] = []
        for rgb in rgbs:  # one frame, or a pipeline without batches: one call per frame
            self.stats.batch(1)
            try:
                results.append(self.pipeline(rgb))
            except Exception as error:
                results.append(error)
        return results

    def finish(self, frame: Frame, rgb: np.ndarray, decode_ms: float, detections: Any) -> Any:
        """Planning, message and publication of one detected frame; its statistics."""
        clock, msg, params = self.monotonic, frame.msg, self.params()
        try:
            t1 = clock()
            extras = self.planner.plan(detections, rgb.shape[:2], msg.header, frame.source, params)
            planning_ms = (clock() - t1) * 1e3
            out = self.messages.detections_to_msg(detections, msg.header, self.classes, **extras)
            self.ports.for_camera(frame.source).publish_detections(out)
        except Exception as error:  # neither a bad frame nor a bug may stop the node
            self.record_failure(frame, error)
            return None
        end_ms = (clock() - frame.received) * 1e3
        age_ms = (self.clock() - stamp_seconds(msg.header)) * 1e3
        timings = dict(getattr(detections, "timings", {}) or {})
        timings["decode"] = decode_ms + float(timings.get("decode", 0.0))
        timings["planning"] = planning_ms
        timings["end_to_end"] = end_ms
        self.stats.processed(frame.source, timings, age_ms, clock())
        if params.publish_debug_image:
            self.publish_debug(rgb, detections, msg.header, frame.source)
        return out

    def publish_debug(self, rgb: np.ndarray, detections: Any, header: Any, source: str) -> None:
        """The annotated frame on the camera's ``~/debug_image`` when someone listens."""
        try:
            ports = self.ports.for_camera(source)
            if not ports.debug_image_wanted():
                return
            image = self.messages.rgb_to_image_msg(annotate(rgb, detections), header, self.classes)
            ports.publish_debug_image(image)
        except Exception as error:  # the debug image is optional: never fail the frame for it
            self.errors.report(error, "debug image not published", "debug_image")

    def record_failure(self, frame: Frame, error: Exception) -> None:
        """Count a failed frame; log it (a bad frame in one line, a bug with its traceback the
        first time its type occurs)."""
        failed = self.stats.failed(frame.source, describe(error))
        stamp = ""
        with contextlib.suppress(Exception):  # the header itself may be the broken part
            stamp = f" stamp {stamp_seconds(frame.msg.header):.3f}"
        camera = f" from {frame.source}" if self.stats.several_cameras else ""
        self.errors.report(error, f"frame{stamp}{camera} failed ({failed} so far)", "frame")
