"""ROS 2 messages without ROS 2: a rosbags typestore with vision_msgs, and the conversions.

Two sources of message classes, one :class:`MessageClasses` bundle:

- :func:`rosbags_classes` builds the classes from a ``rosbags`` typestore (Humble by default, Jazzy
  selectable) into which the vision_msgs 4.x definitions shipped in ``ros/msg/*.msg`` are
  registered; they serialise to the same CDR bytes (and the same RIHS01 type hashes) as ROS 2.
- :func:`ros_classes` takes rclpy's generated classes on a ROS machine (it imports the message
  packages, never rclpy itself).

Every conversion here (detections, images, camera info, label info) is written once against the
bundle it is given and passes every field by keyword, so the node fills rclpy messages and the bag
tools fill rosbags messages with the same code. Foxy's vision_msgs 2.x layout
(``results[].id/score``, ``bbox.center.x/y``, ``source_img``) is recognised by the fields the
given classes have.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Protocol

import cv2
import numpy as np

from dds_perception.data.images import (
    COMPRESSED_ENCODINGS,
    RAW_ENCODINGS,
    ImageDecodeError,
    to_rgb,
)
from dds_perception.utils.errors import DdsPerceptionError

# vision_msgs 4.x types registered from ros/msg/*.msg (in dependency order for readability).
VISION_MSGS = (
    "Point2D",
    "Pose2D",
    "BoundingBox2D",
    "ObjectHypothesis",
    "ObjectHypothesisWithPose",
    "Detection2D",
    "Detection2DArray",
    "VisionClass",
    "LabelInfo",
)

STORES = ("humble", "jazzy")

# The type name of every class in the bundle (rosbags naming).
MSGTYPES: dict[str, str] = {
    "Time": "builtin_interfaces/msg/Time",
    "Header": "std_msgs/msg/Header",
    "String": "std_msgs/msg/String",
    "Image": "sensor_msgs/msg/Image",
    "CompressedImage": "sensor_msgs/msg/CompressedImage",
    "CameraInfo": "sensor_msgs/msg/CameraInfo",
    "RegionOfInterest": "sensor_msgs/msg/RegionOfInterest",
    "Point": "geometry_msgs/msg/Point",
    "Quaternion": "geometry_msgs/msg/Quaternion",
    "Pose": "geometry_msgs/msg/Pose",
    "PoseWithCovariance": "geometry_msgs/msg/PoseWithCovariance",
    **{name: f"vision_msgs/msg/{name}" for name in VISION_MSGS},
    "DiagnosticArray": "diagnostic_msgs/msg/DiagnosticArray",
    "DiagnosticStatus": "diagnostic_msgs/msg/DiagnosticStatus",
    "KeyValue": "diagnostic_msgs/msg/KeyValue",
}


class MessageError(DdsPerceptionError, ValueError):
    """A message cannot be built or read; the text names the message type and field."""


class DetectionsLike(Protocol):
    """What :func:`detections_to_msg` needs: the pipeline's ``Detections`` satisfies it."""

    boxes: Any  # (N, 4) x1, y1, x2, y2 in source pixels
    scores: Any  # (N,)
    class_names: Sequence[str]


