"""The detector node's logic in plain Python, shared by every runtime (rclpy, Cyclone DDS, tests).

The core owns everything a detector node does between "a frame arrived" and "messages go out":
its parameters (:class:`DetectorParams`, loaded from ``config/detector.yaml``), a latest-frame
slot with one worker thread (the newest frame wins; frames that arrive while one is processed
replace the pending one and are counted as dropped, never queued), frame counters, rolling
latency statistics per stage, the diagnostics content, and message building through
:mod:`dds_perception.ros.messages`. A runtime only moves messages: it hands received frames to
:meth:`DetectorCore.submit` and gives the core its publishing functions (:class:`Ports`), a
clock and a logger. Nothing here imports rclpy.

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
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from dds_perception.utils.errors import DdsPerceptionError

NODE_NAME = "dds_detector"
DIAGNOSTIC_TASK = "detector"  # diagnostic_updater publishes it as "dds_detector: detector"
# "planning": the tracker and the distance estimate (what planners need from /detections)
STAGES = ("decode", "preprocess", "inference", "postprocess", "planning", "end_to_end")
STATS = ("mean", "p50", "p95", "max")
RELIABILITIES = ("best_effort", "reliable")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
BACKENDS = ("torch", "onnxruntime", "tensorrt")  # dds_perception.deploy.backends.BACKENDS
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
# parameters of other components that may sit in the same ros__parameters block
FOREIGN_PARAMETERS = ("use_sim_time", "diagnostic_updater.", "qos_overrides.")


class ParameterError(DdsPerceptionError, ValueError):
    """A detector parameter (or the parameter file) is invalid; the message names the field."""


def _param(default: Any, description: str, *, low=None, high=None, runtime=False, choices=()):
    """A dataclass field carrying the ROS parameter descriptor data (description, range)."""
    return field(
        default=default,
        metadata={
            "description": description,
            "range": (low, high),
            "runtime": runtime,  # changeable while running; the others need a restart
            "choices": tuple(choices),
        },
    )


@dataclass(frozen=True)
class DetectorParams:
    """Every parameter of the ``dds_detector`` node (design.md section 7), validated on creation.

    The field metadata (description, range, run-time changeable) is the single source for the
    ROS parameter descriptors, the README table and the validation messages.
    """

    weights: str = _param(
        "", "detector weights (.safetensors) or an exported .onnx; empty = the shipped model"
    )
    device: str = _param("auto", "inference device", choices=("auto", "cpu", "cuda", "cuda:N"))
    half: bool = _param(False, "fp16 inference (CUDA only)")
    backend: str = _param(
        "torch",
        "network backend: torch, onnxruntime or tensorrt (engine built once, cached beside the "
        ".onnx; a .safetensors file is exported to ONNX once, into ~/.cache/dds_perception)",
        choices=BACKENDS,
    )
    score_threshold: float = _param(
        0.3, "minimum detection score", low=0.0, high=1.0, runtime=True
    )
    nms_iou: float = _param(
        0.5, "IoU above which NMS suppresses a box", low=0.0, high=1.0, runtime=True
    )
    max_detections: int = _param(
        100, "maximum detections per frame", low=1, high=10000, runtime=True
    )
    input_width: int = _param(
        0,
        "network input width in px, a multiple of 32; 0 = from the weights file",
        low=0,
        high=8192,
    )
    input_height: int = _param(
        0,
        "network input height in px, a multiple of 32; 0 = from the weights file",
        low=0,
        high=8192,
    )
    use_compressed: bool = _param(
        False, "subscribe sensor_msgs/CompressedImage on image_compressed_topic instead of Image"
    )
    reliability: str = _param("best_effort", "subscription QoS reliability", choices=RELIABILITIES)
    latency_budget_ms: float = _param(
        100.0,
        "diagnostics WARN when p95 end-to-end latency exceeds it",
        low=0.001,
        high=1.0e6,
        runtime=True,
    )
    publish_debug_image: bool = _param(
        True, "publish annotated frames on ~/debug_image while it has subscribers", runtime=True
    )
    image_topic: str = _param("image", "sensor_msgs/Image topic (remap it to the camera)")
    image_compressed_topic: str = _param(
        "image/compressed", "sensor_msgs/CompressedImage topic (with use_compressed)"
    )
    stats_window: int = _param(
        100,
        "frames in the rolling latency / failure window of the diagnostics",
        low=2,
        high=100000,
    )
    enable: bool = _param(
        True,
        "process images; false unsubscribes from the camera (no decode, no inference) and "
        "frees cached memory until set true again (the ~/enable service sets it too)",
        runtime=True,
    )
    tracking: bool = _param(
        True,
        "fill Detection2D.id with a stable id per car across frames (ByteTrack-style tracker, "
        "one per camera); false = empty ids",
        runtime=True,
    )
    track_buffer: float = _param(
        1.0,
        "seconds a lost track is kept so that the car gets its id back when seen again",
        low=0.0,
        high=3600.0,
        runtime=True,
    )
    track_high_threshold: float = _param(
        0.5,
        "tracker: boxes scoring at least this are matched first and start tracks (from 0.1 "
        "higher); lower-scoring boxes only keep existing tracks alive",
        low=0.0,
        high=1.0,
        runtime=True,
    )
    camera_info_topic: str = _param(
        "",
        "sensor_msgs/CameraInfo topic; empty = camera_info beside image_topic "
        "(/camera/image_raw -> /camera/camera_info)",
    )
    camera_height: float = _param(
        0.0,
        "camera height above a flat road in metres (KITTI: 1.65); with a CameraInfo it gives "
        "each car's position in results[0].pose; <= 0 = no distances",
        runtime=True,
    )
    camera_pitch: float = _param(
        0.0, "camera pitch in radians, positive = looking down", low=-1.0, high=1.0, runtime=True
    )
    distance_offset: float = _param(
        1.4,
        "metres from a box's bottom edge (the car's nearest point on the road) to the published "
        "position, along the viewing direction: 1.4 = a car's centre; 0 = the nearest point",
        low=0.0,
        high=10.0,
        runtime=True,
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name, _coerce(spec, getattr(self, spec.name)))
        if not DEVICE_PATTERN.match(self.device):
            raise ParameterError(
                f"device {self.device!r}: unknown device; use auto, cpu, cuda or cuda:N"
            )
        if self.backend not in BACKENDS:
            raise ParameterError(f"backend {self.backend!r}: use {', '.join(BACKENDS)}")
        if self.reliability not in RELIABILITIES:
            raise ParameterError(
                f"reliability {self.reliability!r}: use {' or '.join(RELIABILITIES)}"
            )
        for name in ("input_width", "input_height"):
            if getattr(self, name) < 0:
                raise ParameterError(
                    f"{name} {getattr(self, name)}: must be positive (or 0 = from the weights)"
                )
        if (self.input_width == 0) != (self.input_height == 0):
            raise ParameterError(
                f"input_width {self.input_width} / input_height {self.input_height}: set both "
                "or neither (0 = from the weights file)"
            )
        for name in ("score_threshold", "nms_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ParameterError(f"{name} {value}: must lie in [0, 1]")
        if self.max_detections <= 0:
            raise ParameterError(f"max_detections {self.max_detections}: must be positive")
        if self.latency_budget_ms <= 0:
            raise ParameterError(f"latency_budget_ms {self.latency_budget_ms}: must be positive")
        if self.stats_window < 2:
            raise ParameterError(f"stats_window {self.stats_window}: must be at least 2")
        for name in ("image_topic", "image_compressed_topic"):
            if not getattr(self, name).strip():
                raise ParameterError(f"{name}: must not be empty")
        if not np.isfinite(self.camera_height):
            raise ParameterError(f"camera_height {self.camera_height}: must be a finite number")
        for spec in dataclasses.fields(self):  # the descriptor ranges, as ROS enforces them
            low, high = spec.metadata["range"]
            value = getattr(self, spec.name)
            if low is not None and not low <= value <= high:
                raise ParameterError(f"{spec.name} {value}: must lie in [{low}, {high}]")

    @property
    def subscribed_topic(self) -> str:
        """The topic the node subscribes: the compressed one with ``use_compressed``."""
        return self.image_compressed_topic if self.use_compressed else self.image_topic

    @property
    def resolved_camera_info_topic(self) -> str:
        """``camera_info_topic``, or when empty the ``camera_info`` beside ``image_topic``."""
        if self.camera_info_topic.strip():
            return self.camera_info_topic.strip()
        return camera_info_topic_for(self.image_topic)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(height, width)`` for the pipeline, or None to take the weights file's size."""
        if self.input_width and self.input_height:
            return (self.input_height, self.input_width)
        return None

    def replace(self, **changes: Any) -> DetectorParams:
        """A validated copy with ``changes`` applied (unknown names: :class:`ParameterError`)."""
        unknown = sorted(set(changes) - set(parameter_names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(parameter_names())}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Parameter name -> value, in declaration order."""
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}


def camera_info_topic_for(image_topic: str) -> str:
    """The CameraInfo topic of a camera's image topic (image_transport's rule: the same
    namespace): ``/camera/image_raw`` -> ``/camera/camera_info``, ``image`` -> ``camera_info``."""
    head, sep, _name = image_topic.strip().rstrip("/").rpartition("/")
    return f"{head}/camera_info" if sep else "camera_info"


def _coerce(spec: dataclasses.Field, value: Any) -> Any:
    """Check a parameter's type (ints accepted for floats); ParameterError naming it otherwise."""
    kind = {"str": str, "bool": bool, "int": int, "float": float}[str(spec.type)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ParameterError(
            f"{spec.name} {value!r}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def parameter_names() -> list[str]:
    """Names of every node parameter, in declaration order."""
    return [spec.name for spec in dataclasses.fields(DetectorParams)]


def parameter_specs() -> list[dataclasses.Field]:
    """The dataclass fields of :class:`DetectorParams` (name, type, default, metadata)."""
    return list(dataclasses.fields(DetectorParams))


def runtime_parameters() -> frozenset[str]:
    """Parameters that may change while the node runs (thresholds, budget, debug image)."""
    return frozenset(s.name for s in dataclasses.fields(DetectorParams) if s.metadata["runtime"])


def default_params_file() -> Path:
    """``config/detector.yaml`` of this checkout, of a pip install, or of a colcon install."""
    name = Path("config") / "detector.yaml"
    candidates = [Path(__file__).resolve().parents[2] / name]
    try:  # colcon install: share/dds_perception/config
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("dds_perception")) / name)
    except Exception:  # ament_index absent, or the package is not in the index
        pass
    candidates.append(Path(sys.prefix) / "share" / "dds_perception" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"detector parameter file not found; looked in: {', '.join(map(str, candidates))}"
    )


