"""DDS runtime types: the bytes Cyclone DDS puts on the wire equal rosbags' (= ROS 2's) CDR.

For every message type of the runtime a message with seeded random content (every field set,
sequences of several lengths, non-ASCII strings, extreme integers) goes rosbags -> IDL; the IDL
sample's ``serialize()`` (what ``DataWriter.write`` sends) must equal
``typestore.serialize_cdr``, and the way back must give the same message.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the DDS runtime needs cyclonedds (pip install '.[dds]')")

from dds_perception.ros import messages
from dds_perception.ros.dds import DdsError, convert
from dds_perception.ros.dds import types as idl

TS = messages.typestore()
_INT_RANGES = {
    "byte": (-128, 127),  # rosbags holds ROS 2 byte as int8; the wire octet is the same
    "char": (0, 255),
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "uint32": (0, 2**32 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint64": (0, 2**64 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


def _value(rng: np.random.Generator, base: str):
    if base == "string":
        alphabet = ["a", "Z", "0", " ", "_", "é", "車", "/"]
        return "".join(rng.choice(alphabet, size=int(rng.integers(0, 12))))
    if base == "bool":
        return bool(rng.integers(0, 2))
    if base in ("float32", "float64"):
        value = float(rng.normal(0, 1e3))
        return float(np.float32(value)) if base == "float32" else value
    low, high = _INT_RANGES[base]
    return int(rng.choice([low, high, int(rng.integers(low, high, endpoint=True))]))


def random_message(msgtype: str, rng: np.random.Generator, length: int | None = None):
    """A rosbags message of ``msgtype`` with every field filled from ``rng``."""
    values = {}
    for name, (kind, detail) in TS.fielddefs[msgtype][1]:
        if kind == 1:
            values[name] = _value(rng, detail[0])
        elif kind == 2:
            values[name] = random_message(detail, rng, length)
        else:
            (elem_kind, elem_detail), size = detail
            n = size if kind == 3 else (int(rng.integers(0, 4)) if length is None else length)
            if elem_kind == 2:
                values[name] = [random_message(elem_detail, rng, length) for _ in range(n)]
            elif elem_detail[0] == "string":
                values[name] = [_value(rng, "string") for _ in range(n)]
            else:
                dtype = convert._DTYPES[elem_detail[0]]
                values[name] = np.array([_value(rng, elem_detail[0]) for _ in range(n)], dtype)
    return TS.types[msgtype](**values)


@pytest.mark.parametrize("msgtype", sorted(idl.IDL_TYPES))
@pytest.mark.parametrize("length", [0, 1, 3])
def test_dds_wire_bytes_equal_rosbags_cdr(msgtype: str, length: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{msgtype}{length}".encode()))
    for _ in range(3):
        msg = random_message(msgtype, rng, length)
        sample = convert.to_idl(msg, TS)
        assert type(sample).__idl_typename__ == idl.dds_type_name(msgtype)
        wire = sample.serialize()
        expected = bytes(TS.serialize_cdr(msg, msgtype))
        assert wire == expected
        back = convert.from_idl(type(sample).deserialize(wire), TS, msgtype)
        assert messages.message_to_dict(back) == messages.message_to_dict(msg)
        assert convert.idl_from_cdr(expected, msgtype) == sample


def test_dds_type_names_follow_rmw_cyclonedds() -> None:
    assert idl.Image.__idl_typename__ == "sensor_msgs::msg::dds_::Image_"
    assert idl.Detection2DArray.__idl_typename__ == "vision_msgs::msg::dds_::Detection2DArray_"
    assert idl.DiagnosticArray.__idl_typename__ == "diagnostic_msgs::msg::dds_::DiagnosticArray_"
    assert idl.dds_type_name("vision_msgs/msg/LabelInfo") == "vision_msgs::msg::dds_::LabelInfo_"
    with pytest.raises(DdsError, match="no DDS type for 'nav_msgs/msg/Odometry'"):
        idl.idl_type("nav_msgs/msg/Odometry")


def test_dds_node_messages_wire_equal() -> None:
    """The messages the node really sends (built by ros.messages) cross unchanged."""
    classes = messages.rosbags_classes()
    header = messages.header_msg(1_234_567_891, "camera", classes)

    dets = SimpleNamespace(
        boxes=np.array([[10, 20, 110, 70], [0.5, 1.5, 2.5, 3.5]], np.float32),
        scores=np.array([0.9, 0.31], np.float32),
        class_names=["car", "car"],
    )

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for msg in (
        messages.detections_to_msg(dets, header, classes),
        messages.label_info_msg(["car"], header, classes, threshold=0.3),
        messages.rgb_to_image_msg(rgb, header, classes, "bgr8", step=24),
        messages.rgb_to_compressed_msg(rgb, header, classes),
        messages.camera_info_msg(np.arange(12.0).reshape(3, 4), 7, 5, header, classes),
    ):
        msgtype = convert.msgtype_of(msg)
        assert convert.to_idl(msg, TS).serialize() == bytes(TS.serialize_cdr(msg, msgtype))


def test_dds_bytes_fast_path_is_installed() -> None:
    """Fails when the private cyclonedds serialiser swap (docs/node.md) stops working:
    payloads must come back as ``bytes`` (not a list of ints) and the swap must stay in place
    for both CDR versions."""
    from cyclonedds.idl._machinery import BytesMachine

    for cls in (idl.Image, idl.CompressedImage):
        idl_meta = cls.__idl__
        assert isinstance(idl_meta.v1_machine.members_machines["data"], BytesMachine)
        assert isinstance(idl_meta.v2_machine.members_machines["data"], BytesMachine)
    payload = bytes(range(256)) * (375 * 1242 * 3 // 256)
    frame = idl.Image(height=375, width=1242, encoding="rgb8", step=3726, data=payload)
    wire = frame.serialize()
    back = idl.Image.deserialize(wire)
    assert isinstance(back.data, bytes) and back.data == payload
    msg = convert.from_idl(back, TS, "sensor_msgs/msg/Image")
    assert msg.data.dtype == np.uint8 and msg.data.base is not None  # a view, no copy
    assert bytes(TS.serialize_cdr(msg, "sensor_msgs/msg/Image")) == wire


def test_dds_fast_path_refuses_a_foreign_layout() -> None:
    with pytest.raises(DdsError, match=r"fast path for String\.data no longer fits"):
        idl.install_bytes_fast_path(idl.String, "data")  # a str member, not a sequence


def test_dds_struct_mismatch_is_reported() -> None:
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.EMPTY)  # a String with a field ROS 2's lacks
    store.register(get_types_from_msg("string data\nint32 extra", "std_msgs/msg/String"))
    msg = store.types["std_msgs/msg/String"](data="x", extra=1)
    with pytest.raises(DdsError, match="IDL struct String has fields"):
        convert.to_idl(msg, store)


# XTypes type identifiers (minimal, equivalence hash) of the hand-written structs the generated
# ones replaced, recorded with cyclonedds 11.0.1 (pinned): the DDS types Cyclone announces in
# discovery must stay the same whatever the generator does.
RECORDED_TYPE_IDS = {
    "builtin_interfaces/msg/Time": "00070000f2d4854f13aef32dfe2157f3e6320d",
    "std_msgs/msg/Header": "00070000f2e5765ec48cffd419ed7fe84e2a55",
    "std_msgs/msg/String": "00070000f2c3da80d638e91b9fad0a6b765cc2",
    "sensor_msgs/msg/Image": "00070000f25bf087313e6226079b7c2d8b0840",
    "sensor_msgs/msg/CompressedImage": "00070000f27784ccb1194d78ce69c93f63697e",
    "sensor_msgs/msg/RegionOfInterest": "00070000f222f5f7300d1dfc51b64643139285",
    "sensor_msgs/msg/CameraInfo": "00070000f2a9d863b8a6110effaea35950aa60",
    "geometry_msgs/msg/Point": "00070000f204ac28f91964235dc981e3f8fadf",
    "geometry_msgs/msg/Quaternion": "00070000f26f01ea4900bc028058c3a8dae352",
    "geometry_msgs/msg/Pose": "00070000f20d47264b4a66fa94bbfe34f32f7d",
    "geometry_msgs/msg/PoseWithCovariance": "00070000f21912048a82ed6f0a49065e94e70c",
    "vision_msgs/msg/Point2D": "00070000f2aad0ce96f9ccc40e05871ec83ecc",
    "vision_msgs/msg/Pose2D": "00070000f29d62a375919df929340450e138f7",
    "vision_msgs/msg/BoundingBox2D": "00070000f2d56c2c5f4281923557894b6671fd",
    "vision_msgs/msg/ObjectHypothesis": "00070000f26ba1f37fefb42937574752b3823d",
    "vision_msgs/msg/ObjectHypothesisWithPose": "00070000f2cbcc0cb7709ffe6ebabea6932fb0",
    "vision_msgs/msg/Detection2D": "00070000f225172bda750fc2923c9458df23c3",
    "vision_msgs/msg/Detection2DArray": "00070000f2763ae81303cbcc9b8b8e28af1893",
    "vision_msgs/msg/VisionClass": "00070000f2a7689ac9934c1af29b4e22378338",
    "vision_msgs/msg/LabelInfo": "00070000f24a229a71584fa94b36550f36c00a",
    "diagnostic_msgs/msg/KeyValue": "00070000f2d522b62020ed2a67c5a75f1a1a1b",
    "diagnostic_msgs/msg/DiagnosticStatus": "00070000f21364a12c8ee2402eeddffecc7ca2",
    "diagnostic_msgs/msg/DiagnosticArray": "00070000f2386f46279fe31d4b0780d2f8dd7a",
    "std_srvs/srv/SetBool#request": "00070000f2df87622dfa96b2492dfa90be5f62",
    "std_srvs/srv/SetBool#response": "00070000f2b2ab8ba852ddc371780de24eadca",
}


def test_dds_generated_types_keep_the_recorded_dds_types() -> None:
    got = {
        name: cls.__idl__.get_type_id().serialize().hex() for name, cls in idl.IDL_TYPES.items()
    }
    request, response = idl.service_types("std_srvs/srv/SetBool")
    got["std_srvs/srv/SetBool#request"] = request.__idl__.get_type_id().serialize().hex()
    got["std_srvs/srv/SetBool#response"] = response.__idl__.get_type_id().serialize().hex()
    assert got == RECORDED_TYPE_IDS


def test_dds_types_are_the_message_definitions() -> None:
    """Every struct has its definition's fields, in order, with rosidl's IDL types; the
    vision_msgs ones come from the .msg files shipped in ros/msg/."""
    from importlib.resources import files

    from rosbags.typesys import get_types_from_msg

    for msgtype, cls in idl.IDL_TYPES.items():
        fields = [name for name, _ in TS.fielddefs[msgtype][1]]
        assert list(cls.__dataclass_fields__) == fields, msgtype
    shipped = files("dds_perception.ros") / "msg"
    for name in messages.VISION_MSGS:
        text = (shipped / f"{name}.msg").read_text(encoding="utf-8")
        ((_, (_, fields)),) = get_types_from_msg(text, f"vision_msgs/msg/{name}").items()
        assert list(idl.IDL_TYPES[f"vision_msgs/msg/{name}"].__dataclass_fields__) == [
            field for field, _ in fields
        ]
    hints = idl.DiagnosticStatus.__annotations__
    assert hints["level"] is idl.BASE_TYPES["byte"]  # ROS 2 byte is an IDL octet


def test_dds_types_follow_a_changed_definition() -> None:
    """The structs are built from the definitions, not copied: a new definition (a field
    added, a bounded sequence, a fixed array of structs) gives a struct whose bytes are again
    rosbags' CDR of the same message."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.EMPTY)
    store.register(get_types_from_msg("uint16 class_id\nstring class_name", "t_msgs/msg/Cls"))
    store.register(
        get_types_from_msg(
            "t_msgs/Cls[2] pair\nint8 extra\nfloat32[<=3] bounded\nbyte[] raw\nstring<=8 name",
            "t_msgs/msg/Plus",
        )
    )
    structs = idl.build_structs(store, ["t_msgs/msg/Plus"])
    assert set(structs) == {"t_msgs/msg/Plus", "t_msgs/msg/Cls"}
    plus = structs["t_msgs/msg/Plus"]
    assert plus.__idl_typename__ == "t_msgs::msg::dds_::Plus_"
    assert list(plus.__dataclass_fields__) == ["pair", "extra", "bounded", "raw", "name"]
    cls_t = store.types["t_msgs/msg/Cls"]
    msg = store.types["t_msgs/msg/Plus"](
        pair=[cls_t(class_id=7, class_name="car"), cls_t(class_id=65535, class_name="")],
        extra=-5,
        bounded=np.array([1.5, -2.0], np.float32),
        raw=np.array([-1, 0, 127], np.int8),
        name="front",
    )
    sample = plus(
        pair=[structs["t_msgs/msg/Cls"](7, "car"), structs["t_msgs/msg/Cls"](65535, "")],
        extra=-5,
        bounded=[1.5, -2.0],
        raw=[255, 0, 127],
        name="front",
    )
    assert sample.serialize() == bytes(store.serialize_cdr(msg, "t_msgs/msg/Plus"))
    first, second = plus(), plus()
    assert first.pair is not second.pair and first.pair[0] is not second.pair[0]  # fresh
    with pytest.raises(DdsError, match="no definition of 't_msgs/msg/Missing'"):
        idl.build_structs(store, ["t_msgs/msg/Missing"])
