"""The detector node's logic in plain Python, shared by every runtime (rclpy, Cyclone DDS, tests).

The core owns everything a detector node does between "a frame arrived" and "messages go out":
the newest-frame handoff to one worker thread (:mod:`.frame_slot`: frames that arrive while one
is processed replace the pending one and are counted as dropped, never queued), frame counters
and rolling latency statistics (:mod:`.diagnostics`), track ids and distances (:mod:`.planning`),
the debug image (:mod:`.drawing`) and message building through :mod:`dds_perception.ros.messages`.
Its parameters are :class:`~dds_perception.ros.params.DetectorParams` (:mod:`.params`, loaded
from ``config/detector.yaml``). A runtime only moves messages: it hands received frames to
:meth:`DetectorCore.submit` and gives the core its publishing functions (:class:`Ports`), a clock
and a logger. Nothing here imports rclpy.

Example (any runtime)::

    params = load_params(overrides={"device": "cpu"})
    core = DetectorCore(build_pipeline(params), params, classes=classes, ports=ports)
    core.start()            # publishes label_info once, starts the worker
    core.submit(image_msg)  # from the subscription callback; returns at once
    report = core.diagnostics()  # DiagnosticReport: level, message, key/values
    core.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dds_perception.ros.diagnostics import (
    CAMERA_TASK,
    DIAGNOSTIC_TASK,
    OK,
    DiagnosticReport,
    FrameStats,
    RollingStats,
    assess,
    diagnostic_array_msg,
    stamp_seconds,
)
from dds_perception.ros.drawing import annotate
from dds_perception.ros.error_log import ErrorLog, describe
from dds_perception.ros.frame_slot import LatestFrameSlot
from dds_perception.ros.params import (
    NODE_NAME,
    DetectorParams,
    ParameterError,
    parameter_names,
    runtime_parameters,
)
from dds_perception.ros.planning import Planner
from dds_perception.ros.ports import Logger, NullLogger, Ports


def make_header(classes: Any, seconds: float, frame_id: str = "") -> Any:
    """A std_msgs/Header of ``classes`` stamped ``seconds`` (e.g. "now" for label info)."""
    from dds_perception.ros.messages import header_msg

    return header_msg(round(seconds * 1e9), frame_id, classes)


def build_pipeline(params: DetectorParams):
    """Load the inference pipeline the parameters describe; clear errors for bad weights/device.

    Imported lazily so that ``--help`` and the parameter checks do not pay for torch.
    """
    from dds_perception.utils.runtime import resolve_device

    weights = Path(params.weights).expanduser() if params.weights else None
    if weights is not None and not weights.is_file():
        raise ParameterError(f"weights {str(weights)!r}: file not found")
    resolve_device(params.device)  # "cuda:3" on a one-GPU machine fails here, before loading
    from dds_perception import pipeline as pipeline_module

    if weights is None:
        weights = pipeline_module.default_weights()
    return pipeline_module.Pipeline.from_weights(
        weights,
        device=params.device,
        half=params.half,
        backend=params.backend,
        score_threshold=params.score_threshold,
        nms_iou=params.nms_iou,
        max_detections=params.max_detections,
        input_size=params.input_size,
    )


@dataclass
class Frame:
    """A received frame waiting for the worker."""

    msg: Any
    received: float  # monotonic seconds
    source: str  # the image topic it came from (trackers and camera models are per camera)


class DetectorCore:
    """Frame slot + worker + statistics + diagnostics + message building; see the module doc.

    ``pipeline`` follows the inference-pipeline contract (callable on an RGB array, returning
    detections with ``timings``; settable ``score_threshold``/``nms_iou``/``max_detections``).
    ``classes`` is a ``messages.MessageClasses`` bundle (rosbags, rclpy or DDS classes).
    ``decoder`` turns an Image/CompressedImage message into an HxWx3 RGB array (default
    ``messages.image_msg_to_rgb``; the rclpy node passes cv_bridge's when it works).
    ``clock`` gives the runtime's "now" in seconds (ROS time, for the pipeline age);
    ``monotonic`` times the stages.

    Several cameras (``image_topics``): each camera keeps its own newest frame, the worker runs
    the frames that are ready as one batch (``pipeline.detect_batch``) and each frame goes out
    through its camera's ports (``Ports.cameras``) with its own header; statistics are kept per
    camera too (:meth:`camera_diagnostics`).

    For planners (issue 19) each published detection carries a track id and, once the camera's
    CameraInfo arrived (:meth:`submit_camera_info`) and ``camera_height`` is set, the car's
    position from the ground plane (:class:`~dds_perception.ros.planning.Planner`). ``enable``
    false makes the runtime drop its image subscriptions (``Ports.set_image_subscription``),
    drops the pending frames, resets the tracks and releases cached memory; diagnostics go on
    and say so.
    """

    def __init__(
        self,
        pipeline: Any,
        params: DetectorParams,
        *,
        classes: Any,
        ports: Ports | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.perf_counter,
        logger: Logger | None = None,
        decoder: Callable[[Any], np.ndarray] | None = None,
        node_name: str = NODE_NAME,
        failure_log_period: float = 5.0,
    ) -> None:
        from dds_perception.ros import messages

        self._messages = messages
        self.pipeline = pipeline
        self.params = params
        self.classes = classes
        self.ports = ports or Ports()
        self.clock = clock
        self.monotonic = monotonic
        self.logger: Logger = logger or NullLogger()
        self.decoder = decoder or messages.image_msg_to_rgb
        self.node_name = node_name
        self._lock = threading.Lock()
        self._stats = FrameStats(params.stats_window)  # every camera's frames together
        # several cameras: each one's own statistics, and how many frames each batch held
        self._camera_stats = {
            camera.key: FrameStats(params.stats_window)
            for camera in (params.cameras if params.image_topics else ())
        }
        self._batch_sizes = RollingStats(params.stats_window)
        self._slot = LatestFrameSlot()  # the newest pending frame of each camera
        self._thread: threading.Thread | None = None
        # bad frames in one line, bugs with their traceback; throttled per place
        self._errors = ErrorLog(
            self.logger.warning, self.logger.error, period=failure_log_period, monotonic=monotonic
        )
        self.planner = Planner(self.logger)
        self.frames_ignored = 0  # frames that arrived while disabled (before unsubscribing)
        self._release_pending = False
        self._apply_runtime(params)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Publish the label info once, start the worker thread, and have the runtime subscribe
        to images when ``enable`` is true."""
        self.publish_label_info()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="dds_detector_worker", daemon=True
            )
            self._thread.start()
        self.ports.set_image_subscription(self.params.enable)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (the frame in work finishes first)."""
        self._slot.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no frame is pending or in work (tests, shutdown); False on timeout."""
        return self._slot.wait_idle(timeout)

    @property
    def counters(self) -> Any:
        """Frames received, processed, dropped and failed (a live ``Counters``)."""
        return self._stats.counters

    @property
    def last_error(self) -> str:
        return self._stats.last_error

    @property
    def device(self) -> str:
        return str(getattr(self.pipeline, "device", self.params.device))

    @property
    def enabled(self) -> bool:
        return self.params.enable

    @property
    def default_source(self) -> str:
        """The key of the node's (first) camera: its subscribed image topic."""
        return self.params.cameras[0].key

    def _stats_for(self, source: str) -> tuple[FrameStats, ...]:
        """The statistics a frame of ``source`` counts in (the node's, and its camera's when
        there are several cameras). Call under the lock."""
        if not self._camera_stats:
            return (self._stats,)
        camera = self._camera_stats.get(source)
        if camera is None:  # a topic the parameters do not list: counted on its own
            camera = self._camera_stats[source] = FrameStats(self.params.stats_window)
        return (self._stats, camera)

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.pipeline, "class_names", ["car"]))

    # ------------------------------------------------------------------ parameters
    def _apply_runtime(self, params: DetectorParams) -> None:
        self.pipeline.score_threshold = params.score_threshold
        self.pipeline.nms_iou = params.nms_iou
        self.pipeline.max_detections = params.max_detections

    def update_params(self, **changes: Any) -> DetectorParams:
        """Apply run-time changes (thresholds, budget, debug image); ParameterError otherwise.

        Parameters that need a restart (weights, device, topics, ...) are refused unless their
        value is unchanged; nothing is applied when any change is refused.
        """
        changes = {  # ROS gives string arrays as lists
            name: tuple(value) if isinstance(value, list) else value
            for name, value in changes.items()
        }
        fixed = sorted(
            name
            for name, value in changes.items()
            if name not in runtime_parameters()
            and name in parameter_names()
            and value != getattr(self.params, name)
        )
        if fixed:
            raise ParameterError(
                f"{', '.join(fixed)}: cannot change while running (restart the node); "
                f"run-time parameters: {', '.join(sorted(runtime_parameters()))}"
            )
        params = self.params.replace(**changes)
        with self._lock:
            was_enabled = self.params.enable
            self.params = params
            self._apply_runtime(params)
        if params.enable != was_enabled:
            self._switch(params.enable)
        return params

    def set_enabled(self, enabled: bool) -> tuple[bool, str]:
        """The ``~/enable`` service (std_srvs/SetBool): (success, message)."""
        try:
            self.update_params(enable=bool(enabled))
        except ParameterError as error:
            return False, str(error)
        if enabled:
            return True, f"enabled: subscribed to {', '.join(self.params.subscribed_topics)}"
        return True, "disabled: not subscribed to images, no inference"

    def _switch(self, enabled: bool) -> None:
        """Subscribe/unsubscribe the camera; when disabling, also drop the pending frame, forget
        the tracks (a car seen after the pause is a new observation) and free cached memory."""
        self.ports.set_image_subscription(enabled)
        if enabled:
            topics = ", ".join(self.params.subscribed_topics)
            self.logger.info(f"enabled: subscribed to {topics}")
            return
        dropped = self._slot.discard()
        with self._lock:
            for frame in dropped:
                for stats in self._stats_for(frame.source):
                    stats.dropped()
        self.planner.reset_tracks()
        if self._slot.wait_idle(0):
            released = self._release_memory()
        else:  # a frame is in inference: the worker releases after it
            self._release_pending, released = True, []
        self.logger.info(
            "disabled: unsubscribed from images"
            + (f"; released {', '.join(released)}" if released else "")
        )

    def _release_memory(self) -> list[str]:
        self._release_pending = False
        try:
            from dds_perception.utils.runtime import release_cached_memory

            return release_cached_memory(self.device)
        except Exception as error:  # freeing memory is best effort
            self._errors.report(error, "cached memory not released", "release")
            return []

    # ------------------------------------------------------------------ frames
    def submit(self, msg: Any, source: str | None = None) -> None:
        """Hand over a received Image/CompressedImage; returns at once (subscription callback).

        ``source``: the camera's subscribed image topic (default: the first camera's). A frame
        replaces the same camera's pending one (counted as dropped), never another camera's.
        While disabled, frames still in flight are ignored (counted as
        ``frames_ignored_disabled``).
        """
        now = self.monotonic()
        if not self.params.enable:
            with self._lock:
                self.frames_ignored += 1
            return
        source = source or self.default_source
        with self._lock:
            for stats in self._stats_for(source):
                stats.received(now)
        if self._slot.put(Frame(msg, now, source), key=source):
            with self._lock:
                for stats in self._stats_for(source):
                    stats.dropped()

    def submit_camera_info(self, msg: Any, source: str | None = None) -> None:
        """Take the camera model of ``source``'s images (default: the subscribed topic) from a
        sensor_msgs/CameraInfo; an unusable one is kept as the reason why that camera's boxes
        get no distance, never raised."""
        self.planner.submit_camera_info(msg, source or self.default_source)

    def _run(self) -> None:
        while True:
            frames = self._slot.take_all()  # the newest frame of every camera that sent one
            if not frames:
                return
            try:
                self.process_batch(frames)
                if self._release_pending and not self.params.enable:
                    self._release_memory()
            except Exception as error:  # process_batch records its own: the worker must live
                self._errors.report(error, "worker", "worker")
            finally:
                self._slot.done()

    def process(
        self, msg: Any, *, received: float | None = None, source: str | None = None
    ) -> Any | None:
        """Run one frame through decode -> pipeline -> tracker and distance -> messages -> ports.

        Returns the Detection2DArray, or None when the frame failed (counted, logged throttled).
        Runtimes without threads may call it directly (the worker calls :meth:`process_batch`).
        """
        received = self.monotonic() if received is None else received
        return self.process_batch([Frame(msg, received, source or self.default_source)])[0]

    def process_batch(self, frames: Sequence[Frame]) -> list[Any | None]:
        """Run frames (one per camera) through decode -> one pipeline call for all of them ->
        per frame: its camera's tracker and distances -> a message with its own header -> its
        camera's ports. Each frame's Detection2DArray, None where one failed: a frame fails
        alone (bad input, a bug in its planning or publishing), except when the network call
        for the batch fails, which fails every frame in it."""
        clock = self.monotonic
        outputs: list[Any | None] = [None] * len(frames)
        ready: list[tuple[int, Frame, np.ndarray, float]] = []
        for index, frame in enumerate(frames):
            try:
                t0 = clock()
                rgb = self.decoder(frame.msg)
                ready.append((index, frame, rgb, (clock() - t0) * 1e3))
            except Exception as error:  # a bad frame must never stop the node
                self._record_failure(frame, error)
        if not ready:
            return outputs
        for (index, frame, rgb, decode_ms), found in zip(
            ready, self._detect([rgb for _, _, rgb, _ in ready]), strict=True
        ):
            if isinstance(found, Exception):
                self._record_failure(frame, found)
            else:
                outputs[index] = self._finish(frame, rgb, decode_ms, found)
        return outputs

    def _detect(self, rgbs: list[np.ndarray]) -> list[Any]:
        """The pipeline's detections of each frame (or the exception it raised): several frames
        in one ``detect_batch`` call (each letterboxed to the network input on its own)."""
        if len(rgbs) > 1 and hasattr(self.pipeline, "detect_batch"):
            with self._lock:
                self._batch_sizes.add(len(rgbs))
            try:
                found = list(self.pipeline.detect_batch(rgbs))
                if len(found) != len(rgbs):
                    raise RuntimeError(f"detect_batch gave {len(found)} results for {len(rgbs)}")
                return found
            except Exception as error:  # neither a bad frame nor a bug may stop the node
                return [error] * len(rgbs)
        results: list[Any] = []
        for rgb in rgbs:  # one frame, or a pipeline without batches: one call per frame
            with self._lock:
                self._batch_sizes.add(1)
            try:
                results.append(self.pipeline(rgb))
            except Exception as error:
                results.append(error)
        return results

    def _finish(self, frame: Frame, rgb: np.ndarray, decode_ms: float, detections: Any) -> Any:
        """Planning, message and publication of one detected frame; its statistics."""
        clock, msg = self.monotonic, frame.msg
        try:
            t1 = clock()
            extras = self._plan(detections, rgb.shape[:2], msg.header, frame.source)
            planning_ms = (clock() - t1) * 1e3
            out = self._messages.detections_to_msg(detections, msg.header, self.classes, **extras)
            self.ports.for_camera(frame.source).publish_detections(out)
        except Exception as error:  # neither a bad frame nor a bug may stop the node
            self._record_failure(frame, error)
            return None
        end_ms = (clock() - frame.received) * 1e3
        age_ms = (self.clock() - stamp_seconds(msg.header)) * 1e3
        timings = dict(getattr(detections, "timings", {}) or {})
        timings["decode"] = decode_ms + float(timings.get("decode", 0.0))
        timings["planning"] = planning_ms
        timings["end_to_end"] = end_ms
        with self._lock:
            now = clock()
            for stats in self._stats_for(frame.source):
                stats.processed(timings, age_ms, now)
        if self.params.publish_debug_image:
            self._publish_debug(rgb, detections, msg.header, frame.source)
        return out

    def _plan(
        self, detections: Any, image_size: tuple[int, int], header: Any, source: str | None
    ) -> dict[str, Any]:
        """Track ids and ground-plane positions of one frame (``Planner.plan``; timed by the
        planning benchmark)."""
        return self.planner.plan(
            detections, image_size, header, source or self.default_source, self.params
        )

    def _publish_debug(self, rgb: np.ndarray, detections: Any, header: Any, source: str) -> None:
        try:
            ports = self.ports.for_camera(source)
            if not ports.debug_image_wanted():
                return
            image = self._messages.rgb_to_image_msg(
                annotate(rgb, detections), header, self.classes
            )
            ports.publish_debug_image(image)
        except Exception as error:  # the debug image is optional: never fail the frame for it
            self._errors.report(error, "debug image not published", "debug_image")

    def _record_failure(self, frame: Frame, error: Exception) -> None:
        """Count a failed frame; log it (:class:`ErrorLog`: a bad frame in one line, a bug with
        its traceback the first time its type occurs)."""
        with self._lock:
            for stats in self._stats_for(frame.source):
                stats.failed(describe(error))
            failed = self._stats.counters.failed
        stamp = ""
        with contextlib.suppress(Exception):  # the header itself may be the broken part
            stamp = f" stamp {stamp_seconds(frame.msg.header):.3f}"
        camera = f" from {frame.source}" if self._camera_stats else ""
        self._errors.report(error, f"frame{stamp}{camera} failed ({failed} so far)", "frame")

    # ------------------------------------------------------------------ label info
    def label_info_msg(self) -> Any:
        """vision_msgs/LabelInfo with the pipeline's class names (stamp = now)."""
        header = make_header(self.classes, self.clock(), "")
        return self._messages.label_info_msg(
            self.class_names, header, self.classes, threshold=self.params.score_threshold
        )

    def publish_label_info(self) -> None:
        """Send the class names once (the runtime's publisher is transient-local)."""
        if getattr(self.classes, "LabelInfo", None) is None:
            self.logger.info("vision_msgs has no LabelInfo (< 4.x, e.g. Foxy): not publishing it")
            return
        self.ports.publish_label_info(self.label_info_msg())

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> DiagnosticReport:
        """Level, message and key/values for diagnostics (docs/node.md, "Topics"), every camera's
        frames together (:meth:`camera_diagnostics`: each camera's).

        Disabled (``enable`` false): OK, saying so. Otherwise ERROR when a frame of the recent
        window failed, WARN when the window's p95 end-to-end latency exceeds
        ``latency_budget_ms`` or when distances are asked for (``camera_height`` > 0) but no
        usable CameraInfo arrived, OK otherwise. Latencies in ms.
        """
        now = self.monotonic()
        with self._lock:
            summary = self._stats.summary(now)
            params = self.params
            ignored = self.frames_ignored
            processed = {key: s.counters.processed for key, s in self._camera_stats.items()}
            batches = self._batch_sizes.summary()
        cameras = [
            (camera.key, camera.camera_info_topic, processed.get(camera.key, 0))
            for camera in params.cameras
        ]
        if not self._camera_stats:  # one camera: its frames are the node's
            cameras = [(cameras[0][0], cameras[0][1], summary.counters.processed)]
        planning, problem = self.planner.values(params, cameras)
        values = [
            *summary.values(),
            ("device", self.device),
            ("latency_budget_ms", f"{params.latency_budget_ms:.1f}"),
            ("last_error", summary.last_error),
            ("enabled", "true" if params.enable else "false"),
            ("frames_ignored_disabled", str(ignored)),
            *planning,
        ]
        if self._camera_stats:
            values += [
                ("cameras", str(len(params.cameras))),
                ("batch_size_mean", f"{batches.mean:.2f}" if batches else "nan"),
                ("batch_size_max", f"{batches.max:.0f}" if batches else "nan"),
            ]
        return DiagnosticReport(
            DIAGNOSTIC_TASK, *self._level(summary, problem), self.device, values
        )

    def _level(self, summary: Any, problem: str) -> tuple[int, str]:
        if not self.params.enable:
            return OK, "disabled (enable is false): not subscribed to images, no inference"
        return assess(summary, self.params.latency_budget_ms, problem)

    def camera_diagnostics(self) -> list[DiagnosticReport]:
        """One report per camera when there are several (none with one camera): its frames
        received, processed, dropped and failed, its rates and latencies, its CameraInfo."""
        if not self._camera_stats:
            return []
        now = self.monotonic()
        reports = []
        for camera in self.params.cameras:
            with self._lock:
                summary = self._stats_for(camera.key)[1].summary(now)
            info, usable = self.planner.camera_state(camera.key, camera.camera_info_topic)
            active, lost, issued = self.planner.tracks(camera.key)
            problem = ""
            if self.params.camera_height > 0 and not usable and summary.counters.processed:
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
            level, message = self._level(summary, problem)
            name = f"{CAMERA_TASK} {camera.image_topic}"
            reports.append(DiagnosticReport(name, level, message, self.device, values))
        return reports

    def diagnostics_msg(self) -> Any:
        """Every report (the node's, each camera's) as a diagnostic_msgs/DiagnosticArray, for
        runtimes without an updater. Status names are ``"<node>: <task>"``, as
        diagnostic_updater names them."""
        reports = [self.diagnostics(), *self.camera_diagnostics()]
        return diagnostic_array_msg(
            [dataclasses.replace(r, name=f"{self.node_name}: {r.name}") for r in reports],
            make_header(self.classes, self.clock(), ""),
            self.classes,
        )