@dataclass(frozen=True)
class MessageClasses:
    """The message classes the conversions fill, from rosbags or from rclpy.

    ``backend`` is ``"rosbags"`` or ``"rclpy"``: it decides only how array fields are passed
    (numpy arrays for rosbags, ``array.array`` for rclpy's unbounded sequences). ``typestore`` is
    the rosbags typestore (None for rclpy). Classes a distribution lacks (Foxy has no
    ``vision_msgs/Point2D``, ``LabelInfo``, ``VisionClass``) are None.
    """

    backend: str
    Time: type
    Header: type
    String: type
    Image: type
    CompressedImage: type
    CameraInfo: type
    RegionOfInterest: type
    Point: type
    Quaternion: type
    Pose: type
    PoseWithCovariance: type
    Detection2DArray: type
    Detection2D: type
    ObjectHypothesisWithPose: type
    ObjectHypothesis: type | None
    BoundingBox2D: type
    Pose2D: type
    Point2D: type | None
    LabelInfo: type | None
    VisionClass: type | None
    DiagnosticArray: type
    DiagnosticStatus: type
    KeyValue: type
    typestore: Any = None

    def uint8_array(self, data: bytes | bytearray | memoryview | np.ndarray) -> Any:
        """Value for a ``uint8[]`` field (Image.data, CompressedImage.data)."""
        if isinstance(data, np.ndarray):
            flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        else:
            flat = np.frombuffer(data, dtype=np.uint8)
        if self.backend == "rclpy":
            return array.array("B", flat.tobytes())
        return flat

    def float64_sequence(self, values: Sequence[float] | np.ndarray) -> Any:
        """Value for an unbounded ``float64[]`` field (CameraInfo.d)."""
        if self.backend == "rclpy":
            return array.array("d", [float(v) for v in np.asarray(values).reshape(-1)])
        return np.asarray(values, dtype=np.float64).reshape(-1)

    def float64_fixed(self, values: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
        """Value for a fixed ``float64[size]`` field (numpy for both backends)."""
        out = np.asarray(values, dtype=np.float64).reshape(-1)
        if out.size != size:
            raise MessageError(f"expected {size} float64 values, got {out.size}")
        return out.copy()

    def msgtype(self, msg: object) -> str:
        """The ROS 2 type name of a message instance, e.g. ``sensor_msgs/msg/Image``."""
        typename = getattr(type(msg), "__msgtype__", None)  # rosbags classes carry it
        if isinstance(typename, str):
            return typename
        for name, typename in MSGTYPES.items():
            cls = getattr(self, name, None)
            if cls is not None and isinstance(msg, cls):
                return typename
        raise MessageError(f"{type(msg).__name__} is not a message class of this bundle")

    def serialize(self, msg: object) -> bytes:
        """CDR bytes of a rosbags message (rosbags backend only)."""
        if self.typestore is None:
            raise MessageError("serialize() needs the rosbags backend (rclpy serialises itself)")
        return bytes(self.typestore.serialize_cdr(msg, self.msgtype(msg)))

    def deserialize(self, data: bytes | memoryview, msgtype: str) -> Any:
        """A rosbags message from CDR bytes (rosbags backend only)."""
        if self.typestore is None:
            raise MessageError("deserialize() needs the rosbags backend")
        return self.typestore.deserialize_cdr(data, msgtype)


# --------------------------------------------------------------------------------------------
# Building the bundles


def _typesys() -> Any:
    """``rosbags.typesys``; a :class:`MessageError` with the install command without it (only
    the rosbags classes need it: bags, the Cyclone DDS runtime; never the rclpy node)."""
    try:
        import rosbags.typesys
    except ImportError as error:
        raise MessageError(
            f"the rosbags message classes need the rosbags package ({error}); "
            "pip install 'rosbags>=0.10,<0.12'"
        ) from error
    return rosbags.typesys


def vision_msgs_types() -> dict[str, Any]:
    """Parse the shipped vision_msgs 4.x ``.msg`` files into rosbags type definitions."""
    get_types_from_msg = _typesys().get_types_from_msg
    msg_dir = files("dds_perception.ros") / "msg"  # package data, also inside a wheel or zip
    types: dict[str, Any] = {}
    for name in VISION_MSGS:
        text = (msg_dir / f"{name}.msg").read_text(encoding="utf-8")
        types.update(get_types_from_msg(text, f"vision_msgs/msg/{name}"))
    return types


def _store_enum(store: Any) -> Any:
    Stores = _typesys().Stores
    if isinstance(store, Stores):
        return store
    key = str(store).lower().removeprefix("ros2_")
    if key not in STORES:
        raise MessageError(f"unknown ROS 2 store {store!r}; choose one of {', '.join(STORES)}")
    return Stores[f"ROS2_{key.upper()}"]


@functools.cache
def _typestore_cached(store: Any) -> Any:
    typestore = _typesys().get_typestore(store)
    typestore.register(vision_msgs_types())
    return typestore


def typestore(store: Any = "humble") -> Any:
    """A rosbags typestore (``humble`` default, ``jazzy``) with vision_msgs 4.x registered.

    The same typestore object is returned for the same store; treat it as read-only.
    """
    return _typestore_cached(_store_enum(store))


def classes_from_typestore(store: Any) -> MessageClasses:
    """A bundle of the classes of any rosbags typestore that holds vision_msgs.

    Used by :func:`rosbags_classes`; also accepts a typestore with Foxy's vision_msgs 2.x
    registered (then ``Point2D``, ``LabelInfo``, ``VisionClass`` and ``ObjectHypothesis`` may be
    None and ``Pose2D`` is geometry_msgs/Pose2D, as on a Foxy machine).
    """
    types = store.types
    missing = [t for t in ("vision_msgs/msg/Detection2DArray",) if t not in types]
    if missing:
        raise MessageError(f"typestore lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    for name, typename in MSGTYPES.items():
        values[name] = types.get(typename)
    center = dict(store.fielddefs["vision_msgs/msg/BoundingBox2D"][1])["center"][1]
    if center != "vision_msgs/msg/Pose2D":  # vision_msgs < 4: a geometry_msgs/Pose2D
        values["Pose2D"] = types[center]
        values["Point2D"] = None
    return MessageClasses(backend="rosbags", typestore=store, **values)


def rosbags_classes(store: Any = "humble") -> MessageClasses:
    """The bundle built from :func:`typestore` (``humble`` default, ``jazzy`` selectable)."""
    return classes_from_typestore(typestore(store))


def ros_classes() -> MessageClasses:
    """The bundle built from rclpy's generated message modules (on a ROS 2 machine only).

    Imports ``std_msgs.msg``, ``sensor_msgs.msg``, ``vision_msgs.msg`` and ``diagnostic_msgs.msg``
    (never rclpy); classes of other packages are taken from the fields that hold them.
    """
    import diagnostic_msgs.msg as diagnostic_msgs
    import sensor_msgs.msg as sensor_msgs
    import std_msgs.msg as std_msgs
    import vision_msgs.msg as vision_msgs

    pose_with_cov = type(vision_msgs.ObjectHypothesisWithPose().pose)
    pose = type(pose_with_cov().pose)
    return MessageClasses(
        backend="rclpy",
        Time=type(std_msgs.Header().stamp),
        Header=std_msgs.Header,
        String=std_msgs.String,
        Image=sensor_msgs.Image,
        CompressedImage=sensor_msgs.CompressedImage,
        CameraInfo=sensor_msgs.CameraInfo,
        RegionOfInterest=sensor_msgs.RegionOfInterest,
        Point=type(pose().position),
        Quaternion=type(pose().orientation),
        Pose=pose,
        PoseWithCovariance=pose_with_cov,
        Detection2DArray=vision_msgs.Detection2DArray,
        Detection2D=vision_msgs.Detection2D,
        ObjectHypothesisWithPose=vision_msgs.ObjectHypothesisWithPose,
        ObjectHypothesis=getattr(vision_msgs, "ObjectHypothesis", None),
        BoundingBox2D=vision_msgs.BoundingBox2D,
        Pose2D=type(vision_msgs.BoundingBox2D().center),
        Point2D=getattr(vision_msgs, "Point2D", None),
        LabelInfo=getattr(vision_msgs, "LabelInfo", None),
        VisionClass=getattr(vision_msgs, "VisionClass", None),
        DiagnosticArray=diagnostic_msgs.DiagnosticArray,
        DiagnosticStatus=diagnostic_msgs.DiagnosticStatus,
        KeyValue=diagnostic_msgs.KeyValue,
        typestore=None,
    )


def field_names(cls: type) -> tuple[str, ...]:
    """Field names of a message class (rosbags dataclass or rclpy-generated class)."""
    if dataclasses.is_dataclass(cls):
        # rosbags lists constants (e.g. DiagnosticStatus.OK) as ClassVar-typed fields: skip them
        return tuple(
            f.name
            for f in dataclasses.fields(cls)
            if not str(f.type).startswith("ClassVar") and not f.name.startswith("__")
        )
    getter = getattr(cls, "get_fields_and_field_types", None)
    if getter is not None:
        return tuple(getter())
    raise MessageError(f"{cls!r} is not a message class")


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    """Instantiate ``cls`` with the values of its fields; fields it lacks are dropped.

    Every field the class has must be in ``values`` (so rosbags' dataclasses, which have no
    defaults, and rclpy classes are filled the same way).
    """
    names = field_names(cls)
    missing = [n for n in names if n not in values]
    if missing:
        raise MessageError(f"no value for field(s) {', '.join(missing)} of {cls.__name__}")
    return cls(**{n: values[n] for n in names})


# --------------------------------------------------------------------------------------------
# Headers and times


def time_msg(stamp_ns: int, classes: MessageClasses) -> Any:
    """builtin_interfaces/Time for a stamp in nanoseconds."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise MessageError(f"negative stamp {stamp_ns} ns")
    return classes.Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def header_msg(stamp_ns: int, frame_id: str, classes: MessageClasses) -> Any:
    """std_msgs/Header with ``stamp`` (ns) and ``frame_id``."""
    return classes.Header(stamp=time_msg(stamp_ns, classes), frame_id=str(frame_id))


def stamp_ns(header_or_time: Any) -> int:
    """Nanoseconds of a Header's stamp or of a Time."""
    t = getattr(header_or_time, "stamp", header_or_time)
    return int(t.sec) * 1_000_000_000 + int(t.nanosec)


def copy_header(header: Any, classes: MessageClasses) -> Any:
    """A new Header of the bundle's class with the same stamp and frame_id."""
    return header_msg(stamp_ns(header), header.frame_id, classes)


def string_msg(text: str, classes: MessageClasses) -> Any:
    """std_msgs/String."""
    return classes.String(data=str(text))


# --------------------------------------------------------------------------------------------
# Detections <-> vision_msgs/Detection2DArray


@dataclass(frozen=True)
class MsgDetections:
    """Detections read back from a Detection2DArray (boxes x1, y1, x2, y2 in image pixels)."""

    boxes: np.ndarray  # float32 (N, 4)
    scores: np.ndarray  # float32 (N,)
    class_names: list[str]
    stamp_ns: int
    frame_id: str
    ids: list[str] = dataclasses.field(default_factory=list)  # Detection2D.id ("" = none)
    # results[best].pose.pose.position (N, 3), metres; all zero where the node had no distance
    positions: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3)))

    def __len__(self) -> int:
        return len(self.class_names)


