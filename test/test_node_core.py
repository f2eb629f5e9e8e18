"""The detector node's plain-Python core, without ROS: parameters, frame slot, statistics,
diagnostics and message building into rosbags' classes (the same code fills rclpy's)."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dds_perception.detection import ground_plane
from dds_perception.ros import core, diagnostics, messages
from dds_perception.ros import params as node_params
from dds_perception.ros.core import DetectorCore
from dds_perception.ros.diagnostics import STAGES, STATS
from dds_perception.ros.params import DetectorParams, ParameterError
from dds_perception.ros.ports import Ports

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def classes():
    return messages.rosbags_classes()


@pytest.fixture(scope="module")
def typestore():
    return messages.rosbags_classes().typestore


@dataclass
class FakeDetections:
    boxes: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)


class FakePipeline:
    """The pipeline contract's interface; one box per frame whose x1 is the frame's top-left
    pixel value, so a test knows which frame produced which output. ``block`` holds every call
    until ``release`` is set (deterministic bursts)."""

    device = "cpu"

    def __init__(self, block: bool = False) -> None:
        self.class_names = ["car"]
        self.block = block
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []
        self.score_threshold, self.nms_iou, self.max_detections = 0.3, 0.5, 100

    def __call__(self, rgb: np.ndarray, encoding: str = "rgb8", **_kw) -> FakeDetections:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        self.seen.append(int(rgb[0, 0, 0]))
        self.entered.set()
        if self.block:
            assert self.release.wait(10), "test never released the pipeline"
        x1 = float(rgb[0, 0, 0])
        return FakeDetections(
            boxes=np.array([[x1, 2.0, x1 + 10.0, 22.0]], dtype=np.float32),
            scores=np.array([0.75], dtype=np.float32),
            class_names=["car"],
            image_size=rgb.shape[:2],
            timings={"decode": 0.0, "preprocess": 1.0, "inference": 2.0, "postprocess": 0.5},
        )


class Recorder:
    """Ports that keep what the core publishes; a logger that keeps what it logs."""

    def __init__(self, debug_wanted: bool = False) -> None:
        self.detections: list = []
        self.label_info: list = []
        self.debug: list = []
        self.debug_wanted = debug_wanted
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def ports(self) -> Ports:
        return Ports(
            publish_detections=self.detections.append,
            publish_label_info=self.label_info.append,
            publish_debug_image=self.debug.append,
            debug_image_wanted=lambda: self.debug_wanted,
        )

    def info(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def error(self, message: str) -> None:
        self.errors.append(message)


def ticking(step: float = 0.01):
    """A monotonic clock advancing ``step`` seconds per call (no wall-clock dependence)."""
    counter = itertools.count()
    return lambda: next(counter) * step


def image_msg(
    classes,
    value: int,
    *,
    sec: int = 100,
    nanosec: int = 0,
    frame_id="camera",
    encoding="rgb8",
    width=8,
    height=6,
    step=None,
    data=None,
):
    """An Image whose pixels all equal ``value`` (rgb8 unless told)."""
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4}.get(encoding, 3)
    step = width * channels if step is None else step
    if data is None:
        data = np.full(step * height, value, dtype=np.uint8)
    header = classes.Header(stamp=classes.Time(sec=sec, nanosec=nanosec), frame_id=frame_id)
    return classes.Image(
        header=header,
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=data,
    )


def make_core(classes, pipeline=None, recorder=None, **params) -> DetectorCore:
    recorder = recorder or Recorder()
    return DetectorCore(
        pipeline or FakePipeline(),
        DetectorParams(device="cpu", **params),
        classes=classes,
        ports=recorder.ports(),
        clock=lambda: 100.25,  # ROS "now": a frame stamped 100.0 s is 250 ms old
        monotonic=ticking(),
        logger=recorder,
    )


# --------------------------------------------------------------------------- parameters


def test_node_params_file_matches_defaults():
    """config/detector.yaml holds every parameter, with the dataclass's defaults."""
    import yaml

    block = yaml.safe_load((REPO / "config" / "detector.yaml").read_text())["dds_detector"]
    # image_topics (default: an empty list) cannot be written there: ROS 2 parameter files
    # cannot type an empty array (rcl takes no [] value), so the node declares it by type
    in_file = [name for name in node_params.parameter_names() if name != "image_topics"]
    assert list(block["ros__parameters"]) == in_file
    assert node_params.load_params(REPO / "config" / "detector.yaml") == DetectorParams()
    assert node_params.default_params_file() == REPO / "config" / "detector.yaml"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"device": "tpu"}, r"device 'tpu': unknown device"),
        ({"device": "cuda:x"}, r"unknown device"),
        ({"input_width": -32, "input_height": 64}, r"input_width -32: must be positive"),
        ({"input_width": 640}, r"set both or neither"),
        ({"score_threshold": 1.5}, r"score_threshold 1.5: must lie in \[0, 1\]"),
        ({"nms_iou": -0.1}, r"nms_iou -0.1: must lie in \[0, 1\]"),
        ({"vote_iou": -0.5}, r"vote_iou -0.5: must lie in \[0, 1\] \(or -1"),
        ({"vote_iou": 1.5}, r"vote_iou 1.5: must lie in"),
        ({"max_detections": 0}, r"max_detections 0: must be positive"),
        ({"max_detections": 20000}, r"max_detections 20000: must lie in \[1, 10000\]"),
        ({"input_width": 9600, "input_height": 64}, r"input_width 9600: must lie in \[0, 8192\]"),
        ({"latency_budget_ms": 0}, r"latency_budget_ms 0.0: must be positive"),
        ({"reliability": "fast"}, r"reliability 'fast': use best_effort or reliable"),
        ({"score_threshold": "high"}, r"score_threshold 'high': expected float, got str"),
        ({"half": 1}, r"half 1: expected bool, got int"),
        ({"image_topic": " "}, r"image_topic: must not be empty"),
    ],
)
def test_node_params_validation(changes, match):
    with pytest.raises(ParameterError, match=match):
        DetectorParams(**changes)


