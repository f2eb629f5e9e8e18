"""The rclpy adapter (ros/node.py) run against recording stand-ins of rclpy, rcl_interfaces and
diagnostic_updater, because no ROS 2 can be installed here. The stand-ins only record what the
node asks for (parameters with descriptors, QoS, topics, publications); the node's own code, the
core, the pipeline interface and rosbags' message classes are real. On a ROS machine,
test_node_launch.py runs the same node against real rclpy.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
from test_node_core import FakePipeline, image_msg  # the same stand-in pipeline and frames

from dds_perception.ros import core, messages
from dds_perception.ros import params as node_params
from dds_perception.ros.diagnostics import ERROR, OK


class _Record:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)


class _Publisher:
    def __init__(self, msg_type, topic, qos):
        self.msg_type, self.topic_name, self.qos = msg_type, topic, qos
        self.sent: list = []
        self.subscribers = 0

    def publish(self, msg):
        self.sent.append(msg)

    def get_subscription_count(self):
        return self.subscribers


class _Logger:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, text):
        self.lines.append(("info", text))

    def warning(self, text):
        self.lines.append(("warning", text))

    def error(self, text):
        self.lines.append(("error", text))


_UNSET = object()  # a parameter declared by type, without a value


class _Node:
    """Records what rclpy.node.Node would be asked; parameter overrides as from --ros-args."""

    overrides: ClassVar[dict] = {}

    def __init__(self, name, **_kwargs):
        self._name = name
        self.params, self.descriptors, self.declared = {}, {}, {}
        self.publishers, self.subscriptions, self.timers = {}, [], []
        self.services: dict = {}
        self.param_callbacks: list = []
        self.logger = _Logger()
        self.destroyed = False

    def declare_parameter(self, name, value, descriptor):
        """As rclpy (Galactic and later): a parameter declared by its type alone has no value
        until an override gives one; reading it then raises ParameterUninitializedException."""
        self.declared[name] = value
        if isinstance(value, enum.Enum) and name not in self.overrides:
            self.params[name] = _UNSET
        else:
            self.params[name] = self.overrides.get(name, value)
        self.descriptors[name] = descriptor
        return SimpleNamespace(value=self.params[name])

    def get_parameter(self, name):
        if self.params[name] is _UNSET:
            raise sys.modules["rclpy.exceptions"].ParameterUninitializedException(name)
        return SimpleNamespace(value=self.params[name])

    def get_logger(self):
        return self.logger

    def get_name(self):
        return self._name

    def get_namespace(self):
        return "/"

    def get_clock(self):
        return SimpleNamespace(now=lambda: SimpleNamespace(nanoseconds=100_250_000_000))

    def create_publisher(self, msg_type, topic, qos):
        self.publishers[topic] = _Publisher(msg_type, topic, qos)
        return self.publishers[topic]

    def create_subscription(self, msg_type, topic, callback, qos):
        sub = SimpleNamespace(msg_type=msg_type, topic_name=topic, callback=callback, qos=qos)
        self.subscriptions.append(sub)
        return sub

    def destroy_subscription(self, subscription):
        self.subscriptions.remove(subscription)

    def create_service(self, srv_type, name, callback):
        self.services[name] = SimpleNamespace(srv_type=srv_type, callback=callback)
        return self.services[name]

    def set_parameters(self, parameters):
        """As rclpy: every callback sees the list; the values are stored when all accept."""
        results = [callback(parameters) for callback in self.param_callbacks]
        failed = [r for r in results if not r.successful]
        if not failed:
            self.params.update({p.name: p.value for p in parameters})
        return [failed[0] if failed else results[0]] * len(parameters)

    def create_timer(self, period, callback):
        self.timers.append((period, callback))

    def add_on_set_parameters_callback(self, callback):
        self.param_callbacks.append(callback)

    def destroy_node(self):
        self.destroyed = True


class _Updater:
    def __init__(self, node, period=1.0):
        self.node, self.period, self.tasks, self.hardware_id = node, period, [], ""

    def setHardwareID(self, hwid):
        self.hardware_id = hwid

    def add(self, name, callback):
        self.tasks.append((name, callback))


class _Stat:
    """diagnostic_updater.DiagnosticStatusWrapper's summary/add."""

    def __init__(self):
        self.level, self.message, self.values = None, "", []

    def summary(self, level, message):
        self.level, self.message = level, message

    def add(self, key, value):
        self.values.append((key, value))


