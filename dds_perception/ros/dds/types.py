"""IDL structs of the ROS 2 messages the DDS runtime exchanges, built from their definitions.

``rmw_cyclonedds_cpp`` maps a ROS 2 type ``pkg/msg/Type`` to the DDS type
``pkg::msg::dds_::Type_``, a struct with the ``.msg`` fields in order (ROS 2 ``byte`` and ``char``
= IDL ``uint8``, ``T[]`` = ``sequence<T>``, ``T[<=N]`` = ``sequence<T, N>``, ``T[N]`` =
``T[N]``). :func:`build_structs` builds those cyclonedds ``IdlStruct`` classes at import from the
field definitions of the rosbags typestore the rest of the runtime uses
(:func:`dds_perception.ros.messages.typestore`: ROS 2 Humble's standard messages plus the
vision_msgs 4.x ``.msg`` files shipped in ``ros/msg/``), so the structs cannot drift from the
definitions; their bytes equal ROS 2's on the wire (checked against rosbags for every type by
``test/test_dds_types.py``). Service requests and replies (``std_srvs/srv/SetBool``) are built
the same way from their ``.srv`` text, led by rmw_cyclonedds_cpp's request header.

``uint8[]`` payloads (``Image.data``, ``CompressedImage.data``) use a fast path: the struct keeps
``sequence[uint8]`` (so the XTypes type object, which Cyclone needs to create a topic, is built)
and :func:`install_bytes_fast_path` swaps that member's serialiser for the library's
``BytesMachine``: samples then carry ``bytes`` (~5 ms instead of ~67 ms and a Python list for a
1242x375 rgb8 frame), the wire bytes unchanged. ``BytesMachine`` and
``__idl__.v1_machine`` are private to cyclonedds, which is why setup.py pins its version and a test
fails when the swap stops working.
"""

# No ``from __future__ import annotations``: cyclonedds resolves the field annotations itself.
import dataclasses
import types
from collections.abc import Iterable
from typing import Any

from dds_perception.ros.dds import require

require()

from cyclonedds.idl import IdlStruct  # noqa: E402
from cyclonedds.idl.types import (  # noqa: E402
    array,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    sequence,
    uint8,
    uint16,
    uint32,
    uint64,
)

from dds_perception.ros import messages  # noqa: E402

# ROS 2 base type -> IDL type (rosidl's mapping; ``byte`` and ``char`` are octets)
BASE_TYPES: dict[str, Any] = {
    "bool": bool,
    "byte": uint8,
    "char": uint8,
    "int8": int8,
    "uint8": uint8,
    "int16": int16,
    "uint16": uint16,
    "int32": int32,
    "uint32": uint32,
    "int64": int64,
    "uint64": uint64,
    "float32": float32,
    "float64": float64,
    "string": str,
}
_BASE, _NAME, _ARRAY, _SEQUENCE = 1, 2, 3, 4  # rosbags.interfaces.Nodetype values
# rmw_cyclonedds_cpp's cdds_request_header_t, the first members of every request and reply
REQUEST_HEADER = "uint64 client_guid\nint64 sequence_number\n"
#: ROS 2 service type -> its .srv definition (request ``---`` response), as ROS 2 ships it.
SERVICE_DEFINITIONS = {
    "std_srvs/srv/SetBool": "bool data\n---\nbool success\nstring message\n",
}


def dds_type_name(msgtype: str) -> str:
    """``sensor_msgs/msg/Image`` -> ``sensor_msgs::msg::dds_::Image_`` (rmw_cyclonedds_cpp)."""
    pkg, kind, name = msgtype.split("/")
    return f"{pkg}::{kind}::dds_::{name}_"