def test_node_params_types_and_sizes():
    params = DetectorParams(score_threshold=1, input_width=1248, input_height=384)
    assert params.score_threshold == 1.0 and isinstance(params.score_threshold, float)
    assert params.input_size == (384, 1248)  # (height, width), the pipeline's order
    assert DetectorParams().input_size is None
    assert DetectorParams(use_compressed=True).subscribed_topic == "image/compressed"


def test_node_params_file_blocks_and_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "/**:\n  ros__parameters:\n    device: cpu\n    score_threshold: 0.2\n"
        "/robot/dds_detector:\n  ros__parameters:\n    score_threshold: 0.6\n"
        "    use_sim_time: false\n    diagnostic_updater.period: 0.5\n"
        "    qos_overrides:\n      /parameter_events:\n        publisher:\n          depth: 5\n"
        "other_node:\n  ros__parameters:\n    whatever: 1\n"
    )
    params = node_params.load_params(path, overrides={"max_detections": 7})
    assert (params.device, params.score_threshold, params.max_detections) == ("cpu", 0.6, 7)

    path.write_text("dds_detector:\n  ros__parameters:\n    score_treshold: 0.4\n")
    with pytest.raises(ParameterError, match=r"p\.yaml: unknown parameter\(s\) score_treshold"):
        node_params.load_params(path)
    path.write_text("dds_detector:\n  ros__parameters:\n    nms_iou: 2.0\n")
    with pytest.raises(ParameterError, match=r"p\.yaml: nms_iou 2.0: must lie in"):
        node_params.load_params(path)
    path.write_text("other:\n  ros__parameters: {}\n")
    with pytest.raises(ParameterError, match=r"no 'dds_detector: ros__parameters:' block"):
        node_params.load_params(path)
    path.write_text("dds_detector: [1, 2\n")
    with pytest.raises(ParameterError, match=r"not valid YAML"):
        node_params.load_params(path)