def _standins() -> dict[str, types.ModuleType]:
    modules = {
        name: types.ModuleType(name)
        for name in (
            "rclpy",
            "rclpy.node",
            "rclpy.qos",
            "rclpy.executors",
            "rclpy.parameter",
            "rclpy.exceptions",
            "rcl_interfaces",
            "rcl_interfaces.msg",
            "diagnostic_updater",
            "std_srvs",
            "std_srvs.srv",
        )
    }
    rclpy = modules["rclpy"]
    rclpy.calls = []
    rclpy.init = lambda args=None: rclpy.calls.append(("init", args))
    rclpy.spin = lambda node: rclpy.calls.append(("spin", node))
    rclpy.try_shutdown = lambda: rclpy.calls.append(("shutdown",))
    modules["rclpy.node"].Node = _Node
    qos = modules["rclpy.qos"]
    qos.QoSProfile = _Record
    qos.HistoryPolicy = enum.Enum("HistoryPolicy", "KEEP_LAST KEEP_ALL")
    qos.ReliabilityPolicy = enum.Enum("ReliabilityPolicy", "RELIABLE BEST_EFFORT")
    qos.DurabilityPolicy = enum.Enum("DurabilityPolicy", "VOLATILE TRANSIENT_LOCAL")
    modules["rclpy.executors"].ExternalShutdownException = type(
        "ExternalShutdown", (Exception,), {}
    )
    msg = modules["rcl_interfaces.msg"]
    for name in ("ParameterDescriptor", "FloatingPointRange", "IntegerRange"):
        setattr(msg, name, type(name, (_Record,), {}))
    msg.SetParametersResult = type("SetParametersResult", (_Record,), {})
    modules["diagnostic_updater"].Updater = _Updater

    class Parameter:
        Type = enum.Enum("Type", "BOOL INTEGER DOUBLE STRING STRING_ARRAY")

        def __init__(self, name, type_=None, value=None):
            self.name, self.type_, self.value = name, type_, value

    modules["rclpy.parameter"].Parameter = Parameter
    modules["rclpy.exceptions"].ParameterUninitializedException = type(
        "ParameterUninitializedException", (Exception,), {}
    )
    modules["std_srvs.srv"].SetBool = SimpleNamespace(
        Request=lambda data=False: SimpleNamespace(data=data),
        Response=lambda: SimpleNamespace(success=False, message=""),
    )
    return modules


@pytest.fixture
def node_module(monkeypatch):
    """ros/node.py imported against the stand-ins (and re-imported without them afterwards)."""
    modules = _standins()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "cv_bridge", None)  # as on a machine without cv_bridge
    monkeypatch.setattr(messages, "ros_classes", messages.rosbags_classes)
    monkeypatch.setattr(_Node, "overrides", {})
    import dds_perception.ros.node as node_module

    module = importlib.reload(node_module)
    yield module
    monkeypatch.undo()
    importlib.reload(node_module)


def _image_sub(node):
    """The node's image subscription (the other one is camera_info)."""
    (sub,) = [s for s in node.subscriptions if "camera_info" not in s.topic_name]
    return sub


def _make(node_module, **overrides):
    _Node.overrides = {"device": "cpu", **overrides}
    pipeline = FakePipeline()
    node = node_module.DetectorNode(pipeline_factory=lambda params: pipeline)
    return node, pipeline