class _Builder:
    """Turns typestore field definitions into IdlStruct dataclasses, nested types first."""

    def __init__(self, typestore: Any, typenames: dict[str, str] | None = None) -> None:
        self.typestore = typestore
        self.typenames = typenames or {}  # DDS type names that differ from the message rule
        self.structs: dict[str, type] = {}

    def struct(self, msgtype: str) -> type:
        if msgtype not in self.structs:
            try:
                fields = self.typestore.fielddefs[msgtype][1]
            except KeyError as error:
                from dds_perception.ros.dds import DdsError

                raise DdsError(f"no definition of {msgtype!r} to build its DDS type") from error
            members = [(name, *self.member(node)) for name, node in fields]
            typename = self.typenames.get(msgtype) or dds_type_name(msgtype)
            self.structs[msgtype] = _make_struct(msgtype, typename, members)
        return self.structs[msgtype]

    def member(self, node: tuple[int, Any]) -> tuple[Any, Any]:
        """(IDL annotation, dataclass default) of one field."""
        kind, detail = node
        if kind == _BASE:
            idl_type = _base_type(detail[0])
            return idl_type, _zero(idl_type)
        if kind == _NAME:
            cls = self.struct(detail)
            return cls, dataclasses.field(default_factory=cls)
        (elem_kind, elem_detail), size = detail
        elem, elem_default = self.member((elem_kind, elem_detail))
        if kind == _ARRAY:
            return array[elem, size], dataclasses.field(
                default_factory=_filled(elem, elem_default, size)
            )
        if elem is uint8 and not size:  # uint8[]: bytes once install_bytes_fast_path() ran
            return sequence[elem], b""
        return (sequence[elem, size] if size else sequence[elem]), dataclasses.field(
            default_factory=list
        )


def _base_type(name: str) -> Any:
    try:
        return BASE_TYPES[name]
    except KeyError as error:
        from dds_perception.ros.dds import DdsError

        raise DdsError(f"ROS 2 type {name!r} has no IDL mapping here") from error


def _zero(idl_type: Any) -> Any:
    if idl_type is bool:
        return False
    if idl_type is str:
        return ""
    return 0.0 if idl_type in (float32, float64) else 0


def _filled(elem: Any, default: Any, size: int) -> Any:
    if isinstance(default, dataclasses.Field):  # nested structs: one fresh instance each
        return lambda: [elem() for _ in range(size)]
    return lambda: [default] * size


def _make_struct(msgtype: str, typename: str, members: list[tuple[str, Any, Any]]) -> type:
    """A dataclass ``IdlStruct`` named as ``msgtype``'s class, with DDS type name ``typename``."""
    name = msgtype.rsplit("/", 1)[1]

    def body(namespace: dict[str, Any]) -> None:
        namespace["__module__"] = __name__
        namespace["__qualname__"] = name
        namespace["__doc__"] = f"``{msgtype}`` as rmw_cyclonedds_cpp puts it on the wire."
        namespace["__annotations__"].update({member: kind for member, kind, _ in members})
        namespace.update({member: default for member, _, default in members})

    cls = types.new_class(name, (IdlStruct,), {"typename": typename}, body)
    return dataclasses.dataclass(cls)


def build_structs(
    typestore: Any, msgtypes: Iterable[str], typenames: dict[str, str] | None = None
) -> dict[str, type]:
    """IDL structs of ``msgtypes`` and of every type they contain, from ``typestore``'s
    definitions: ROS 2 type name (rosbags spelling) -> struct. ``typenames`` overrides the DDS
    type name of some (default: :func:`dds_type_name`)."""
    builder = _Builder(typestore, typenames)
    for msgtype in msgtypes:
        builder.struct(msgtype)
    return builder.structs


def build_service_structs(
    definitions: dict[str, str], typestore: Any
) -> dict[str, tuple[type, type]]:
    """(request, reply) structs of each service ``pkg/srv/Name`` from its ``.srv`` text, each
    led by the request header (client writer id, sequence number) that rmw_cyclonedds_cpp puts
    in front of the fields, named ``pkg::srv::dds_::Name_Request_`` / ``..._Response_``."""
    from collections import ChainMap

    from rosbags.typesys import get_types_from_msg

    parsed: dict[str, Any] = {}
    typenames: dict[str, str] = {}  # parsed name -> pkg::srv::dds_::Name_Request_ / _Response_
    for srvtype, text in definitions.items():
        pkg, _, name = srvtype.split("/")
        request, _, response = text.partition("\n---\n")
        for part, fields in (("Request", request), ("Response", response)):
            msgtype = f"{pkg}/msg/{name}_{part}"  # rosbags parses message definitions only
            typenames[msgtype] = f"{pkg}::srv::dds_::{name}_{part}_"
            parsed.update(get_types_from_msg(REQUEST_HEADER + fields, msgtype))
    store = types.SimpleNamespace(fielddefs=ChainMap(parsed, typestore.fielddefs))
    built = build_structs(store, typenames, typenames)
    result = {}
    for srvtype in definitions:
        pkg, _, name = srvtype.split("/")
        result[srvtype] = (built[f"{pkg}/msg/{name}_Request"], built[f"{pkg}/msg/{name}_Response"])
    return result