def test_node_parse_overrides():
    values = node_params.parse_overrides(
        [
            "device:=cuda:0",
            "score_threshold=0.45",
            "half:=true",
            "weights:=123",
            "max_detections=5",
        ]
    )
    assert values == {
        "device": "cuda:0",
        "score_threshold": 0.45,
        "half": True,
        "weights": "123",
        "max_detections": 5,
    }
    with pytest.raises(ParameterError, match=r"override 'colour=red'"):
        node_params.parse_overrides(["colour=red"])


def test_node_build_pipeline_bad_weights(tmp_path):
    with pytest.raises(ParameterError, match=r"weights '.*missing\.safetensors': file not found"):
        core.build_pipeline(
            DetectorParams(device="cpu", weights=str(tmp_path / "missing.safetensors"))
        )


# --------------------------------------------------------------------------- frames


def test_node_core_frame_to_detections_with_header(classes, typestore):
    recorder = Recorder()
    node = make_core(classes, recorder=recorder)
    node.start()
    try:
        node.submit(image_msg(classes, 40, sec=100, nanosec=5, frame_id="cam_front"))
        assert node.wait_idle(10)
    finally:
        node.stop()
    (label_info,) = recorder.label_info
    assert [c.class_name for c in label_info.class_map] == ["car"]
    assert label_info.header.stamp.sec == 100 and label_info.header.stamp.nanosec == 250_000_000
    (out,) = recorder.detections
    assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (
        100,
        5,
        "cam_front",
    )
    (det,) = out.detections
    assert det.header.stamp.nanosec == 5 and det.header.frame_id == "cam_front"
    assert det.results[0].hypothesis.class_id == "car"
    assert det.results[0].hypothesis.score == pytest.approx(0.75)
    assert det.bbox.center.position.x == pytest.approx(45.0)  # (40 + 50) / 2
    assert det.bbox.center.position.y == pytest.approx(12.0)
    assert (det.bbox.size_x, det.bbox.size_y) == (pytest.approx(10.0), pytest.approx(20.0))
    # the message is a real rosbags message: it serialises to CDR and back
    raw = typestore.serialize_cdr(out, out.__msgtype__)
    back = typestore.deserialize_cdr(raw, out.__msgtype__)
    assert back.detections[0].results[0].hypothesis.class_id == "car"
    assert vars(node.counters) == {"received": 1, "processed": 1, "dropped": 0, "failed": 0}


def test_node_core_compressed_frame(classes):
    recorder = Recorder()
    node = make_core(classes, recorder=recorder, use_compressed=True)
    rgb = np.full((6, 8, 3), 60, dtype=np.uint8)
    ok, png = cv2.imencode(".png", rgb)
    assert ok
    header = classes.Header(stamp=classes.Time(sec=3, nanosec=0), frame_id="cam")
    msg = classes.CompressedImage(header=header, format="png", data=png.reshape(-1))
    out = node.process(msg)
    assert out is not None and out.header.frame_id == "cam"
    assert node.pipeline.seen == [60]


def test_node_core_burst_newest_frame_wins(classes):
    """Frames arriving while one is in inference replace each other; only the newest runs."""
    pipeline = FakePipeline(block=True)
    recorder = Recorder()
    node = make_core(classes, pipeline=pipeline, recorder=recorder)
    node.start()
    try:
        node.submit(image_msg(classes, 0, sec=0))
        assert pipeline.entered.wait(10)  # frame 0 is in inference now
        for value in range(1, 6):  # a burst of five frames during that inference
            node.submit(image_msg(classes, value, sec=value))
        assert node.counters.dropped == 4  # frames 1-4 were replaced, never queued
        pipeline.release.set()
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert pipeline.seen == [0, 5]
    assert [m.header.stamp.sec for m in recorder.detections] == [0, 5]
    assert vars(node.counters) == {"received": 6, "processed": 2, "dropped": 4, "failed": 0}
    assert node.diagnostics().as_dict()["frames_dropped"] == "4"