_ZEROS36 = np.zeros(36)


def _pose_with_covariance(
    classes: MessageClasses,
    position: Sequence[float] | None = None,
    covariance: np.ndarray | None = None,
) -> Any:
    """PoseWithCovariance at ``position`` (x, y, z; None = the origin, as "no estimate") with
    identity orientation and ``covariance`` (36 row-major values; None = zeros)."""
    x, y, z = (0.0, 0.0, 0.0) if position is None else (float(v) for v in position)
    point = classes.Point(x=x, y=y, z=z)
    quaternion = classes.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)
    pose = classes.Pose(position=point, orientation=quaternion)
    values = _ZEROS36 if covariance is None else covariance
    return classes.PoseWithCovariance(pose=pose, covariance=classes.float64_fixed(values, 36))


def _identity_pose_with_covariance(classes: MessageClasses) -> Any:
    return _pose_with_covariance(classes)


def _hypothesis(class_name: str, score: float, classes: MessageClasses, pose: Any = None) -> Any:
    values: dict[str, Any] = {"pose": pose or _identity_pose_with_covariance(classes)}
    if "hypothesis" in field_names(classes.ObjectHypothesisWithPose):  # vision_msgs >= 3
        values["hypothesis"] = classes.ObjectHypothesis(class_id=class_name, score=score)
    else:  # Foxy, vision_msgs 2.x: id and score directly
        values["id"] = class_name
        values["score"] = score
    return _build(classes.ObjectHypothesisWithPose, values)