def test_node_adapter_declares_parameters_with_descriptors(node_module):
    node, _ = _make(node_module)
    try:
        assert list(node.descriptors) == node_params.parameter_names()
        score = node.descriptors["score_threshold"]
        assert score.description and not score.read_only
        (limits,) = score.floating_point_range
        assert (limits.from_value, limits.to_value) == (0.0, 1.0)
        (limits,) = node.descriptors["max_detections"].integer_range
        assert (limits.from_value, limits.to_value) == (1, 10000)
        assert node.descriptors["weights"].read_only  # needs a restart
        assert "cuda:N" in node.descriptors["device"].additional_constraints
    finally:
        node.destroy_node()


def test_node_adapter_topics_qos_and_publishing(node_module):
    qos = sys.modules["rclpy.qos"]
    node, _ = _make(node_module)
    try:
        sub = _image_sub(node)
        assert sub.topic_name == "image" and sub.msg_type.__name__.endswith("Image")
        assert (sub.qos.depth, sub.qos.history) == (1, qos.HistoryPolicy.KEEP_LAST)
        assert sub.qos.reliability == qos.ReliabilityPolicy.BEST_EFFORT
        label = node.publishers["label_info"]
        assert label.qos.durability == qos.DurabilityPolicy.TRANSIENT_LOCAL
        assert [c.class_name for c in label.sent[0].class_map] == ["car"]  # once, at start-up

        sub.callback(image_msg(messages.rosbags_classes(), 7, sec=100, frame_id="cam"))
        assert node.core.wait_idle(10)
        (out,) = node.publishers["detections"].sent
        assert out.header.frame_id == "cam" and out.header.stamp.sec == 100
        assert node.publishers["~/debug_image"].sent == []  # nobody subscribed
        node.publishers["~/debug_image"].subscribers = 1
        sub.callback(image_msg(messages.rosbags_classes(), 7, sec=101, frame_id="cam"))
        assert node.core.wait_idle(10)
        assert len(node.publishers["~/debug_image"].sent) == 1

        (name, fill) = node._updater.tasks[0]
        assert name == "detector" and node._updater.hardware_id == "cpu"
        stat = fill(_Stat())
        assert stat.level == OK and dict(stat.values)["frames_processed"] == "2"
        assert not any(text.startswith("cv_bridge decodes") for _, text in node.logger.lines)
    finally:
        node.destroy_node()
    assert node.core._thread is None  # destroy_node stopped the worker


def test_node_adapter_compressed_and_reliable(node_module):
    qos = sys.modules["rclpy.qos"]
    node, _ = _make(node_module, use_compressed=True, reliability="reliable")
    try:
        sub = _image_sub(node)
        assert sub.topic_name == "image/compressed"
        assert sub.msg_type.__name__.endswith("CompressedImage")
        assert sub.qos.reliability == qos.ReliabilityPolicy.RELIABLE
    finally:
        node.destroy_node()


def test_node_adapter_parameter_callback(node_module):
    node, pipeline = _make(node_module)
    try:
        (callback,) = node.param_callbacks
        param = SimpleNamespace
        result = callback([param(name="score_threshold", value=0.65)])
        assert result.successful and pipeline.score_threshold == 0.65
        result = callback([param(name="nms_iou", value=1.5)])
        assert not result.successful and "nms_iou 1.5: must lie in [0, 1]" in result.reason
        result = callback([param(name="device", value="cuda:1")])
        assert not result.successful and "cannot change while running" in result.reason
        assert callback([param(name="diagnostic_updater.period", value=2.0)]).successful
    finally:
        node.destroy_node()