def _bad_frames(classes):
    yield "wrong step", image_msg(classes, 1, step=8 * 3 - 1)
    yield "unknown encoding", image_msg(classes, 1, encoding="yuv422_10")
    yield "empty", image_msg(classes, 1, width=0, height=0, data=np.zeros(0, np.uint8))
    yield "truncated", image_msg(classes, 1, data=np.zeros(8 * 3 * 6 - 5, np.uint8))
    header = classes.Header(stamp=classes.Time(sec=1, nanosec=0), frame_id="cam")
    yield (
        "corrupt jpeg",
        classes.CompressedImage(
            header=header, format="jpeg", data=np.frombuffer(b"\xff\xd8not a jpeg", np.uint8)
        ),
    )


@pytest.mark.parametrize("case", range(5))
def test_node_core_malformed_frame_counted_and_next_processed(classes, case):
    name, bad = list(_bad_frames(classes))[case]
    recorder = Recorder()
    node = make_core(classes, recorder=recorder)
    node.start()
    try:
        node.submit(bad)
        assert node.wait_idle(10)
        node.submit(image_msg(classes, 9, sec=2))
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert vars(node.counters) == {"received": 2, "processed": 1, "dropped": 0, "failed": 1}, name
    assert [m.header.stamp.sec for m in recorder.detections] == [2]
    assert len(recorder.warnings) == 1 and "failed" in recorder.warnings[0]
    assert "Traceback" not in recorder.warnings[0] and recorder.errors == []  # bad input
    report = node.diagnostics()
    assert report.level == diagnostics.ERROR and report.as_dict()["failed_in_window"] == "1/2"


def test_node_core_failure_log_is_throttled(classes):
    recorder = Recorder()
    node = make_core(classes, recorder=recorder)
    for _ in range(20):
        assert node.process(image_msg(classes, 1, encoding="yuv422_10")) is None
    assert node.counters.failed == 20
    assert len(recorder.warnings) == 1  # one report per 5 s, not one per frame
    assert "unsupported encoding 'yuv422_10'" in recorder.warnings[0]


# --------------------------------------------------------------------------- diagnostics


EXPECTED_KEYS = {
    "rate_hz",
    "input_rate_hz",
    *(f"{stage}_ms_{stat}" for stage in (*STAGES, "age") for stat in STATS),
    "frames_received",
    "frames_processed",
    "frames_dropped",
    "frames_failed",
    "failed_in_window",
    "device",
    "latency_budget_ms",
    "last_error",
    "enabled",
    "frames_ignored_disabled",
    "tracking",
    "tracks_active",
    "tracks_lost",
    "track_ids_issued",
    "camera_info",
    "camera_info_received",
    "camera_height_m",
    "distance_estimated",
    *(f"distance_omitted_{reason}" for reason in ground_plane.REASONS),
}


def test_node_diagnostics_keys_and_values(classes):
    node = make_core(classes, latency_budget_ms=1000.0)
    assert node.diagnostics().message == "waiting for images"
    for value in range(4):
        node.process(image_msg(classes, value, sec=100))
    report = node.diagnostics()
    values = report.as_dict()
    assert set(values) == EXPECTED_KEYS
    assert (report.level, report.name, report.hardware_id) == (diagnostics.OK, "detector", "cpu")
    assert values["inference_ms_mean"] == "2.00" and values["preprocess_ms_p95"] == "1.00"
    assert values["age_ms_max"] == "250.00"  # now 100.25 s - stamp 100.0 s
    # end to end: receipt -> published is a whole number of 10 ms clock ticks
    e2e = float(values["end_to_end_ms_p50"])
    assert e2e > 0 and round(e2e / 10.0, 6).is_integer()
    assert float(values["rate_hz"]) > 0
    assert values["frames_processed"] == "4" and values["device"] == "cpu"