def _center(cx: float, cy: float, classes: MessageClasses) -> Any:
    if "position" in field_names(classes.Pose2D):  # vision_msgs 4.x: Point2D position + theta
        return classes.Pose2D(position=classes.Point2D(x=cx, y=cy), theta=0.0)
    return classes.Pose2D(x=cx, y=cy, theta=0.0)  # geometry_msgs/Pose2D (vision_msgs < 4)


def empty_image_msg(header: Any, classes: MessageClasses) -> Any:
    """A 0x0 sensor_msgs/Image (Foxy's Detection2D.source_img when no crop is attached)."""
    return classes.Image(
        header=copy_header(header, classes),
        height=0,
        width=0,
        encoding="",
        is_bigendian=0,
        step=0,
        data=classes.uint8_array(b""),
    )


def detections_to_msg(
    detections: DetectionsLike,
    header: Any,
    classes: MessageClasses,
    *,
    ids: Sequence[str] | None = None,
    positions: np.ndarray | None = None,
    covariances: np.ndarray | None = None,
) -> Any:
    """vision_msgs/Detection2DArray of ``detections`` in the image with ``header``.

    The array's header and every detection's header carry the image's stamp and frame_id.
    ``results[0].hypothesis.class_id`` is the class name, ``score`` in [0, 1] (clipped), the box
    centre and size are in source-image pixels, ``theta`` is 0.

    ``ids`` (one string per detection, "" = none) fill ``Detection2D.id`` (tracking; Foxy's
    layout also gets ``tracking_id`` and ``is_tracking``); without them ``id`` is empty.
    ``positions`` (N x 3, metres in the camera optical frame; a NaN row = no estimate) fill
    ``results[0].pose.pose.position`` and ``covariances`` (N x 36 row-major, or N x 6 x 6) its
    covariance; a detection without an estimate keeps the zero position and covariance.
    """
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    names = list(detections.class_names)
    if not (len(boxes) == len(scores) == len(names)):
        raise MessageError(
            f"detections disagree in length: {len(boxes)} boxes, {len(scores)} scores, "
            f"{len(names)} class names"
        )
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise MessageError("detections contain non-finite boxes or scores")
    count = len(names)
    if ids is not None and len(ids) != count:
        raise MessageError(f"{len(ids)} ids for {count} detections")
    if positions is not None:
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if len(positions) != count:
            raise MessageError(f"{len(positions)} positions for {count} detections")
        covariances = (
            np.zeros((count, 36))
            if covariances is None
            else np.asarray(covariances, dtype=np.float64).reshape(count, 36)
        )
    det_fields = field_names(classes.Detection2D)
    items = []
    for index, ((x1, y1, x2, y2), score, name) in enumerate(
        zip(boxes.tolist(), scores.tolist(), names, strict=True)
    ):
        bbox = classes.BoundingBox2D(
            center=_center((x1 + x2) / 2.0, (y1 + y2) / 2.0, classes),
            size_x=max(0.0, x2 - x1),
            size_y=max(0.0, y2 - y1),
        )
        pose = None
        if positions is not None and np.isfinite(positions[index]).all():
            cov = covariances[index]
            pose = _pose_with_covariance(
                classes, positions[index], cov if np.isfinite(cov).all() else None
            )
        track_id = "" if ids is None else str(ids[index])
        values: dict[str, Any] = {
            "header": copy_header(header, classes),
            "results": [_hypothesis(str(name), min(1.0, max(0.0, score)), classes, pose)],
            "bbox": bbox,
            "id": track_id,
        }
        if "source_img" in det_fields:  # Foxy
            values.update(
                source_img=empty_image_msg(header, classes),
                is_tracking=bool(track_id),
                tracking_id=track_id,
            )
        items.append(_build(classes.Detection2D, values))
    return classes.Detection2DArray(header=copy_header(header, classes), detections=items)


