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
    """Fails when the private cyclonedds serialiser swap of design.md section 12 stops working:
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