def test_node_diagnostics_levels(classes):
    ok = make_core(classes, latency_budget_ms=1.0e5)
    ok.process(image_msg(classes, 1))
    assert ok.diagnostics().level == diagnostics.OK

    slow = make_core(classes, latency_budget_ms=1.0)  # every frame takes >= 10 ms ticks
    slow.process(image_msg(classes, 1))
    report = slow.diagnostics()
    assert report.level == diagnostics.WARN and "exceeds the 1.0 ms budget" in report.message

    failing = make_core(classes, latency_budget_ms=1.0e5, stats_window=3)
    failing.process(image_msg(classes, 1, encoding="bogus"))
    assert failing.diagnostics().level == diagnostics.ERROR
    for _ in range(3):  # the failure leaves the 3-frame window
        failing.process(image_msg(classes, 1))
    assert failing.diagnostics().level == diagnostics.OK
    assert failing.diagnostics().as_dict()["frames_failed"] == "1"


def test_node_diagnostics_msg_into_rosbags_classes(classes, typestore):
    node = make_core(classes, latency_budget_ms=1.0)
    node.process(image_msg(classes, 1))
    msg = node.diagnostics_msg()
    (status,) = msg.status
    assert status.name == "dds_detector: detector"
    assert status.level == classes.DiagnosticStatus.WARN
    assert {kv.key for kv in status.values} == EXPECTED_KEYS
    back = typestore.deserialize_cdr(
        typestore.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__
    )
    assert back.status[0].values[0].key == "rate_hz"


# --------------------------------------------------------------------------- debug image, params


def test_node_debug_image_only_when_wanted(classes):
    recorder = Recorder(debug_wanted=False)
    node = make_core(classes, recorder=recorder)
    node.process(image_msg(classes, 30, width=64, height=48))
    assert recorder.debug == []
    recorder.debug_wanted = True
    node.process(image_msg(classes, 30, width=64, height=48, frame_id="cam9"))
    (debug,) = recorder.debug
    assert (debug.height, debug.width, debug.encoding) == (48, 64, "rgb8")
    assert debug.header.frame_id == "cam9"
    pixels = np.asarray(debug.data).reshape(48, 64, 3)
    assert (pixels[2, 30:41] == (0, 255, 0)).all()  # the box's top edge is drawn in green
    node.update_params(publish_debug_image=False)
    node.process(image_msg(classes, 30, width=64, height=48))
    assert len(recorder.debug) == 1


def test_node_update_params_at_run_time(classes):
    node = make_core(classes)
    params = node.update_params(score_threshold=0.8, nms_iou=0.3, max_detections=5)
    assert params.score_threshold == 0.8
    pipeline = node.pipeline
    assert (pipeline.score_threshold, pipeline.nms_iou, pipeline.max_detections) == (0.8, 0.3, 5)
    with pytest.raises(ParameterError, match=r"score_threshold 1.2: must lie in \[0, 1\]"):
        node.update_params(score_threshold=1.2)
    with pytest.raises(ParameterError, match=r"device: cannot change while running"):
        node.update_params(device="cuda:0", score_threshold=0.1)
    assert node.params.score_threshold == 0.8  # nothing applied from a refused change
    node.update_params(device="cpu")  # unchanged value: accepted (ROS re-sets all at times)


def test_node_vote_iou_at_run_time_and_back_to_the_weights_files(classes):
    """vote_iou -1 (the default) keeps the weights file's box voting; a value replaces it at
    run time, and -1 puts the file's back."""
    node = make_core(classes)
    node.pipeline.config = SimpleNamespace(vote_iou=0.6)  # what a weights file says
    node.update_params(vote_iou=0.7)
    assert node.pipeline.vote_iou == 0.7
    node.update_params(vote_iou=-1.0)
    assert node.pipeline.vote_iou == 0.6
    node.update_params(vote_iou=0.0)
    assert node.pipeline.vote_iou == 0.0