def test_node_adapter_main_bad_configuration_exits_1(node_module, capsys):
    _Node.overrides = {"device": "tpu"}
    assert node_module.main(["detector_node"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "dds_detector: error: device 'tpu': unknown device; use auto, cpu, "
        "cuda or cuda:N"
    )
    rclpy = sys.modules["rclpy"]
    assert rclpy.calls[0][0] == "init" and rclpy.calls[-1] == ("shutdown",)


def test_node_adapter_main_spins_and_cleans_up(node_module, monkeypatch):
    _Node.overrides = {"device": "cpu"}
    pipeline = FakePipeline()
    monkeypatch.setattr(core, "build_pipeline", lambda params: pipeline)
    rclpy = sys.modules["rclpy"]

    def spin(node):
        rclpy.calls.append(("spin", node))
        raise KeyboardInterrupt  # Ctrl-C while spinning

    rclpy.spin = spin
    assert node_module.main(["detector_node"]) == 0
    kinds = [call[0] for call in rclpy.calls]
    assert kinds == ["init", "spin", "shutdown"]
    assert rclpy.calls[1][1].destroyed


def test_node_adapter_without_rclpy_gives_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rclpy", None)
    import dds_perception.ros.node as node_module

    module = importlib.reload(node_module)
    try:
        assert module.main([]) == 1
        assert "rclpy is not importable" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        importlib.reload(node_module)


def test_node_adapter_cli_help_without_ros(cli):
    result = cli("detector_node", "--help")
    assert "--ros-args" in result.stdout and "ros2 launch dds_perception" in result.stdout
    result = cli("detector_node", "--ros-args", "-p", "device:=cpu", check=False)
    assert result.returncode == 1 and "rclpy is not importable" in result.stderr


def test_node_adapter_debug_pixels_are_real(node_module):
    """The debug image published by the node decodes back to the frame with boxes drawn."""
    node, _ = _make(node_module)
    try:
        node.publishers["~/debug_image"].subscribers = 1
        _image_sub(node).callback(image_msg(messages.rosbags_classes(), 20, width=64, height=48))
        assert node.core.wait_idle(10)
        (debug,) = node.publishers["~/debug_image"].sent
        pixels = messages.image_msg_to_rgb(debug)
        assert pixels.shape == (48, 64, 3) and (pixels[40, 5] == 20).all()
        assert (pixels[2, 25] == np.array([0, 255, 0])).all()
    finally:
        node.destroy_node()


class RecordingPipeline(FakePipeline):
    """The fake pipeline, keeping every frame it was given (to check the decoded pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[np.ndarray] = []

    def __call__(self, rgb, encoding="rgb8", **kw):
        self.frames.append(np.array(rgb, copy=True))
        return super().__call__(rgb, encoding, **kw)


class FakeCvBridge:
    """cv_bridge's ``imgmsg_to_cv2`` for the encodings the node hands it, converting as the real
    one does (OpenCV demosaicing for Bayer, the high byte of 16-bit mono), from the message's
    own buffer, ``step`` and byte order; unknown encodings raise like CvBridgeError."""

    calls: ClassVar[list[tuple[str, str]]] = []

    def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
        import cv2

        type(self).calls.append((msg.encoding, desired_encoding))
        assert desired_encoding == "rgb8"
        raw = np.frombuffer(bytes(msg.data), np.uint8)
        if msg.encoding == "bayer_rggb8":
            rows = raw.reshape(msg.height, msg.step)[:, : msg.width]
            return cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_BayerBG2RGB)
        if msg.encoding == "mono16":
            dtype = ">u2" if msg.is_bigendian else "<u2"
            rows = raw.reshape(msg.height, msg.step)[:, : msg.width * 2]
            mono = np.ascontiguousarray(rows).view(dtype)
            return np.repeat((mono >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
        if msg.encoding == "yuv422":  # a wrong answer: two channels
            return np.zeros((msg.height, msg.width, 2), np.uint8)
        raise TypeError(f"Unrecognized image encoding [{msg.encoding}]")  # as CvBridgeError

    compressed_imgmsg_to_cv2 = imgmsg_to_cv2


def _raw_image(classes, encoding: str, rows: np.ndarray, step: int, sec: int, width=None):
    """An Image of ``encoding`` whose buffer is ``rows`` (padding included), ``width`` pixels
    wide (default: the rows' width)."""
    return classes.Image(
        header=classes.Header(stamp=classes.Time(sec=sec, nanosec=0), frame_id="cam"),
        height=rows.shape[0],
        width=rows.shape[1] if width is None else width,
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=np.frombuffer(rows.tobytes(), np.uint8),
    )


def _make_with_bridge(node_module, monkeypatch, bridge):
    bridge_module = types.ModuleType("cv_bridge")
    bridge_module.CvBridge = bridge
    monkeypatch.setitem(sys.modules, "cv_bridge", bridge_module)
    _Node.overrides = {"device": "cpu"}
    pipeline = RecordingPipeline()
    return node_module.DetectorNode(pipeline_factory=lambda params: pipeline), pipeline


def test_node_adapter_cv_bridge_broken_by_numpy2_falls_back(node_module, monkeypatch):
    """cv_bridge built against NumPy 1.x imports under NumPy 2 but fails on first use: the
    node decodes with its own conversions; encodings only cv_bridge knows fail as bad frames."""

    class BrokenBridge:
        def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
            raise AttributeError("_ARRAY_API not found")

        compressed_imgmsg_to_cv2 = imgmsg_to_cv2

    node, pipeline = _make_with_bridge(node_module, monkeypatch, BrokenBridge)
    classes = messages.rosbags_classes()
    try:
        assert any("cv_bridge failed its self-test" in text for _, text in node.logger.lines)
        _image_sub(node).callback(image_msg(classes, 33))
        assert node.core.wait_idle(10)
        bayer = _raw_image(classes, "bayer_rggb8", np.full((4, 6), 9, np.uint8), 6, sec=2)
        _image_sub(node).callback(bayer)
        assert node.core.wait_idle(10)
    finally:
        node.destroy_node()
    assert [frame[0, 0, 0] for frame in pipeline.frames] == [33]
    assert node.core.counters.failed == 1
    assert "unsupported encoding 'bayer_rggb8'" in node.core.last_error


def test_node_adapter_cv_bridge_only_for_encodings_the_project_lacks(node_module, monkeypatch):
    """With a working cv_bridge: rgb8/bgr8/PNG frames never reach it (the project's conversions,
    exact pixels); Bayer and 16-bit frames do, and the pipeline gets exactly its rgb8 result;
    its failures and malformed results are bad frames (one line, no traceback)."""
    import cv2

    FakeCvBridge.calls = []
    node, pipeline = _make_with_bridge(node_module, monkeypatch, FakeCvBridge)
    classes = messages.rosbags_classes()
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    bayer = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    mono16 = rng.integers(0, 65536, (4, 6), dtype=np.uint16)
    header = messages.header_msg(0, "cam", classes)
    frames = [
        messages.rgb_to_image_msg(rgb, header, classes, "rgb8"),
        messages.rgb_to_image_msg(rgb, header, classes, "bgr8"),
        messages.rgb_to_compressed_msg(rgb, header, classes, "png"),
        _raw_image(classes, "bayer_rggb8", np.pad(bayer, ((0, 0), (0, 2))), 8, sec=1, width=6),
        _raw_image(classes, "mono16", mono16.astype("<u2"), 12, sec=2),
        _raw_image(classes, "yuv422", np.zeros((4, 12), np.uint8), 12, sec=3, width=6),
        _raw_image(classes, "bayer_rggb8", bayer[:2], 6, sec=4),  # another size
        _raw_image(classes, "32FC1", np.zeros((4, 6), np.float32), 24, sec=5),
    ]
    try:
        assert any(text.startswith("cv_bridge decodes") for _, text in node.logger.lines)
        FakeCvBridge.calls.clear()  # the start-up self-test's probes
        for frame in frames:
            _image_sub(node).callback(frame)
            assert node.core.wait_idle(10)
    finally:
        node.destroy_node()
    assert FakeCvBridge.calls == [
        ("bayer_rggb8", "rgb8"),
        ("mono16", "rgb8"),
        ("yuv422", "rgb8"),
        ("bayer_rggb8", "rgb8"),
        ("32FC1", "rgb8"),
    ]
    got = pipeline.frames
    assert len(got) == 6 and all(f.dtype == np.uint8 for f in got)
    for frame in got[:3]:  # the project's conversions: exact pixels, whatever the layout
        np.testing.assert_array_equal(frame, rgb)
    np.testing.assert_array_equal(got[3], cv2.cvtColor(bayer, cv2.COLOR_BayerBG2RGB))
    np.testing.assert_array_equal(
        got[4], np.repeat((mono16 >> 8).astype(np.uint8)[..., None], 3, 2)
    )
    np.testing.assert_array_equal(got[5], cv2.cvtColor(bayer[:2], cv2.COLOR_BayerBG2RGB))
    assert node.core.counters.failed == 2  # yuv422 (wrong shape) and 32FC1 (refused)
    warnings = [text for level, text in node.logger.lines if level == "warning"]
    assert "cv_bridge gave a uint8 array of shape (4, 6, 2)" in warnings[0]
    assert not any(level == "error" for level, _ in node.logger.lines)  # bad frames, not bugs
    assert "Unrecognized image encoding [32FC1]" in node.core.last_error


def test_node_adapter_camera_info_subscription(node_module):
    """camera_info beside the image topic (or the parameter), best effort keep-last 1; its
    messages reach the core's camera model."""
    qos = sys.modules["rclpy.qos"]
    node, _ = _make(node_module, image_topic="/kitti/camera/image_raw", camera_height=1.65)
    try:
        (info_sub,) = [s for s in node.subscriptions if "camera_info" in s.topic_name]
        assert info_sub.topic_name == "/kitti/camera/camera_info"
        assert info_sub.msg_type.__name__.endswith("CameraInfo")
        assert info_sub.qos.reliability == qos.ReliabilityPolicy.BEST_EFFORT
        classes = messages.rosbags_classes()
        p2 = np.array([[700.0, 0, 600, 0], [0, 700.0, 180, 0], [0, 0, 1, 0]])
        header = messages.header_msg(0, "cam", classes)
        info_sub.callback(messages.camera_info_msg(p2, 1242, 375, header, classes))
        assert node.core.diagnostics().as_dict()["camera_info"].startswith("ok: 1242x375")
    finally:
        node.destroy_node()
    node, _ = _make(node_module, camera_info_topic="/calib/info")
    try:
        assert "/calib/info" in [s.topic_name for s in node.subscriptions]
    finally:
        node.destroy_node()


def test_node_adapter_enable_service_and_parameter(node_module):
    """~/enable (std_srvs/SetBool) sets the enable parameter; the image subscription goes and
    comes back; the camera_info subscription stays."""
    node, pipeline = _make(node_module)
    try:
        srv = node.services["~/enable"]
        assert srv.srv_type is sys.modules["std_srvs.srv"].SetBool
        response = srv.callback(SimpleNamespace(data=False), SimpleNamespace())
        assert response.success and response.message.startswith("disabled")
        assert node.params["enable"] is False and not node.core.enabled
        assert [s.topic_name for s in node.subscriptions] == ["camera_info"]
        stat = node._updater.tasks[0][1](_Stat())
        assert dict(stat.values)["enabled"] == "false" and stat.message.startswith("disabled")
        response = srv.callback(SimpleNamespace(data=True), SimpleNamespace())
        assert response.success and response.message.startswith("enabled")
        _image_sub(node).callback(image_msg(messages.rosbags_classes(), 5))
        assert node.core.wait_idle(10) and pipeline.seen == [5]
        # the parameter itself (ros2 param set /dds_detector enable false)
        (callback,) = node.param_callbacks
        assert callback([SimpleNamespace(name="enable", value=False)]).successful
        assert [s.topic_name for s in node.subscriptions] == ["camera_info"]
    finally:
        node.destroy_node()


def test_node_adapter_starts_disabled(node_module):
    node, _ = _make(node_module, enable=False)
    try:
        assert [s.topic_name for s in node.subscriptions] == ["camera_info"]
        assert any("disabled, not subscribed" in text for _, text in node.logger.lines)
    finally:
        node.destroy_node()


def test_node_adapter_bugs_in_callbacks_keep_traceback_and_node(node_module, monkeypatch):
    """rclpy ends spin() on an exception in a callback: the parameter callback and the
    diagnostics task turn a bug into a refusal / an ERROR status, with the traceback logged."""
    node, _ = _make(node_module)
    try:

        def broken_update(**changes):
            raise RuntimeError("lost a parameter")

        monkeypatch.setattr(node.core, "update_params", broken_update)
        (callback,) = node.param_callbacks
        result = callback([SimpleNamespace(name="score_threshold", value=0.4)])
        assert not result.successful
        assert result.reason == "internal error: RuntimeError: lost a parameter"

        def broken_diagnostics():
            raise KeyError("stage")

        monkeypatch.setattr(node.core, "diagnostics", broken_diagnostics)
        stat = node._updater.tasks[0][1](_Stat())
        assert stat.level == ERROR
        assert stat.message == "diagnostics failed: KeyError: 'stage'"
        traces = [text for level, text in node.logger.lines if level == "error"]
        assert len(traces) == 2 and all("Traceback (most recent call last)" in t for t in traces)
        assert "in broken_update" in traces[0] and "in broken_diagnostics" in traces[1]
    finally:
        node.destroy_node()


@pytest.mark.parametrize("bug", [ValueError("a bug, not bad input"), AttributeError("typo")])
def test_node_adapter_main_lets_a_bug_keep_its_traceback(node_module, monkeypatch, bug):
    """Only bad configuration (the package's errors, missing files) is one line and exit 1; a
    ValueError from a bug used to be printed as if it were a configuration error."""
    _Node.overrides = {"device": "cpu"}

    def broken_build(params):
        raise bug

    monkeypatch.setattr(core, "build_pipeline", broken_build)
    with pytest.raises(type(bug), match=str(bug).strip("'")):
        node_module.main(["detector_node"])
    assert sys.modules["rclpy"].calls[-1] == ("shutdown",)  # cleaned up all the same


def test_node_adapter_several_cameras(node_module):
    """image_topics: a subscription per camera (images and camera_info), detections and debug
    images beside each image topic, frames routed to their own camera, a status per camera."""
    front, rear = "/cam_front/image_raw", "/cam_rear/image_raw"
    node, pipeline = _make(node_module, image_topics=[front, rear], camera_height=1.65)
    classes = messages.rosbags_classes()
    try:
        subs = {s.topic_name: s for s in node.subscriptions}
        assert set(subs) == {front, rear, "/cam_front/camera_info", "/cam_rear/camera_info"}
        assert "detections" not in node.publishers and "~/debug_image" not in node.publishers
        for topic in ("/cam_front/detections", "/cam_rear/detections"):
            assert node.publishers[topic].qos.depth == 10
        assert node.publishers["/cam_rear/debug_image"].qos.depth == 1
        subs[front].callback(image_msg(classes, 7, sec=1, frame_id="front_optical"))
        assert node.core.wait_idle(10)
        subs[rear].callback(image_msg(classes, 9, sec=2, frame_id="rear_optical"))
        assert node.core.wait_idle(10)
        p2 = np.array([[700.0, 0, 4, 0], [0, 700.0, 3, 0], [0, 0, 1, 0]])
        header = messages.header_msg(0, "rear_optical", classes)
        subs["/cam_rear/camera_info"].callback(messages.camera_info_msg(p2, 8, 6, header, classes))
        (front_out,) = node.publishers["/cam_front/detections"].sent
        (rear_out,) = node.publishers["/cam_rear/detections"].sent
        assert (front_out.header.frame_id, front_out.header.stamp.sec) == ("front_optical", 1)
        assert (rear_out.header.frame_id, rear_out.header.stamp.sec) == ("rear_optical", 2)
        assert pipeline.seen == [7, 9]
        names = [name for name, _ in node._updater.tasks]
        assert names == ["detector", f"camera {front}", f"camera {rear}"]
        rear_stat = dict(node._updater.tasks[2][1](_Stat()).values)
        assert rear_stat["frames_processed"] == "1" and rear_stat["camera_info"].startswith("ok:")
        assert dict(node._updater.tasks[0][1](_Stat()).values)["frames_processed"] == "2"
        response = node.services["~/enable"].callback(
            SimpleNamespace(data=False), SimpleNamespace()
        )
        assert response.success
        assert sorted(s.topic_name for s in node.subscriptions) == [
            "/cam_front/camera_info",
            "/cam_rear/camera_info",
        ]
        response = node.services["~/enable"].callback(
            SimpleNamespace(data=True), SimpleNamespace()
        )
        assert response.message == f"enabled: subscribed to {front}, {rear}"
        assert {front, rear} <= {s.topic_name for s in node.subscriptions}
    finally:
        node.destroy_node()


def test_node_adapter_bad_camera_list_exits_1(node_module, capsys):
    _Node.overrides = {"device": "cpu", "image_topics": ["/cam/image_raw", "/cam/image_raw"]}
    assert node_module.main(["detector_node"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "dds_detector: error: image_topics ['/cam/image_raw', '/cam/image_raw']: "
        "'/cam/image_raw' is listed 2 times"
    )


def test_node_adapter_image_topics_declared_as_a_string_array(node_module):
    """rclpy takes an empty list for a byte array: image_topics is declared by its type."""
    node, _ = _make(node_module)
    try:
        parameter_type = sys.modules["rclpy.parameter"].Parameter.Type.STRING_ARRAY
        assert node.declared["image_topics"] is parameter_type  # not [] (a byte array)
        assert node.declared["score_threshold"] == 0.3
        assert node.core.params.image_topics == ()
    finally:
        node.destroy_node()


def test_node_adapter_image_topics_on_foxy(node_module, monkeypatch):
    """Foxy's rclpy cannot declare a parameter by its type (TypeError): image_topics is then
    declared unset, and takes its default or the list it is given."""
    declare = _Node.declare_parameter

    def foxy_declare(self, name, value, descriptor):
        if isinstance(value, enum.Enum):
            raise TypeError("The given value is not one of the allowed types")
        return declare(self, name, value, descriptor)

    monkeypatch.setattr(_Node, "declare_parameter", foxy_declare)
    node, _ = _make(node_module)
    try:
        assert node.declared["image_topics"] is None and node.core.params.image_topics == ()
    finally:
        node.destroy_node()
    node, _ = _make(node_module, image_topics=["/a/image_raw", "/b/image_raw"])
    try:
        assert node.core.params.image_topics == ("/a/image_raw", "/b/image_raw")
    finally:
        node.destroy_node()


@pytest.mark.parametrize("reuse", [True, False])
def test_node_adapter_owns_the_process_memory_setting(node_module, reuse):
    """The node (not the pipeline) opts its process into glibc keeping freed memory, as its
    reuse_freed_memory parameter says, and hands the setting back when it is destroyed."""
    from dds_perception.deploy import runtime

    with runtime.freed_memory_reuse(not reuse):  # the opposite before: the node changes it
        node, _ = _make(node_module, reuse_freed_memory=reuse)
        try:
            assert runtime.reusing_freed_memory() is reuse or not _glibc()
        finally:
            node.destroy_node()
        assert runtime.reusing_freed_memory() is (not reuse) or not _glibc()


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