# ----------------------------------------------------------------------------- the structs

#: ROS 2 type name (rosbags spelling) -> IDL struct, for every message the runtime exchanges.
IDL_TYPES: dict[str, type] = build_structs(messages.typestore(), messages.MSGTYPES.values())

#: ROS 2 service type -> (request struct, response struct), each with the request header.
SERVICE_TYPES: dict[str, tuple[type, type]] = build_service_structs(
    SERVICE_DEFINITIONS, messages.typestore()
)
SetBoolRequest, SetBoolResponse = SERVICE_TYPES["std_srvs/srv/SetBool"]

Time = IDL_TYPES["builtin_interfaces/msg/Time"]
Header = IDL_TYPES["std_msgs/msg/Header"]
String = IDL_TYPES["std_msgs/msg/String"]
Image = IDL_TYPES["sensor_msgs/msg/Image"]
CompressedImage = IDL_TYPES["sensor_msgs/msg/CompressedImage"]
RegionOfInterest = IDL_TYPES["sensor_msgs/msg/RegionOfInterest"]
CameraInfo = IDL_TYPES["sensor_msgs/msg/CameraInfo"]
Point = IDL_TYPES["geometry_msgs/msg/Point"]
Quaternion = IDL_TYPES["geometry_msgs/msg/Quaternion"]
Pose = IDL_TYPES["geometry_msgs/msg/Pose"]
PoseWithCovariance = IDL_TYPES["geometry_msgs/msg/PoseWithCovariance"]
Point2D = IDL_TYPES["vision_msgs/msg/Point2D"]
Pose2D = IDL_TYPES["vision_msgs/msg/Pose2D"]
BoundingBox2D = IDL_TYPES["vision_msgs/msg/BoundingBox2D"]
ObjectHypothesis = IDL_TYPES["vision_msgs/msg/ObjectHypothesis"]
ObjectHypothesisWithPose = IDL_TYPES["vision_msgs/msg/ObjectHypothesisWithPose"]
Detection2D = IDL_TYPES["vision_msgs/msg/Detection2D"]
Detection2DArray = IDL_TYPES["vision_msgs/msg/Detection2DArray"]
VisionClass = IDL_TYPES["vision_msgs/msg/VisionClass"]
LabelInfo = IDL_TYPES["vision_msgs/msg/LabelInfo"]
KeyValue = IDL_TYPES["diagnostic_msgs/msg/KeyValue"]
DiagnosticStatus = IDL_TYPES["diagnostic_msgs/msg/DiagnosticStatus"]
DiagnosticArray = IDL_TYPES["diagnostic_msgs/msg/DiagnosticArray"]

#: The structs whose ``data`` member carries a ``uint8[]`` camera payload.
BYTES_FIELDS: dict[type, str] = {Image: "data", CompressedImage: "data"}


def service_types(srvtype: str) -> tuple[type, type]:
    """(request, response) IDL structs of a ROS 2 service type; DdsError if unknown."""
    from dds_perception.ros.dds import DdsError

    try:
        return SERVICE_TYPES[srvtype]
    except KeyError as error:
        raise DdsError(
            f"no DDS service type for {srvtype!r}; known: {', '.join(sorted(SERVICE_TYPES))}"
        ) from error


def idl_type(msgtype: str) -> type:
    """The IDL struct of a ROS 2 type name (``sensor_msgs/msg/Image``); DdsError if unknown."""
    from dds_perception.ros.dds import DdsError

    try:
        return IDL_TYPES[msgtype]
    except KeyError as error:
        raise DdsError(
            f"no DDS type for {msgtype!r}; known: {', '.join(sorted(IDL_TYPES))}"
        ) from error


def install_bytes_fast_path(cls: type, member: str = "data") -> None:
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