# --------------------------------------------------------------------------- the real pipeline


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory):
    """The real inference pipeline loading a real weights file: a seeded, untrained detector
    (the shipped weights may not exist yet; what is tested is the plumbing, not the accuracy)."""
    import torch

    from dds_perception.detection.weights import build_detector, save_detector

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "untrained.safetensors"
    save_detector(path, build_detector())
    # a small network input keeps the test fast on a shared CPU (the letterbox maps back)
    params = DetectorParams(device="cpu", weights=str(path), input_width=640, input_height=192)
    return core.build_pipeline(params)


def test_node_build_pipeline_arguments(monkeypatch, tmp_path):
    """Empty weights mean the shipped model; sizes go to the pipeline as (height, width)."""
    from dds_perception import pipeline as pipeline_module

    calls = []
    shipped = tmp_path / "shipped.safetensors"
    monkeypatch.setattr(pipeline_module, "default_weights", lambda: shipped)
    monkeypatch.setattr(
        pipeline_module.Pipeline, "from_weights", lambda *a, **k: calls.append((a, k)) or "p"
    )
    params = DetectorParams(device="cpu", input_width=640, input_height=192, score_threshold=0.6)
    assert core.build_pipeline(params) == "p"
    (args, kwargs) = calls[0]
    assert args == (shipped,)
    assert kwargs == {
        "device": "cpu",
        "backend": "torch",
        "half": False,
        "score_threshold": 0.6,
        "nms_iou": 0.5,
        "vote_iou": None,  # -1: the weights file's own
        "max_detections": 100,
        "input_size": (192, 640),
    }
    core.build_pipeline(DetectorParams(device="cpu", vote_iou=0.0))  # 0: voting off
    assert calls[1][1]["vote_iou"] == 0.0


def test_node_build_pipeline_corrupt_weights(tmp_path):
    from dds_perception.utils.checkpoint import CheckpointError

    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors"):
        core.build_pipeline(DetectorParams(device="cpu", weights=str(path)))


def test_node_core_real_pipeline_on_kitti_frames(classes, real_pipeline, kitti_sample):
    """Real KITTI frames as rgb8, bgr8 and PNG messages through the core and the real pipeline:
    the published boxes are the pipeline's own, in source pixels, under the image's header."""
    path = sorted((kitti_sample / "training" / "image_2").glob("*.png"))[0]
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    expected = real_pipeline(rgb)
    header = classes.Header(stamp=classes.Time(sec=7, nanosec=42), frame_id="kitti_cam2")
    frames = [
        messages.rgb_to_image_msg(rgb, header, classes, "rgb8"),
        messages.rgb_to_image_msg(rgb, header, classes, "bgr8"),
        messages.compressed_image_msg(path.read_bytes(), "png", header, classes),
    ]
    recorder = Recorder()
    node = DetectorCore(
        real_pipeline,
        DetectorParams(device="cpu"),
        classes=classes,
        ports=recorder.ports(),
        logger=recorder,
    )
    for frame in frames:
        assert node.process(frame) is not None
    assert vars(node.counters)["processed"] == 3 and node.counters.failed == 0
    for out in recorder.detections:
        assert (out.header.stamp.sec, out.header.stamp.nanosec) == (7, 42)
        assert out.header.frame_id == "kitti_cam2"
        got = messages.msg_to_detections(out)
        assert got.boxes.shape == expected.boxes.shape
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
        if len(got):
            assert (got.boxes[:, [0, 2]] >= -1).all() and (got.boxes[:, [0, 2]] <= width + 1).all()
            assert (got.boxes[:, [1, 3]] >= -1).all() and (
                got.boxes[:, [1, 3]] <= height + 1
            ).all()
    report = node.diagnostics().as_dict()
    assert float(report["inference_ms_mean"]) > 0 and report["device"] == "cpu"