def msg_to_detections(msg: Any) -> MsgDetections:
    """Boxes, scores and class names of a Detection2DArray (any vision_msgs layout).

    The best hypothesis (highest score) of each detection is taken; a rotated box becomes its
    axis-aligned envelope. A detection without results is an error naming its index.
    """
    boxes, scores, names, ids, positions = [], [], [], [], []
    for index, det in enumerate(msg.detections):
        if len(det.results) == 0:
            raise MessageError(f"Detection2DArray.detections[{index}] has no results")
        best = max(det.results, key=_result_score)
        hyp = getattr(best, "hypothesis", best)
        class_id = getattr(hyp, "class_id", None)
        if class_id is None:
            class_id = hyp.id
        center = det.bbox.center
        position = getattr(center, "position", center)
        cx, cy, theta = float(position.x), float(position.y), float(center.theta)
        sx, sy = float(det.bbox.size_x), float(det.bbox.size_y)
        c, s = abs(math.cos(theta)), abs(math.sin(theta))
        half_w, half_h = (c * sx + s * sy) / 2.0, (s * sx + c * sy) / 2.0
        boxes.append((cx - half_w, cy - half_h, cx + half_w, cy + half_h))
        scores.append(_result_score(best))
        names.append(str(class_id))
        ids.append(str(getattr(det, "id", "") or getattr(det, "tracking_id", "") or ""))
        point = best.pose.pose.position
        positions.append((float(point.x), float(point.y), float(point.z)))
    return MsgDetections(
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.asarray(scores, dtype=np.float32),
        class_names=names,
        stamp_ns=stamp_ns(msg.header),
        frame_id=str(msg.header.frame_id),
        ids=ids,
        positions=np.asarray(positions, dtype=np.float64).reshape(-1, 3),
    )


