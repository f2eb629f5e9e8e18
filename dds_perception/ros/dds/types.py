"""IDL structs of the ROS 2 messages the DDS runtime exchanges, named as ROS 2 names them.

``rmw_cyclonedds_cpp`` maps a ROS 2 type ``pkg/msg/Type`` to the DDS type
``pkg::msg::dds_::Type_``; a struct here with that name and the ``.msg`` fields in order (ROS 2
``byte`` = IDL ``uint8``, ``T[]`` = ``sequence[T]``, ``T[N]`` = ``array[T, N]``) serialises to
the bytes ROS 2 puts on the wire (checked against rosbags for every type by
``test/test_dds_types.py``). The definitions follow Humble/Jazzy: vision_msgs 4.x.

``uint8[]`` payloads (``Image.data``, ``CompressedImage.data``) use the fast path of design.md
section 12: the struct keeps ``sequence[uint8]`` (so the XTypes type object, which Cyclone needs
to create a topic, is built) and :func:`install_bytes_fast_path` swaps that member's serialiser
for the library's ``BytesMachine``: samples then carry ``bytes`` (~5 ms instead of ~67 ms and a
Python list for a 1242x375 rgb8 frame), the wire bytes unchanged. ``BytesMachine`` and
``__idl__.v1_machine`` are private to cyclonedds, which is why setup.py pins its version and a test
fails when the swap stops working.
"""

# No ``from __future__ import annotations``: cyclonedds resolves the field annotations itself.
from dataclasses import dataclass, field

from dds_perception.ros.dds import require

require()

from cyclonedds.idl import IdlStruct  # noqa: E402
from cyclonedds.idl.types import (  # noqa: E402
    array,
    float32,
    float64,
    int32,
    int64,
    sequence,
    uint8,
    uint16,
    uint32,
    uint64,
)


def _ros(pkg: str, name: str) -> str:
    """The DDS type name rmw_cyclonedds_cpp gives ``pkg/msg/name``."""
    return f"{pkg}::msg::dds_::{name}_"


def _zeros9() -> list[float]:
    return [0.0] * 9


def _zeros12() -> list[float]:
    return [0.0] * 12


def _zeros36() -> list[float]:
    return [0.0] * 36


# ----------------------------------------------------------------------------- builtin / std


@dataclass
class Time(IdlStruct, typename=_ros("builtin_interfaces", "Time")):
    sec: int32 = 0
    nanosec: uint32 = 0


@dataclass
class Header(IdlStruct, typename=_ros("std_msgs", "Header")):
    stamp: Time = field(default_factory=Time)
    frame_id: str = ""


@dataclass
class String(IdlStruct, typename=_ros("std_msgs", "String")):
    data: str = ""


# ----------------------------------------------------------------------------- sensor_msgs


@dataclass
class Image(IdlStruct, typename=_ros("sensor_msgs", "Image")):
    header: Header = field(default_factory=Header)
    height: uint32 = 0
    width: uint32 = 0
    encoding: str = ""
    is_bigendian: uint8 = 0
    step: uint32 = 0
    data: sequence[uint8] = b""  # bytes once install_bytes_fast_path() ran


@dataclass
class CompressedImage(IdlStruct, typename=_ros("sensor_msgs", "CompressedImage")):
    header: Header = field(default_factory=Header)
    format: str = ""
    data: sequence[uint8] = b""  # bytes once install_bytes_fast_path() ran


@dataclass
class RegionOfInterest(IdlStruct, typename=_ros("sensor_msgs", "RegionOfInterest")):
    x_offset: uint32 = 0
    y_offset: uint32 = 0
    height: uint32 = 0
    width: uint32 = 0
    do_rectify: bool = False


@dataclass
class CameraInfo(IdlStruct, typename=_ros("sensor_msgs", "CameraInfo")):
    header: Header = field(default_factory=Header)
    height: uint32 = 0
    width: uint32 = 0
    distortion_model: str = ""
    d: sequence[float64] = field(default_factory=list)
    k: array[float64, 9] = field(default_factory=_zeros9)
    r: array[float64, 9] = field(default_factory=_zeros9)
    p: array[float64, 12] = field(default_factory=_zeros12)
    binning_x: uint32 = 0
    binning_y: uint32 = 0
    roi: RegionOfInterest = field(default_factory=RegionOfInterest)


# ----------------------------------------------------------------------------- geometry_msgs


@dataclass
class Point(IdlStruct, typename=_ros("geometry_msgs", "Point")):
    x: float64 = 0.0
    y: float64 = 0.0
    z: float64 = 0.0


@dataclass
class Quaternion(IdlStruct, typename=_ros("geometry_msgs", "Quaternion")):
    x: float64 = 0.0
    y: float64 = 0.0
    z: float64 = 0.0
    w: float64 = 1.0


