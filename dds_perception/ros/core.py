"""The detector node's logic in plain Python, shared by every runtime (rclpy, Cyclone DDS, tests).

The core owns everything a detector node does between "a frame arrived" and "messages go out":
the newest-frame handoff to one worker thread (:mod:`.frame_slot`: frames that arrive while one
is processed replace the pending one and are counted as dropped, never queued), the per-frame
work (:mod:`.frames`: decode, one pipeline call per batch, track ids and distances from
:mod:`.planning`, messages, the debug image), frame counters, latency statistics and the
diagnostic reports (:mod:`.node_stats`), run-time parameter changes and ``~/enable``.
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

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dds_perception.ros.diagnostics import DiagnosticReport, diagnostic_array_msg
from dds_perception.ros.error_log import ErrorLog
from dds_perception.ros.frame_slot import LatestFrameSlot
from dds_perception.ros.frames import Frame, FrameProcessor
from dds_perception.ros.node_stats import NodeStatistics
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
        vote_iou=None if params.vote_iou < 0 else params.vote_iou,
        max_detections=params.max_detections,
        input_size=params.input_size,
    )


class DetectorCore:
    """Frame slot + worker + statistics + diagnostics + message building; see the module doc.

    ``pipeline`` follows the inference-pipeline contract (callable on an RGB array, returning
    detections with ``timings``; settable ``score_threshold``, ``nms_iou``, ``vote_iou`` and
    ``max_detections``).
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
        self.stats = NodeStatistics(params)
        self._slot = LatestFrameSlot()  # the newest pending frame of each camera
        self._thread: threading.Thread | None = None
        # bad frames in one line, bugs with their traceback; throttled per place
        self._errors = ErrorLog(
            self.logger.warning, self.logger.error, period=failure_log_period, monotonic=monotonic
        )
        self.planner = Planner(self.logger)
        self._release_pending = False
        self._apply_runtime(params)
        self._frames = FrameProcessor(
            pipeline=pipeline,
            decoder=self.decoder,
            messages=messages,
            classes=classes,
            ports=self.ports,
            planner=self.planner,
            stats=self.stats,
            errors=self._errors,
            params=lambda: self.params,
            clock=clock,
            monotonic=monotonic,
        )

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
        return self.stats.counters

    @property
    def last_error(self) -> str:
        return self.stats.last_error

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

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.pipeline, "class_names", ["car"]))

    # ------------------------------------------------------------------ parameters
    def _apply_runtime(self, params: DetectorParams) -> None:
        self.pipeline.score_threshold = params.score_threshold
        self.pipeline.nms_iou = params.nms_iou
        file_vote_iou = getattr(getattr(self.pipeline, "config", None), "vote_iou", 0.0)
        # -1: the weights file's value (also when set back at run time)
        self.pipeline.vote_iou = params.vote_iou if params.vote_iou >= 0 else file_vote_iou
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
        for frame in self._slot.discard():
            self.stats.dropped(frame.source)
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
            self.stats.ignored()
            return
        source = source or self.default_source
        self.stats.received(source, now)
        if self._slot.put(Frame(msg, now, source), key=source):
            self.stats.dropped(source)

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
        camera's ports (:class:`~dds_perception.ros.frames.FrameProcessor`). Each frame's
        Detection2DArray, None where one failed (counted, logged throttled)."""
        return self._frames.process_batch(frames)

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
        """The ``detector`` status, every camera's frames together
        (:meth:`NodeStatistics.report <dds_perception.ros.node_stats.NodeStatistics.report>`)."""
        return self.stats.report(self.params, self.planner, self.device, self.monotonic())

    def camera_diagnostics(self) -> list[DiagnosticReport]:
        """One ``camera`` status per camera when there are several (none with one camera)."""
        return self.stats.camera_reports(self.params, self.planner, self.device, self.monotonic())

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