def _result_score(result: Any) -> float:
    return float(getattr(result, "hypothesis", result).score)


# --------------------------------------------------------------------------------------------
# Images


def is_compressed(msg: Any) -> bool:
    """True for sensor_msgs/CompressedImage (it has ``format``), False for Image."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """HxWx3 uint8 RGB from a sensor_msgs/Image (any encoding of design section 6, honouring
    ``step`` and ``is_bigendian``) or a sensor_msgs/CompressedImage (JPEG/PNG, e.g. format
    ``png`` or ``rgb8; jpeg compressed bgr8``). Raises :class:`ImageDecodeError` when the frame
    cannot be decoded (unsupported encoding, wrong step, truncated or empty buffer).
    """
    data, encoding, keywords = pipeline_args(msg)
    return to_rgb(data, encoding, **keywords)


def pipeline_args(msg: Any) -> tuple[np.ndarray, str, dict[str, Any]]:
    """``(buffer, encoding, keywords)`` to call the inference pipeline on an image message
    without decoding it here: ``pipeline(buffer, encoding, **keywords)``.

    The pipeline then decodes (and times the decode) itself: a raw Image goes in with its
    ``height``/``width``/``step``/``is_bigendian``, a CompressedImage as ``"compressed"`` bytes.
    """
    data = np.frombuffer(msg.data, dtype=np.uint8) if len(msg.data) else np.empty(0, np.uint8)
    if is_compressed(msg):
        if "compresseddepth" in str(msg.format).lower():
            raise ImageDecodeError(f"unsupported CompressedImage format {msg.format!r}")
        return data, "compressed", {}
    keywords = {
        "height": int(msg.height),
        "width": int(msg.width),
        "step": int(msg.step),
        "is_bigendian": bool(msg.is_bigendian),
    }
    return data, str(msg.encoding), keywords


def rgb_to_encoding(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """Convert an HxWx3 RGB array to the pixel layout of a raw ROS ``encoding``."""
    conversions = {
        "rgb8": None,
        "bgr8": cv2.COLOR_RGB2BGR,
        "rgba8": cv2.COLOR_RGB2RGBA,
        "bgra8": cv2.COLOR_RGB2BGRA,
        "mono8": cv2.COLOR_RGB2GRAY,
    }
    if encoding not in conversions:
        raise ImageDecodeError(
            f"cannot encode to {encoding!r}; raw encodings: {', '.join(RAW_ENCODINGS)}"
        )
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageDecodeError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    code = conversions[encoding]
    out = rgb if code is None else cv2.cvtColor(rgb, code)
    return np.ascontiguousarray(out.reshape(rgb.shape[0], rgb.shape[1], -1))


def rgb_to_image_msg(
    rgb: np.ndarray,
    header: Any,
    classes: MessageClasses,
    encoding: str = "rgb8",
    *,
    step: int | None = None,
) -> Any:
    """sensor_msgs/Image holding ``rgb`` in ``encoding`` (rgb8, bgr8, rgba8, bgra8, mono8).

    ``step`` (bytes per row) defaults to ``width * channels``; a larger value pads every row
    with zeros, as some camera drivers do.
    """
    pixels = rgb_to_encoding(rgb, encoding)
    height, width, channels = pixels.shape
    row = width * channels
    step = row if step is None else int(step)
    if step < row:
        raise MessageError(f"Image.step {step} < width*channels {row}")
    if step == row:
        data = pixels.reshape(-1)
    else:
        padded = np.zeros((height, step), dtype=np.uint8)
        padded[:, :row] = pixels.reshape(height, row)
        data = padded.reshape(-1)
    return classes.Image(
        header=copy_header(header, classes),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=classes.uint8_array(data),
    )


def compressed_image_msg(data: bytes, fmt: str, header: Any, classes: MessageClasses) -> Any:
    """sensor_msgs/CompressedImage carrying already-encoded bytes unchanged (e.g. a PNG file)."""
    fmt = str(fmt)
    if fmt.split(";")[-1].split()[0].lower() not in COMPRESSED_ENCODINGS:
        raise MessageError(f"CompressedImage.format {fmt!r} names no jpeg/png compression")
    return classes.CompressedImage(
        header=copy_header(header, classes), format=fmt, data=classes.uint8_array(data)
    )


def rgb_to_compressed_msg(
    rgb: np.ndarray, header: Any, classes: MessageClasses, fmt: str = "png"
) -> Any:
    """sensor_msgs/CompressedImage of an RGB array encoded as ``png`` or ``jpeg``."""
    ext = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}.get(fmt.lower())
    if ext is None:
        raise MessageError(f"unsupported compression {fmt!r}; use png or jpeg")
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise MessageError(f"cannot encode image of shape {np.shape(rgb)} as {fmt}")
    ros_fmt = f"rgb8; {'jpeg' if ext == '.jpg' else 'png'} compressed bgr8"
    return compressed_image_msg(buffer.tobytes(), ros_fmt, header, classes)


# --------------------------------------------------------------------------------------------
# Camera info, label info


def camera_info_msg(
    p2: np.ndarray, width: int, height: int, header: Any, classes: MessageClasses
) -> Any:
    """sensor_msgs/CameraInfo of a rectified KITTI camera from its 3x4 projection ``P2``.

    ``K`` is the left 3x3 block of ``P2``, ``R`` the identity, ``P = P2`` (its 4th column holds the
    baseline offset), distortion ``plumb_bob`` with five zeros (KITTI images are rectified).
    """
    p = np.asarray(p2, dtype=np.float64)
    if p.shape != (3, 4):
        raise MessageError(f"P2 must be 3x4, got shape {p.shape}")
    roi = classes.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return classes.CameraInfo(
        header=copy_header(header, classes),
        height=int(height),
        width=int(width),
        distortion_model="plumb_bob",
        d=classes.float64_sequence(np.zeros(5)),
        k=classes.float64_fixed(p[:, :3], 9),
        r=classes.float64_fixed(np.eye(3), 9),
        p=classes.float64_fixed(p, 12),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def camera_info_p2(msg: Any) -> np.ndarray:
    """The 3x4 projection matrix ``P`` of a CameraInfo."""
    return np.asarray(msg.p, dtype=np.float64).reshape(3, 4)


def label_info_msg(
    class_names: Sequence[str], header: Any, classes: MessageClasses, threshold: float = 0.0
) -> Any:
    """vision_msgs/LabelInfo mapping ids 0..N-1 to ``class_names`` (published once, latched)."""
    if classes.LabelInfo is None or classes.VisionClass is None:
        raise MessageError("these vision_msgs have no LabelInfo (vision_msgs < 4, e.g. Foxy)")
    if len(class_names) >= 65535:
        raise MessageError(f"{len(class_names)} classes do not fit LabelInfo's uint16 ids")
    class_map = [
        classes.VisionClass(class_id=i, class_name=str(name)) for i, name in enumerate(class_names)
    ]
    return classes.LabelInfo(
        header=copy_header(header, classes),
        class_map=class_map,
        threshold=float(np.float32(threshold)),  # a float32 field: hold what the wire holds
    )


# --------------------------------------------------------------------------------------------
# Inspection


def message_to_dict(msg: Any) -> Any:
    """A message as plain Python data: nested dicts, lists of floats/ints/str, ``bytes`` for
    ``uint8[]``. Works for rosbags, rclpy and ``mcap_ros2``-decoded messages alike, so messages
    of different libraries compare with ``==``.
    """
    if isinstance(msg, (str, bool, int, float)) or msg is None:
        return msg
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return bytes(msg)
    if isinstance(msg, np.ndarray):
        return msg.tobytes() if msg.dtype == np.uint8 else msg.tolist()
    if isinstance(msg, array.array):
        return msg.tobytes() if msg.typecode == "B" else msg.tolist()
    if isinstance(msg, np.generic):
        return msg.item()
    if isinstance(msg, (list, tuple)):
        return [message_to_dict(v) for v in msg]
    if dataclasses.is_dataclass(msg) or hasattr(type(msg), "get_fields_and_field_types"):
        names = field_names(type(msg))
    elif hasattr(type(msg), "__slots__"):  # mcap_ros2's decoded classes
        names = tuple(type(msg).__slots__)
    else:
        raise MessageError(f"cannot inspect {type(msg).__name__}")
    return {name: message_to_dict(getattr(msg, name)) for name in names}
