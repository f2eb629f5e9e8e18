"""The conversions fill rclpy-style message classes exactly as they fill rosbags' (ros area).

No ROS 2 here, so ``ros_classes()`` is pointed at generated stand-ins of the message modules that
follow rosidl_generator_py's rules: keyword construction with defaults, ``__slots__``,
``get_fields_and_field_types()``, and setters that reject wrong types the way rclpy's asserts do
(a float field takes only ``float``, a nested field only its own class, ``uint8[]`` an
``array.array('B')`` or ints, a fixed ``float64[N]`` a float64 ndarray of size N). The classes are
generated from the rosbags typestore's field definitions, so they have the real fields.
"""

from __future__ import annotations

import array
import sys
import types
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
from rosbags.typesys.base import Nodetype

from dds_perception.ros import messages as m

PACKAGES = ("std_msgs", "builtin_interfaces", "geometry_msgs", "sensor_msgs", "vision_msgs")
PACKAGES += ("diagnostic_msgs",)
INT_TYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "char"}
FLOAT_TYPES = {"float32", "float64"}
ARRAY_CODES = {"uint8": "B", "float64": "d", "float32": "f", "int32": "i", "uint32": "I"}


def _checker(spec, resolve):
    """A function asserting what rclpy's generated setter asserts for one field."""
    kind, detail = spec
    if kind == Nodetype.NAME:
        return lambda v: isinstance(v, resolve(detail))
    if kind == Nodetype.BASE:
        base = detail[0]
        if base in FLOAT_TYPES:
            return lambda v: isinstance(v, float)
        if base in INT_TYPES:
            return lambda v: isinstance(v, int) and not isinstance(v, bool)
        if base == "bool":
            return lambda v: isinstance(v, bool)
        if base == "byte":
            return lambda v: isinstance(v, bytes) and len(v) == 1
        if base == "string":
            return lambda v: isinstance(v, str)
        raise AssertionError(base)
    (inner_kind, inner), size = detail
    if inner_kind == Nodetype.NAME:
        return lambda v: (
            isinstance(v, Sequence) and not isinstance(v, str)
            and all(isinstance(x, resolve(inner)) for x in v)
        )  # fmt: skip
    base = inner[0]
    if kind == Nodetype.ARRAY and base in FLOAT_TYPES:
        return lambda v: isinstance(v, np.ndarray) and v.dtype == np.float64 and v.size == size
    code = ARRAY_CODES[base]
    return lambda v: isinstance(v, array.array) and v.typecode == code


def _default(spec, resolve):
    kind, detail = spec
    if kind == Nodetype.NAME:
        return resolve(detail)()
    if kind == Nodetype.BASE:
        return {"bool": False, "byte": b"\x00", "string": ""}.get(
            detail[0], 0.0 if detail[0] in FLOAT_TYPES else 0
        )
    (inner_kind, inner), size = detail
    if inner_kind == Nodetype.NAME:
        return []
    if kind == Nodetype.ARRAY:
        return np.zeros(size, dtype=np.float64)
    return array.array(ARRAY_CODES[inner[0]])


def _make_modules(typestore) -> dict[str, types.ModuleType]:
    modules = {}
    for package in PACKAGES:
        parent = types.ModuleType(package)
        parent.msg = types.ModuleType(f"{package}.msg")
        modules[package] = parent
        modules[f"{package}.msg"] = parent.msg
    built: dict[str, type] = {}

    def resolve(typename: str) -> type:
        if typename not in built:
            built[typename] = _make_class(typename)
        return built[typename]

    def _make_class(typename: str) -> type:
        package, _, name = typename.split("/")
        fields = typestore.fielddefs[typename][1]
        checks = {f: _checker(spec, resolve) for f, spec in fields}
        specs = dict(fields)

        def __init__(self, **kwargs):
            unknown = set(kwargs) - set(checks)
            assert not unknown, f"{typename}: invalid arguments {unknown}"
            for field in checks:
                value = kwargs[field] if field in kwargs else _default(specs[field], resolve)
                setattr(self, field, value)

        def __setattr__(self, field, value):
            assert field in checks, f"{typename} has no field {field}"
            assert checks[field](value), f"{typename}.{field}: rclpy rejects {value!r:.60}"
            object.__setattr__(self, field, value)

        cls = type(
            name,
            (),
            {
                "__slots__": tuple(checks),
                "__init__": __init__,
                "__setattr__": __setattr__,
                "get_fields_and_field_types": classmethod(lambda c: {f: "" for f in checks}),
            },
        )
        setattr(modules[f"{package}.msg"], name, cls)
        return cls

    for typename in m.MSGTYPES.values():
        resolve(typename)
    return modules


@pytest.fixture
def rclpy_like(monkeypatch) -> m.MessageClasses:
    for name, module in _make_modules(m.typestore()).items():
        monkeypatch.setitem(sys.modules, name, module)
    return m.ros_classes()


def _built(classes: m.MessageClasses) -> list:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    header = m.header_msg(5_000_000_123, "camera", classes)
    detections = SimpleNamespace(
        boxes=np.array([[1.5, 2.0, 30.25, 40.0], [0, 0, 5, 5]], np.float32),
        scores=np.array([0.875, 0.5], np.float32),
        class_names=["car", "car"],
    )
    p2 = np.arange(12, dtype=np.float64).reshape(3, 4)
    return [
        header,
        m.string_msg("Car 0.00 0 ...", classes),
        m.detections_to_msg(detections, header, classes),
        m.rgb_to_image_msg(rgb, header, classes, "bgra8", step=30),
        m.rgb_to_compressed_msg(rgb, header, classes, "png"),
        m.camera_info_msg(p2, 6, 4, header, classes),
        m.label_info_msg(["car"], header, classes, threshold=0.3),
    ]


def test_ros_rclpy_like_classes_are_filled_like_rosbags(rclpy_like) -> None:
    assert rclpy_like.backend == "rclpy" and rclpy_like.typestore is None
    assert rclpy_like.Time.__name__ == "Time" and rclpy_like.Quaternion.__name__ == "Quaternion"
    ours = _built(rclpy_like)
    reference = _built(m.rosbags_classes())
    for got, want in zip(ours, reference, strict=True):
        assert type(got).__module__ != type(want).__module__
        assert m.message_to_dict(got) == m.message_to_dict(want), type(want).__name__
    image = ours[3]
    assert isinstance(image.data, array.array)
    np.testing.assert_array_equal(m.image_msg_to_rgb(image), m.image_msg_to_rgb(reference[3]))
    back = m.msg_to_detections(ours[2])
    np.testing.assert_allclose(back.boxes, [[1.5, 2.0, 30.25, 40.0], [0, 0, 5, 5]])


def test_ros_rclpy_like_setters_reject_wrong_types(rclpy_like) -> None:
    """The stand-ins are strict: a numpy float32 in a float field fails as in rclpy."""
    with pytest.raises(AssertionError, match="rclpy rejects"):
        rclpy_like.ObjectHypothesis(class_id="car", score=np.float32(0.5))
    with pytest.raises(AssertionError, match="rclpy rejects"):
        rclpy_like.Image(data=np.zeros(3, np.uint8))
