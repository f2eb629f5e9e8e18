"""IDL samples <-> rosbags messages, field by field from the rosbags typestore's definitions.

The node core, the bag reader/writer and the evaluation all work on rosbags messages (one
representation, :class:`~dds_perception.ros.messages.MessageClasses`); the DDS runtime converts at
its edge. The converters are compiled once per type from ``typestore.fielddefs`` (the parsed
``.msg`` definitions), so a field added to a definition that the IDL struct lacks fails loudly
instead of being dropped. Numeric arrays become numpy arrays on the rosbags side (what rosbags
serialises) and lists on the IDL side; ``uint8[]`` payloads stay ``bytes`` <-> a zero-copy
``np.frombuffer`` view, so a camera frame is never copied element by element.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from dds_perception.ros.dds import DdsError
from dds_perception.ros.dds import types as idl

# rosbags base type -> numpy dtype of its arrays (strings are lists on both sides)
_DTYPES = {
    "bool": np.bool_,
    "byte": np.uint8,
    "char": np.uint8,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "float32": np.float32,
    "float64": np.float64,
}
_NAME, _BASE, _ARRAY, _SEQUENCE = 2, 1, 3, 4  # rosbags.interfaces.Nodetype values

Convert = Callable[[Any], Any]


def _fields(typestore: Any, msgtype: str) -> list[tuple[str, tuple[int, Any]]]:
    try:
        return list(typestore.fielddefs[msgtype][1])
    except KeyError as error:
        raise DdsError(f"the typestore has no definition of {msgtype!r}") from error


def _check_members(cls: type, msgtype: str, names: list[str]) -> None:
    members = list(cls.__dataclass_fields__)
    if members != names:
        raise DdsError(
            f"IDL struct {cls.__name__} has fields {members}, but {msgtype} has {names}: "
            "the DDS type would not match ROS 2's"
        )


# ----------------------------------------------------------------------------- rosbags -> IDL


@functools.cache
def _to_idl_converter(typestore: Any, msgtype: str) -> Convert:
    cls = idl.idl_type(msgtype)
    fields = _fields(typestore, msgtype)
    _check_members(cls, msgtype, [name for name, _ in fields])
    bytes_member = idl.BYTES_FIELDS.get(cls)
    plan = [
        (name, _to_idl_field(typestore, node, as_bytes=name == bytes_member))
        for name, node in fields
    ]

    def convert(msg: Any) -> Any:
        try:
            return cls(**{name: fn(getattr(msg, name)) for name, fn in plan})
        except DdsError:
            raise
        except Exception as error:  # wrong value type in a message built by hand
            raise DdsError(f"cannot convert {msgtype} to DDS: {error}") from error

    return convert


def _to_idl_field(typestore: Any, node: tuple[int, Any], *, as_bytes: bool = False) -> Convert:
    kind, detail = node
    if kind == _BASE:
        return _byte_to_octet if detail[0] == "byte" else _identity
    if kind == _NAME:
        return _to_idl_converter(typestore, detail)
    (elem_kind, elem_detail), _length = detail
    if elem_kind == _BASE:
        if as_bytes:
            return _to_bytes
        if elem_detail[0] == "string":
            return list
        return _to_list
    elem = _to_idl_converter(typestore, elem_detail)
    return lambda values: [elem(v) for v in values]


def _identity(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _byte_to_octet(value: Any) -> int:
    """rosbags holds ROS 2 ``byte`` as a signed int8, the IDL (like ROS 2) as an octet."""
    return int(value) & 0xFF


def _octet_to_byte(value: Any) -> int:
    value = int(value)
    return value - 256 if value > 127 else value


def _to_list(values: Any) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _to_bytes(values: Any) -> bytes:
    if isinstance(values, (bytes, bytearray, memoryview)):
        return bytes(values)
    return np.ascontiguousarray(values, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------- IDL -> rosbags


@functools.cache
def _from_idl_converter(typestore: Any, msgtype: str) -> Convert:
    cls = typestore.types[msgtype]
    plan = [(name, _from_idl_field(typestore, node)) for name, node in _fields(typestore, msgtype)]

    def convert(sample: Any) -> Any:
        return cls(**{name: fn(getattr(sample, name)) for name, fn in plan})

    return convert


def _from_idl_field(typestore: Any, node: tuple[int, Any]) -> Convert:
    kind, detail = node
    if kind == _BASE:
        return _octet_to_byte if detail[0] == "byte" else _identity
    if kind == _NAME:
        return _from_idl_converter(typestore, detail)
    (elem_kind, elem_detail), _length = detail
    if elem_kind == _BASE:
        if elem_detail[0] == "string":
            return list
        dtype = _DTYPES[elem_detail[0]]
        return functools.partial(_to_array, dtype=dtype)
    elem = _from_idl_converter(typestore, elem_detail)
    return lambda values: [elem(v) for v in values]


def _to_array(values: Any, dtype: Any) -> np.ndarray:
    if isinstance(values, (bytes, bytearray, memoryview)):
        return np.frombuffer(values, dtype=dtype)  # zero-copy view of the received payload
    return np.asarray(values, dtype=dtype)


# ----------------------------------------------------------------------------- public


def msgtype_of(msg: Any) -> str:
    """The ROS 2 type name of a rosbags message (``__msgtype__``)."""
    try:
        return str(msg.__msgtype__)
    except AttributeError as error:
        raise DdsError(f"{type(msg).__name__} is not a rosbags message") from error


def to_idl(msg: Any, typestore: Any, msgtype: str | None = None) -> Any:
    """The IDL sample of a rosbags message (``msgtype`` defaults to its ``__msgtype__``)."""
    return _to_idl_converter(typestore, msgtype or msgtype_of(msg))(msg)


def from_idl(sample: Any, typestore: Any, msgtype: str) -> Any:
    """The rosbags message of an IDL sample of ROS 2 type ``msgtype``."""
    return _from_idl_converter(typestore, msgtype)(sample)


def idl_from_cdr(data: bytes | memoryview, msgtype: str) -> Any:
    """An IDL sample from CDR bytes (those rosbags writes and ROS 2 sends)."""
    return idl.idl_type(msgtype).deserialize(bytes(data))
