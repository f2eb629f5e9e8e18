"""The ``dds_detector`` node's parameters: declaration, validation and parameter-file loading.

:class:`DetectorParams` is the single source of every parameter: its field metadata (description,
range, run-time changeable, choices) feeds the rclpy parameter descriptors, the documentation
table (``docs/node.md``, checked by ``test_ros_static``) and the validation messages, which name
the field and the value. :func:`load_params` reads the ``dds_detector: ros__parameters:`` block of
a ROS 2 parameter file (``config/detector.yaml`` by default) the way rcl does (wildcard blocks
first, nested names dotted); :func:`parse_overrides` turns ``name:=value`` command-line items into
typed values. Nothing here imports rclpy, torch or the message classes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dds_perception.utils.errors import DdsPerceptionError

NODE_NAME = "dds_detector"
RELIABILITIES = ("best_effort", "reliable")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
BACKENDS = ("torch", "onnxruntime", "tensorrt")  # dds_perception.deploy.backends.BACKENDS
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
    """Every parameter of the ``dds_detector`` node (docs/node.md), validated on creation.

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
    vote_iou: float = _param(
        -1.0,
        "box voting after NMS: each box becomes the score-weighted mean of the candidates that "
        "overlap it by at least this; 0 = off, -1 = the weights file's value",
        low=-1.0,
        high=1.0,
        runtime=True,
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
    image_topics: tuple[str, ...] = _param(
        (),
        "several cameras, one model: their sensor_msgs/Image topics (<topic>/compressed with "
        "use_compressed); each camera's newest frames run as one batch and its detections go "
        "to <camera>/detections beside its image topic (/cam_front/image_raw -> "
        "/cam_front/detections); empty = the one camera of image_topic",
    )
    reuse_freed_memory: bool = _param(
        True,
        "CPU: keep freed feature-map memory for the next frame instead of handing it back to "
        "the kernel (glibc, the node's whole process): faster frames, higher resident memory",
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
        if self.vote_iou != -1.0 and not 0.0 <= self.vote_iou <= 1.0:
            raise ParameterError(
                f"vote_iou {self.vote_iou}: must lie in [0, 1] (or -1: the weights file's)"
            )
        if self.max_detections <= 0:
            raise ParameterError(f"max_detections {self.max_detections}: must be positive")
        if self.latency_budget_ms <= 0:
            raise ParameterError(f"latency_budget_ms {self.latency_budget_ms}: must be positive")
        if self.stats_window < 2:
            raise ParameterError(f"stats_window {self.stats_window}: must be at least 2")
        for name in ("image_topic", "image_compressed_topic"):
            if not getattr(self, name).strip():
                raise ParameterError(f"{name}: must not be empty")
        self._check_cameras()
        if not np.isfinite(self.camera_height):
            raise ParameterError(f"camera_height {self.camera_height}: must be a finite number")
        for spec in dataclasses.fields(self):  # the descriptor ranges, as ROS enforces them
            low, high = spec.metadata["range"]
            value = getattr(self, spec.name)
            if low is not None and not low <= value <= high:
                raise ParameterError(f"{spec.name} {value}: must lie in [{low}, {high}]")

    def _check_cameras(self) -> None:
        """``image_topics``: no empty entry, no camera twice, one camera per namespace (their
        detections would share a topic), no single ``camera_info_topic`` for several."""
        topics = self.image_topics
        shown = list(topics)
        for index, topic in enumerate(topics, 1):
            if not topic:
                raise ParameterError(f"image_topics {shown}: entry {index} is empty")
        for topic in dict.fromkeys(topics):
            if topics.count(topic) > 1:
                raise ParameterError(
                    f"image_topics {shown}: {topic!r} is listed {topics.count(topic)} times"
                )
        published: dict[str, str] = {}
        for camera in self.cameras if topics else ():
            other = published.setdefault(camera.detections_topic, camera.image_topic)
            if other != camera.image_topic:
                raise ParameterError(
                    f"image_topics {shown}: {other!r} and {camera.image_topic!r} would both "
                    f"publish on {camera.detections_topic!r} (a camera's detections go beside "
                    "its image topic: one camera per namespace)"
                )
        if topics and self.camera_info_topic.strip():
            raise ParameterError(
                f"camera_info_topic {self.camera_info_topic!r}: names one camera's topic; with "
                "image_topics each camera's camera_info is the one beside its image topic"
            )

    @property
    def cameras(self) -> tuple[Camera, ...]:
        """The node's cameras: ``image_topic``'s one (publishing on ``detections`` and
        ``~/debug_image`` as always), or one per ``image_topics`` entry (publishing beside
        it)."""
        if not self.image_topics:
            return (
                Camera(
                    image_topic=self.image_topic,
                    subscribed_topic=self.subscribed_topic,
                    camera_info_topic=self.resolved_camera_info_topic,
                    detections_topic="detections",
                    debug_image_topic="~/debug_image",
                ),
            )
        return tuple(
            Camera(
                image_topic=topic,
                subscribed_topic=f"{topic}/compressed" if self.use_compressed else topic,
                camera_info_topic=sibling_topic(topic, "camera_info"),
                detections_topic=sibling_topic(topic, "detections"),
                debug_image_topic=sibling_topic(topic, "debug_image"),
            )
            for topic in self.image_topics
        )

    @property
    def subscribed_topics(self) -> tuple[str, ...]:
        """Every subscribed image topic (one per camera)."""
        return tuple(camera.subscribed_topic for camera in self.cameras)

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


@dataclass(frozen=True)
class Camera:
    """One camera of the node: where its frames come from and where its outputs go. Its
    ``subscribed_topic`` is its key (trackers, camera models, statistics are per camera)."""

    image_topic: str
    subscribed_topic: str  # image_topic, or its /compressed with use_compressed
    camera_info_topic: str
    detections_topic: str
    debug_image_topic: str

    @property
    def key(self) -> str:
        return self.subscribed_topic


def sibling_topic(image_topic: str, name: str) -> str:
    """The topic ``name`` in the namespace of a camera's image topic (image_transport's rule
    for camera_info): ``/cam_front/image_raw`` -> ``/cam_front/<name>``, ``image`` -> ``name``."""
    head, sep, _last = image_topic.strip().rstrip("/").rpartition("/")
    return f"{head}/{name}" if sep else name


def camera_info_topic_for(image_topic: str) -> str:
    """The CameraInfo topic of a camera's image topic (image_transport's rule: the same
    namespace): ``/camera/image_raw`` -> ``/camera/camera_info``, ``image`` -> ``camera_info``."""
    return sibling_topic(image_topic, "camera_info")


def _coerce(spec: dataclasses.Field, value: Any) -> Any:
    """Check a parameter's type (ints accepted for floats); ParameterError naming it otherwise."""
    if str(spec.type) == "tuple[str, ...]":  # a ROS string array: a list of topic names
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ParameterError(
                f"{spec.name} {value!r}: expected a list of strings, e.g. "
                "['/cam_front/image_raw', '/cam_rear/image_raw']"
            )
        return tuple(v.strip() for v in value)
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