@dataclass
class Pose(IdlStruct, typename=_ros("geometry_msgs", "Pose")):
    position: Point = field(default_factory=Point)
    orientation: Quaternion = field(default_factory=Quaternion)


@dataclass
class PoseWithCovariance(IdlStruct, typename=_ros("geometry_msgs", "PoseWithCovariance")):
    pose: Pose = field(default_factory=Pose)
    covariance: array[float64, 36] = field(default_factory=_zeros36)


# ----------------------------------------------------------------------------- vision_msgs 4.x


@dataclass
class Point2D(IdlStruct, typename=_ros("vision_msgs", "Point2D")):
    x: float64 = 0.0
    y: float64 = 0.0


@dataclass
class Pose2D(IdlStruct, typename=_ros("vision_msgs", "Pose2D")):
    position: Point2D = field(default_factory=Point2D)
    theta: float64 = 0.0


@dataclass
class BoundingBox2D(IdlStruct, typename=_ros("vision_msgs", "BoundingBox2D")):
    center: Pose2D = field(default_factory=Pose2D)
    size_x: float64 = 0.0
    size_y: float64 = 0.0


@dataclass
class ObjectHypothesis(IdlStruct, typename=_ros("vision_msgs", "ObjectHypothesis")):
    class_id: str = ""
    score: float64 = 0.0


@dataclass
class ObjectHypothesisWithPose(
    IdlStruct, typename=_ros("vision_msgs", "ObjectHypothesisWithPose")
):
    hypothesis: ObjectHypothesis = field(default_factory=ObjectHypothesis)
    pose: PoseWithCovariance = field(default_factory=PoseWithCovariance)


@dataclass
class Detection2D(IdlStruct, typename=_ros("vision_msgs", "Detection2D")):
    header: Header = field(default_factory=Header)
    results: sequence[ObjectHypothesisWithPose] = field(default_factory=list)
    bbox: BoundingBox2D = field(default_factory=BoundingBox2D)
    id: str = ""


@dataclass
class Detection2DArray(IdlStruct, typename=_ros("vision_msgs", "Detection2DArray")):
    header: Header = field(default_factory=Header)
    detections: sequence[Detection2D] = field(default_factory=list)


@dataclass
class VisionClass(IdlStruct, typename=_ros("vision_msgs", "VisionClass")):
    class_id: uint16 = 0
    class_name: str = ""


@dataclass
class LabelInfo(IdlStruct, typename=_ros("vision_msgs", "LabelInfo")):
    header: Header = field(default_factory=Header)
    class_map: sequence[VisionClass] = field(default_factory=list)
    threshold: float32 = 0.0


# ----------------------------------------------------------------------------- diagnostic_msgs


@dataclass
class KeyValue(IdlStruct, typename=_ros("diagnostic_msgs", "KeyValue")):
    key: str = ""
    value: str = ""


@dataclass
class DiagnosticStatus(IdlStruct, typename=_ros("diagnostic_msgs", "DiagnosticStatus")):
    level: uint8 = 0  # ROS 2 ``byte``: OK 0, WARN 1, ERROR 2, STALE 3
    name: str = ""
    message: str = ""
    hardware_id: str = ""
    values: sequence[KeyValue] = field(default_factory=list)


@dataclass
class DiagnosticArray(IdlStruct, typename=_ros("diagnostic_msgs", "DiagnosticArray")):
    header: Header = field(default_factory=Header)
    status: sequence[DiagnosticStatus] = field(default_factory=list)


# ----------------------------------------------------------------------------- services
#
# rmw_cyclonedds_cpp sends a service request as the request header it calls
# ``cdds_request_header_t`` -- the client's 64-bit writer id and a 64-bit sequence number --
# followed by the request's fields, in one CDR stream of the type ``pkg::srv::dds_::X_Request_``
# on ``rq/<service>Request``; the server answers with the same header and the response's
# fields (``X_Response_`` on ``rr/<service>Reply``). The header is therefore written here as the
# first two members of each struct.


def _ros_srv(pkg: str, name: str) -> str:
    """The DDS type name rmw_cyclonedds_cpp gives a service's request/response ``name``."""
    return f"{pkg}::srv::dds_::{name}_"


@dataclass
class SetBoolRequest(IdlStruct, typename=_ros_srv("std_srvs", "SetBool_Request")):
    client_guid: uint64 = 0
    sequence_number: int64 = 0
    data: bool = False


@dataclass
class SetBoolResponse(IdlStruct, typename=_ros_srv("std_srvs", "SetBool_Response")):
    client_guid: uint64 = 0
    sequence_number: int64 = 0
    success: bool = False
    message: str = ""


#: ROS 2 service type -> (request struct, response struct), each with the request header.
SERVICE_TYPES: dict[str, tuple[type[IdlStruct], type[IdlStruct]]] = {
    "std_srvs/srv/SetBool": (SetBoolRequest, SetBoolResponse),
}