def _node_block(document: Any, path: Path, node_name: str) -> dict[str, Any]:
    """Merge the ``ros__parameters`` blocks that apply to ``node_name`` (wildcards first)."""
    if not isinstance(document, Mapping):
        raise ParameterError(f"{path}: expected a mapping of node names at the top level")
    wildcard, specific = {}, {}
    for key, body in document.items():
        key_text = str(key).strip("/")
        if key_text in ("**", "*"):
            target = wildcard
        elif key_text == node_name or key_text.endswith(f"/{node_name}"):
            target = specific
        else:
            continue
        if not isinstance(body, Mapping) or not isinstance(body.get("ros__parameters"), Mapping):
            raise ParameterError(f"{path}: '{key}' has no 'ros__parameters:' mapping")
        target.update(body["ros__parameters"])
    if not wildcard and not specific:
        raise ParameterError(f"{path}: no '{node_name}: ros__parameters:' block")
    return {**wildcard, **specific}


def _flatten(block: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """ROS parameter files may nest names (``a: {b: 1}`` is ``a.b``); return dotted names."""
    flat: dict[str, Any] = {}
    for key, value in block.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_params(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    node_name: str = NODE_NAME,
) -> DetectorParams:
    """Read ``path``'s ``dds_detector: ros__parameters:`` block, apply ``overrides``, validate.

    ``path`` None: :func:`default_params_file`. Unknown parameter names are an error (typos
    would otherwise be ignored silently); parameters of diagnostic_updater and ``use_sim_time``
    are skipped.
    """
    path = Path(path) if path is not None else default_params_file()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ParameterError(f"{path}: not valid YAML: {error}") from error
    values = {
        name: value
        for name, value in _flatten(_node_block(document, path, node_name)).items()
        if not name.startswith(FOREIGN_PARAMETERS)
    }
    values.update(overrides or {})
    unknown = sorted(set(values) - set(parameter_names()))
    if unknown:
        raise ParameterError(
            f"{path}: unknown parameter(s) {', '.join(map(str, unknown))}; "
            f"known: {', '.join(parameter_names())}"
        )
    try:
        return DetectorParams(**values)
    except ParameterError as error:
        raise ParameterError(f"{path}: {error}") from error


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``name:=value`` / ``name=value`` strings (command line) into typed values."""
    specs = {spec.name: spec for spec in dataclasses.fields(DetectorParams)}
    result: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition(":=") if ":=" in item else item.partition("=")
        name = name.strip()
        if not sep or name not in specs:
            raise ParameterError(
                f"override {item!r}: use NAME:=VALUE with NAME one of {', '.join(specs)}"
            )
        if str(specs[name].type) == "str":
            result[name] = text
            continue
        try:
            result[name] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ParameterError(f"override {item!r}: cannot parse {text!r}") from error
    return result


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


# --------------------------------------------------------------------------- frame slot


class LatestFrameSlot:
    """A one-place mailbox: :meth:`put` replaces a pending item, :meth:`take` waits for one.

    Keeping one pending frame (instead of a queue) bounds both the latency and the memory when
    frames arrive faster than inference: the worker always works on the newest frame.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._pending = False
        self._busy = False
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store ``item``; return True when it replaced a pending (now dropped) item."""
        with self._cond:
            replaced = self._pending
            self._item, self._pending = item, True
            self._cond.notify_all()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """Wait for an item and mark the worker busy; None on timeout or when closed."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                return None
            if self._closed:
                return None
            item, self._item, self._pending = self._item, None, False
            self._busy = True
            return item

    def done(self) -> None:
        """Mark the taken item as finished (lets :meth:`wait_idle` return)."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def discard(self) -> bool:
        """Drop the pending item, if any; True when one was dropped."""
        with self._cond:
            dropped = self._pending
            self._item, self._pending = None, False
            self._cond.notify_all()
            return dropped

    def close(self) -> None:
        """Wake every waiter; later :meth:`take` calls return None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return self._pending


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """Mean/p50/p95/max of a window of samples (ms)."""

    mean: float
    p50: float
    p95: float
    max: float
    count: int


class RollingStats:
    """The last ``window`` samples of one quantity, summarised on demand."""

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self._values.append(float(value))

    def summary(self) -> Summary | None:
        """None while empty."""
        if not self._values:
            return None
        values = np.fromiter(self._values, dtype=np.float64)
        p50, p95 = np.percentile(values, [50, 95])
        return Summary(
            float(values.mean()), float(p50), float(p95), float(values.max()), int(values.size)
        )

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class Counters:
    """Frames received by the runtime, processed, dropped (replaced unprocessed) and failed."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    failed: int = 0


@dataclass(frozen=True)
class DiagnosticReport:
    """The content of one diagnostic_msgs/DiagnosticStatus, independent of message classes."""

    name: str
    level: int
    message: str
    hardware_id: str
    values: list[tuple[str, str]]

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)


# --------------------------------------------------------------------------- ports


class Logger(Protocol):
    """What the core logs through (``logging.Logger`` and rclpy's logger adapter both fit)."""

    def info(self, message: str) -> Any: ...
    def warning(self, message: str) -> Any: ...
    def error(self, message: str) -> Any: ...


class _NullLogger:
    def info(self, message: str) -> None:
        pass

    warning = error = info


def _never() -> bool:
    return False


def _discard(_msg: Any) -> None:
    pass


def _no_subscription_control(_subscribed: bool) -> None:
    pass


@dataclass
class Ports:
    """How the core talks to its runtime: publishing functions and the debug-image demand.

    ``debug_image_wanted`` is asked for every frame: the annotated image is built only while it
    returns True (rclpy: the publisher's ``get_subscription_count() > 0``).
    ``set_image_subscription(True/False)`` creates or destroys the runtime's image subscription
    (the ``enable`` parameter): called by :meth:`DetectorCore.start` and on every change; it
    must be idempotent.
    """

    publish_detections: Callable[[Any], None] = _discard
    publish_label_info: Callable[[Any], None] = _discard
    publish_debug_image: Callable[[Any], None] = _discard
    debug_image_wanted: Callable[[], bool] = _never
    set_image_subscription: Callable[[bool], None] = _no_subscription_control


class Throttle:
    """Lets one message through per ``period`` seconds and counts the ones it held back."""

    def __init__(self, period: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._monotonic = monotonic
        self._last: float | None = None
        self.suppressed = 0

    def __call__(self) -> tuple[bool, int]:
        """(pass?, number suppressed since the last one that passed)."""
        now = self._monotonic()
        if self._last is None or now - self._last >= self.period:
            self._last, suppressed, self.suppressed = now, self.suppressed, 0
            return True, suppressed
        self.suppressed += 1
        return False, 0


def stamp_seconds(header: Any) -> float:
    """A std_msgs/Header's stamp in seconds."""
    return float(header.stamp.sec) + float(header.stamp.nanosec) * 1e-9


def make_header(classes: Any, seconds: float, frame_id: str = "") -> Any:
    """A std_msgs/Header of ``classes`` stamped ``seconds`` (e.g. "now" for label info)."""
    from dds_perception.ros.messages import header_msg

    return header_msg(round(seconds * 1e9), frame_id, classes)


def diagnostic_level(classes: Any, level: int) -> Any:
    """The level constant of ``classes.DiagnosticStatus`` (bytes in rclpy, int in rosbags)."""
    return getattr(classes.DiagnosticStatus, LEVEL_NAMES[level], level)


def diagnostic_array_msg(reports: Sequence[DiagnosticReport], header: Any, classes: Any) -> Any:
    """diagnostic_msgs/DiagnosticArray of ``classes`` holding one status per report."""
    status = [
        classes.DiagnosticStatus(
            level=diagnostic_level(classes, report.level),
            name=report.name,
            message=report.message,
            hardware_id=report.hardware_id,
            values=[classes.KeyValue(key=key, value=value) for key, value in report.values],
        )
        for report in reports
    ]
    return classes.DiagnosticArray(header=header, status=status)


def annotate(rgb: np.ndarray, detections: Any) -> np.ndarray:
    """A copy of ``rgb`` with each detection's box, class and score drawn on it."""
    import cv2

    canvas = np.ascontiguousarray(rgb).copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    for box, score, name in zip(
        detections.boxes, detections.scores, detections.class_names, strict=True
    ):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(
            canvas,
            f"{name} {float(score):.2f}",
            (x1, max(y1 - 4, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 255, 0),
            thickness,
        )
    return canvas


# --------------------------------------------------------------------------- the core


@dataclass
class _Frame:
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

    For planners (issue 19) each published detection carries a track id (``tracking``; one
    :class:`~dds_perception.detection.tracking.ByteTracker` per image topic) and, once the
    camera's CameraInfo arrived (:meth:`submit_camera_info`) and ``camera_height`` is set, the
    car's position from the ground plane
    (:func:`~dds_perception.detection.ground_plane.estimate`). ``enable`` false makes the
    runtime drop its image subscription (``Ports.set_image_subscription``), drops the pending
    frame, resets the tracks and releases cached memory; diagnostics go on and say so.
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
        self.logger: Logger = logger or _NullLogger()
        self.decoder = decoder or messages.image_msg_to_rgb
        self.node_name = node_name
        self.counters = Counters()
        self.last_error = ""
        self._lock = threading.Lock()
        self._slot = LatestFrameSlot()
        self._thread: threading.Thread | None = None
        self._failure_throttle = Throttle(failure_log_period, time.monotonic)
        # planning outputs: trackers and camera models per image topic, distance outcomes
        self._plan_lock = threading.Lock()
        self._trackers: dict[str, Any] = {}
        self._cameras: dict[str, Any] = {}  # source -> Intrinsics
        self._camera_errors: dict[str, str] = {}  # source -> why its CameraInfo is unusable
        self.camera_info_received = 0
        self.distance_counts: dict[str, int] = {}
        self.frames_ignored = 0  # frames that arrived while disabled (before unsubscribing)
        self._release_pending = False
        self._reset_windows(params.stats_window)
        self._apply_runtime(params)

    # ------------------------------------------------------------------ lifecycle
    def _reset_windows(self, window: int) -> None:
        self._stats = {name: RollingStats(window) for name in (*STAGES, "age")}
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = processed, False = failed
        self._done_times: deque[float] = deque(maxlen=window)
        self._arrival_times: deque[float] = deque(maxlen=window)

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
    def device(self) -> str:
        return str(getattr(self.pipeline, "device", self.params.device))

    @property
    def enabled(self) -> bool:
        return self.params.enable

    @property
    def default_source(self) -> str:
        """The key of the node's one camera: its subscribed image topic."""
        return self.params.subscribed_topic

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
            return True, f"enabled: subscribed to {self.params.subscribed_topic}"
        return True, "disabled: not subscribed to images, no inference"

    def _switch(self, enabled: bool) -> None:
        """Subscribe/unsubscribe the camera; when disabling, also drop the pending frame, forget
        the tracks (a car seen after the pause is a new observation) and free cached memory."""
        self.ports.set_image_subscription(enabled)
        if enabled:
            self.logger.info(f"enabled: subscribed to {self.params.subscribed_topic}")
            return
        if self._slot.discard():
            with self._lock:
                self.counters.dropped += 1
        with self._plan_lock:
            for tracker in self._trackers.values():
                tracker.reset()
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
            self.logger.warning(f"cached memory not released: {error}")
            return []

    # ------------------------------------------------------------------ frames
    def submit(self, msg: Any, source: str | None = None) -> None:
        """Hand over a received Image/CompressedImage; returns at once (subscription callback).

        ``source``: the image topic (default: the subscribed one). While disabled, frames
        still in flight are ignored (counted as ``frames_ignored_disabled``).
        """
        now = self.monotonic()
        if not self.params.enable:
            with self._lock:
                self.frames_ignored += 1
            return
        with self._lock:
            self.counters.received += 1
            self._arrival_times.append(now)
        if self._slot.put(_Frame(msg, now, source or self.default_source)):
            with self._lock:
                self.counters.dropped += 1

    def submit_camera_info(self, msg: Any, source: str | None = None) -> None:
        """Take the camera model of ``source``'s images (default: the subscribed topic) from a
        sensor_msgs/CameraInfo; an unusable one (zero focal length, K not 3x3, ...) is kept as
        the reason why that camera's boxes get no distance, never raised."""
        from dds_perception.detection.ground_plane import CameraModelError, Intrinsics

        source = source or self.default_source
        try:
            intrinsics, problem = Intrinsics.from_camera_info(msg), ""
        except (CameraModelError, AttributeError, TypeError, ValueError) as error:
            intrinsics, problem = None, f"{type(error).__name__}: {error}"
        with self._lock:
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

    def _run(self) -> None:
        while True:
            frame = self._slot.take()
            if frame is None:
                return
            try:
                self.process(frame.msg, received=frame.received, source=frame.source)
            finally:
                self._slot.done()
                if self._release_pending and not self.params.enable:
                    self._release_memory()

    def process(
        self, msg: Any, *, received: float | None = None, source: str | None = None
    ) -> Any | None:
        """Run one frame through decode -> pipeline -> tracker and distance -> messages -> ports.

        Returns the Detection2DArray, or None when the frame failed (counted, logged throttled).
        Called by the worker; runtimes without threads may call it directly.
        """
        clock = self.monotonic
        received = clock() if received is None else received
        try:
            t0 = clock()
            rgb = self.decoder(msg)
            decode_ms = (clock() - t0) * 1e3
            detections = self.pipeline(rgb)
            t1 = clock()
            extras = self._plan(detections, rgb.shape[:2], msg.header, source)
            planning_ms = (clock() - t1) * 1e3
            out = self._messages.detections_to_msg(detections, msg.header, self.classes, **extras)
            self.ports.publish_detections(out)
        except Exception as error:  # a bad frame must never stop the node
            self._record_failure(msg, error)
            return None
        end_ms = (clock() - received) * 1e3
        age_ms = (self.clock() - stamp_seconds(msg.header)) * 1e3
        timings = dict(getattr(detections, "timings", {}) or {})
        timings["decode"] = decode_ms + float(timings.get("decode", 0.0))
        timings["planning"] = planning_ms
        timings["end_to_end"] = end_ms
        with self._lock:
            self.counters.processed += 1
            self._outcomes.append(True)
            self._done_times.append(clock())
            for stage in STAGES:
                if stage in timings:
                    self._stats[stage].add(timings[stage])
            self._stats["age"].add(age_ms)
        if self.params.publish_debug_image:
            self._publish_debug(rgb, detections, msg.header)
        return out

    # ------------------------------------------------------------------ planning outputs
    def _tracker_config(self, params: DetectorParams) -> Any:
        from dds_perception.detection.tracking import TrackerConfig

        high = params.track_high_threshold
        return TrackerConfig(
            high_threshold=high,
            low_threshold=min(0.1, high),
            new_track_threshold=min(1.0, high + 0.1),
            track_buffer=params.track_buffer,
        )

    def _plan(
        self, detections: Any, image_size: tuple[int, int], header: Any, source: str | None
    ) -> dict[str, Any]:
        """Track ids and ground-plane positions of one frame's detections (keyword arguments
        of ``messages.detections_to_msg``)."""
        from dds_perception.detection import ground_plane, tracking

        params = self.params
        source = source or self.default_source
        boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
        extras: dict[str, Any] = {}
        with self._plan_lock:
            if params.tracking:
                tracker = self._trackers.get(source)
                config = self._tracker_config(params)
                if tracker is None:
                    tracker = self._trackers[source] = tracking.ByteTracker(config)
                tracker.config = config
                scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
                extras["ids"] = tracking.format_ids(
                    tracker.update(boxes, scores, stamp_seconds(header))
                )
            elif source in self._trackers:  # tracking switched off: start afresh when back
                self._trackers[source].reset()
        with self._lock:
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
        with self._lock:
            for key, value in counts.items():
                self.distance_counts[key] = self.distance_counts.get(key, 0) + value
        if len(boxes):
            extras["positions"] = estimates.positions
            extras["covariances"] = ground_plane.pose_covariances(estimates.covariances)
        return extras

    def _publish_debug(self, rgb: np.ndarray, detections: Any, header: Any) -> None:
        try:
            if not self.ports.debug_image_wanted():
                return
            image = self._messages.rgb_to_image_msg(
                annotate(rgb, detections), header, self.classes
            )
            self.ports.publish_debug_image(image)
        except Exception as error:  # the debug image is optional: never fail the frame for it
            self.logger.warning(f"debug image not published: {error}")

    def _record_failure(self, msg: Any, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"
        with self._lock:
            self.counters.failed += 1
            self._outcomes.append(False)
            self.last_error = text
            failed = self.counters.failed
        show, suppressed = self._failure_throttle()
        if show:
            stamp = ""
            with contextlib.suppress(Exception):  # the header itself may be the broken part
                stamp = f" stamp {stamp_seconds(msg.header):.3f}"
            more = f" ({suppressed} more failures since the last report)" if suppressed else ""
            self.logger.warning(f"frame{stamp} failed ({failed} so far): {text}{more}")

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
    def _rate(self, times: Sequence[float], now: float, horizon: float = 10.0) -> float:
        """Events per second over the recent ``horizon`` (0 with fewer than two)."""
        recent = [t for t in times if now - t <= horizon]
        if len(recent) < 2:
            return 0.0
        span = max(now, recent[-1]) - recent[0]
        return (len(recent) - 1) / span if span > 0 else 0.0

    def _planning_values(self) -> tuple[list[tuple[str, str]], str]:
        """Diagnostic key/values of tracking and distance, and a problem to warn about ("")."""
        from dds_perception.detection.ground_plane import REASONS

        params = self.params
        source = self.default_source
        with self._plan_lock:
            trackers = list(self._trackers.values())
            active = sum(t.num_tracked for t in trackers)
            lost = sum(t.num_lost for t in trackers)
            issued = sum(t.next_id - 1 for t in trackers)
        with self._lock:
            intrinsics = self._cameras.get(source)
            error = self._camera_errors.get(source, "")
            received = self.camera_info_received
            counts = dict(self.distance_counts)
            ignored = self.frames_ignored
            processed = self.counters.processed
        topic = params.resolved_camera_info_topic
        if intrinsics is not None:
            camera = (
                f"ok: {intrinsics.width}x{intrinsics.height}, fx {intrinsics.fx:.1f}, "
                f"fy {intrinsics.fy:.1f}"
            )
        elif error:
            camera = f"invalid: {error}"
        else:
            camera = f"none received on {topic}"
        problem = ""
        if params.camera_height > 0 and intrinsics is None and processed:
            problem = f"no usable CameraInfo on {topic}: cars published without distance"
        values = [
            ("enabled", "true" if params.enable else "false"),
            ("frames_ignored_disabled", str(ignored)),
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

    def diagnostics(self) -> DiagnosticReport:
        """Level, message and key/values for diagnostics (design.md section 7).

        Disabled (``enable`` false): OK, saying so. Otherwise ERROR when a frame of the recent
        window failed, WARN when the window's p95 end-to-end latency exceeds
        ``latency_budget_ms`` or when distances are asked for (``camera_height`` > 0) but no
        usable CameraInfo arrived, OK otherwise. Latencies in ms.
        """
        now = self.monotonic()
        with self._lock:
            counters = dataclasses.replace(self.counters)
            summaries = {name: stats.summary() for name, stats in self._stats.items()}
            outcomes = list(self._outcomes)
            rate = self._rate(list(self._done_times), now)
            input_rate = self._rate(list(self._arrival_times), now)
            last_error = self.last_error
            budget = self.params.latency_budget_ms
        values: list[tuple[str, str]] = [
            ("rate_hz", f"{rate:.2f}"),
            ("input_rate_hz", f"{input_rate:.2f}"),
        ]
        for name in (*STAGES, "age"):
            summary = summaries[name]
            for stat in STATS:
                text = f"{getattr(summary, stat):.2f}" if summary else "nan"
                values.append((f"{name}_ms_{stat}", text))
        failed_recent = outcomes.count(False)
        values += [
            ("frames_received", str(counters.received)),
            ("frames_processed", str(counters.processed)),
            ("frames_dropped", str(counters.dropped)),
            ("frames_failed", str(counters.failed)),
            ("failed_in_window", f"{failed_recent}/{len(outcomes)}"),
            ("device", self.device),
            ("latency_budget_ms", f"{budget:.1f}"),
            ("last_error", last_error),
        ]
        planning, problem = self._planning_values()
        values += planning
        e2e = summaries["end_to_end"]
        if not self.params.enable:
            level = OK
            message = "disabled (enable is false): not subscribed to images, no inference"
        elif failed_recent:
            level = ERROR
            message = f"{failed_recent} of the last {len(outcomes)} frames failed: {last_error}"
        elif e2e is not None and e2e.p95 > budget:
            level = WARN
            message = f"p95 end-to-end latency {e2e.p95:.1f} ms exceeds the {budget:.1f} ms budget"
        elif problem:
            level, message = WARN, problem
        elif e2e is None:
            level, message = OK, "waiting for images"
        else:
            level = OK
            message = f"{rate:.1f} Hz, p95 end-to-end {e2e.p95:.1f} ms"
        return DiagnosticReport(DIAGNOSTIC_TASK, level, message, self.device, values)

    def diagnostics_msg(self) -> Any:
        """The report as a diagnostic_msgs/DiagnosticArray (for runtimes without an updater).

        The status name is ``"<node>: <task>"``, as diagnostic_updater names it.
        """
        report = self.diagnostics()
        return diagnostic_array_msg(
            [dataclasses.replace(report, name=f"{self.node_name}: {report.name}")],
            make_header(self.classes, self.clock(), ""),
            self.classes,
        )