def service_types(srvtype: str) -> tuple[type[IdlStruct], type[IdlStruct]]:
    """(request, response) IDL structs of a ROS 2 service type; DdsError if unknown."""
    from dds_perception.ros.dds import DdsError

    try:
        return SERVICE_TYPES[srvtype]
    except KeyError as error:
        raise DdsError(
            f"no DDS service type for {srvtype!r}; known: {', '.join(sorted(SERVICE_TYPES))}"
        ) from error


# ----------------------------------------------------------------------------- registry

#: ROS 2 type name (rosbags spelling) -> IDL struct.
IDL_TYPES: dict[str, type[IdlStruct]] = {
    "builtin_interfaces/msg/Time": Time,
    "std_msgs/msg/Header": Header,
    "std_msgs/msg/String": String,
    "sensor_msgs/msg/Image": Image,
    "sensor_msgs/msg/CompressedImage": CompressedImage,
    "sensor_msgs/msg/RegionOfInterest": RegionOfInterest,
    "sensor_msgs/msg/CameraInfo": CameraInfo,
    "geometry_msgs/msg/Point": Point,
    "geometry_msgs/msg/Quaternion": Quaternion,
    "geometry_msgs/msg/Pose": Pose,
    "geometry_msgs/msg/PoseWithCovariance": PoseWithCovariance,
    "vision_msgs/msg/Point2D": Point2D,
    "vision_msgs/msg/Pose2D": Pose2D,
    "vision_msgs/msg/BoundingBox2D": BoundingBox2D,
    "vision_msgs/msg/ObjectHypothesis": ObjectHypothesis,
    "vision_msgs/msg/ObjectHypothesisWithPose": ObjectHypothesisWithPose,
    "vision_msgs/msg/Detection2D": Detection2D,
    "vision_msgs/msg/Detection2DArray": Detection2DArray,
    "vision_msgs/msg/VisionClass": VisionClass,
    "vision_msgs/msg/LabelInfo": LabelInfo,
    "diagnostic_msgs/msg/KeyValue": KeyValue,
    "diagnostic_msgs/msg/DiagnosticStatus": DiagnosticStatus,
    "diagnostic_msgs/msg/DiagnosticArray": DiagnosticArray,
}

#: The structs whose ``data`` member carries a ``uint8[]`` payload.
BYTES_FIELDS: dict[type[IdlStruct], str] = {Image: "data", CompressedImage: "data"}


def dds_type_name(msgtype: str) -> str:
    """``sensor_msgs/msg/Image`` -> ``sensor_msgs::msg::dds_::Image_`` (rmw_cyclonedds_cpp)."""
    pkg, kind, name = msgtype.split("/")
    return f"{pkg}::{kind}::dds_::{name}_"


def idl_type(msgtype: str) -> type[IdlStruct]:
    """The IDL struct of a ROS 2 type name (``sensor_msgs/msg/Image``); DdsError if unknown."""
    from dds_perception.ros.dds import DdsError

    try:
        return IDL_TYPES[msgtype]
    except KeyError as error:
        raise DdsError(
            f"no DDS type for {msgtype!r}; known: {', '.join(sorted(IDL_TYPES))}"
        ) from error


def install_bytes_fast_path(cls: type[IdlStruct], member: str = "data") -> None:
    """Serialise ``cls.member`` (``sequence[uint8]``) as ``bytes`` with cyclonedds' BytesMachine.

    Idempotent. Raises :class:`~dds_perception.ros.dds.DdsError` when the private serialiser
    layout it relies on has changed (then pin cyclonedds back to the version in setup.py).
    """
    from dds_perception.ros.dds import DdsError

    try:
        from cyclonedds.idl._machinery import (
            BytesMachine,
            PlainCdrV2SequenceOfPrimitiveMachine,
            SequenceMachine,
        )

        expected = (SequenceMachine, PlainCdrV2SequenceOfPrimitiveMachine)

        idl = cls.__idl__
        idl.populate()
        for version in ("v1_machine", "v2_machine"):
            machine = getattr(idl, version, None)
            if machine is None:
                continue
            members = machine.members_machines
            current = members[member]
            if isinstance(current, BytesMachine):
                continue
            if not isinstance(current, expected):
                raise TypeError(
                    f"{type(current).__name__} where a sequence serialiser was expected"
                )
            members[member] = BytesMachine()
    except (ImportError, AttributeError, KeyError, TypeError) as error:
        raise DdsError(
            f"the uint8[] fast path for {cls.__name__}.{member} no longer fits this cyclonedds "
            f"({type(error).__name__}: {error}); install the pinned version: "
            "pip install 'dds_perception[dds]'"
        ) from error


for _cls, _member in BYTES_FIELDS.items():
    install_bytes_fast_path(_cls, _member)
