"""The node core's outputs for planners: track ids, ground-plane positions from CameraInfo, and
enable/disable (issue 19), with a scripted pipeline and rosbags' message classes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from test_node_core import Recorder, image_msg, make_core, ticking

from dds_perception.detection import ground_plane
from dds_perception.ros import messages
from dds_perception.ros import params as node_params
from dds_perception.ros.core import DetectorCore
from dds_perception.ros.diagnostics import OK, WARN
from dds_perception.ros.params import DetectorParams, ParameterError

WIDTH, HEIGHT = 80, 60
K = [100.0, 0.0, 40.0, 0.0, 100.0, 30.0, 0.0, 0.0, 1.0]  # fx = fy = 100, centre (40, 30)


@pytest.fixture(scope="module")
def classes():
    return messages.rosbags_classes()


@dataclass
class Dets:
    boxes: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)


class ScriptedPipeline:
    """Returns the next scripted list of (box, score) per call."""

    device = "cpu"

    def __init__(self, frames: list[list[tuple[list[float], float]]]) -> None:
        self.class_names = ["car"]
        self.frames = list(frames)
        self.calls = 0
        self.score_threshold, self.nms_iou, self.max_detections = 0.3, 0.5, 100

    def __call__(self, rgb, *args, **kwargs) -> Dets:
        dets = self.frames[min(self.calls, len(self.frames) - 1)]
        self.calls += 1
        return Dets(
            np.array([b for b, _ in dets], dtype=np.float32).reshape(-1, 4),
            np.array([s for _, s in dets], dtype=np.float32),
            ["car"] * len(dets),
            {"inference": 1.0},
        )


def camera_info(classes, k=K, width=WIDTH, height=HEIGHT):
    header = messages.header_msg(0, "camera", classes)
    p = np.zeros((3, 4))
    p[:, :3] = np.asarray(k, dtype=np.float64).reshape(3, 3) if len(k) == 9 else 0.0
    msg = messages.camera_info_msg(p, width, height, header, classes)
    if len(k) != 9:
        msg.k = np.asarray(k, dtype=np.float64)  # a broken message, as a buggy driver sends
    return msg


def frame(classes, sec: int, nanosec: int = 0):
    return image_msg(classes, 10, sec=sec, nanosec=nanosec, width=WIDTH, height=HEIGHT)


def core_with(classes, frames, recorder=None, **params) -> DetectorCore:
    return make_core(classes, pipeline=ScriptedPipeline(frames), recorder=recorder, **params)


def test_planning_params_and_camera_info_topic():
    assert node_params.camera_info_topic_for("/camera/image_raw") == "/camera/camera_info"
    assert node_params.camera_info_topic_for("image") == "camera_info"
    assert node_params.camera_info_topic_for("/image_raw") == "/camera_info"
    assert node_params.camera_info_topic_for("front/image_rect/") == "front/camera_info"
    params = DetectorParams(image_topic="/kitti/camera/image_raw")
    assert params.resolved_camera_info_topic == "/kitti/camera/camera_info"
    assert DetectorParams(camera_info_topic="/x/info").resolved_camera_info_topic == "/x/info"
    assert DetectorParams(camera_height=-1.0).camera_height == -1.0  # no error: no distances
    with pytest.raises(ParameterError, match=r"camera_height nan: must be a finite number"):
        DetectorParams(camera_height=float("nan"))
    with pytest.raises(ParameterError, match=r"camera_pitch 2.0: must lie in \[-1.0, 1.0\]"):
        DetectorParams(camera_pitch=2.0)
    runtime = node_params.runtime_parameters()
    assert {"enable", "tracking", "camera_height", "track_buffer"} <= runtime


def test_planning_track_ids_in_the_messages(classes):
    """Two cars over three frames, one missed in the middle frame: stable ids in
    Detection2D.id; tracking off leaves ids empty."""
    a, b = [10.0, 20.0, 30.0, 40.0], [50.0, 22.0, 70.0, 38.0]
    frames = [[(a, 0.9), (b, 0.8)], [(b, 0.8)], [(a, 0.9), (b, 0.8)]]
    recorder = Recorder()
    node = core_with(classes, frames, recorder)
    for index in range(3):  # 10 Hz
        node.process(frame(classes, 100, nanosec=index * 100_000_000))
    ids = [[d.id for d in out.detections] for out in recorder.detections]
    assert ids == [["1", "2"], ["2"], ["1", "2"]]
    assert messages.msg_to_detections(recorder.detections[2]).ids == ["1", "2"]
    report = node.diagnostics().as_dict()
    assert (report["tracking"], report["tracks_active"], report["track_ids_issued"]) == (
        "on",
        "2",
        "2",
    )
    node.update_params(tracking=False)
    node.process(frame(classes, 101))
    assert [d.id for d in recorder.detections[-1].detections] == ["", ""]
    assert node.diagnostics().as_dict()["tracking"] == "off"


def test_planning_positions_from_camera_info(classes, typestore_roundtrip):
    """camera_height 1.5, fx = fy = 100, cy = 30: a box ending at row 50 stands
    1.5 * 100 / 20 = 7.5 m ahead; with the 1.4 m centre offset 8.9 m (its centre column 40 is
    the principal point, so x = 0)."""
    box = [30.0, 35.0, 50.0, 50.0]
    recorder = Recorder()
    node = core_with(classes, [[(box, 0.9)]], recorder, camera_height=1.5)
    node.process(frame(classes, 100))  # no CameraInfo yet: as before, position zero
    (det,) = recorder.detections[-1].detections
    assert det.results[0].pose.pose.position.z == 0.0
    report = node.diagnostics()
    assert report.level == WARN and "no usable CameraInfo on camera_info" in report.message
    assert report.as_dict()["distance_omitted_no_camera_info"] == "1"

    node.submit_camera_info(camera_info(classes))
    out = node.process(frame(classes, 101))
    (det,) = out.detections
    pose = det.results[0].pose
    position = (pose.pose.position.x, pose.pose.position.y, pose.pose.position.z)
    assert position == pytest.approx((0.0, 1.5, 8.9))
    cov = np.asarray(pose.covariance).reshape(6, 6)
    sigma_z = np.sqrt(cov[2, 2])
    # one pixel at 7.5 m: 7.5^2 / (100 * 1.5) = 0.375 m, plus the model terms
    assert 0.375 < sigma_z < 1.5 and cov[5, 5] == 1.0e9
    back = typestore_roundtrip(out)  # the pose survives CDR (as on the wire)
    assert back.detections[0].results[0].pose.pose.position.z == pytest.approx(8.9)
    assert messages.msg_to_detections(out).positions[0] == pytest.approx([0.0, 1.5, 8.9])
    values = node.diagnostics().as_dict()
    assert values["distance_estimated"] == "1" and values["camera_info"].startswith("ok: 80x60")
    assert node.diagnostics().level == OK


@pytest.fixture
def typestore_roundtrip(classes):
    store = classes.typestore

    def roundtrip(msg):
        return store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)

    return roundtrip


@pytest.mark.parametrize(
    ("k", "width", "height", "reason"),
    [
        ([0.0, 0, 40, 0, 100, 30, 0, 0, 1], WIDTH, HEIGHT, "bad_camera_info"),  # zero fx
        ([0.0] * 9, WIDTH, HEIGHT, "bad_camera_info"),  # uncalibrated
        ([100.0, 0, 40, 0, 100, 30, 0, 0], WIDTH, HEIGHT, "bad_camera_info"),  # K of 8 values
        (K, 1242, 375, "size_mismatch"),  # the CameraInfo of another resolution
    ],
)
def test_planning_bad_camera_info_is_counted_not_raised(classes, k, width, height, reason):
    recorder = Recorder()
    node = core_with(classes, [[([30.0, 35.0, 50.0, 50.0], 0.9)]], recorder, camera_height=1.5)
    node.submit_camera_info(camera_info(classes, k, width, height))
    out = node.process(frame(classes, 100))
    assert out is not None and node.counters.failed == 0
    assert out.detections[0].results[0].pose.pose.position.z == 0.0
    values = node.diagnostics().as_dict()
    assert values[f"distance_omitted_{reason}"] == "1"
    if reason == "bad_camera_info":
        assert values["camera_info"].startswith("invalid: CameraModelError")
        assert len(recorder.warnings) == 1  # logged once per new problem, not per frame
        node.submit_camera_info(camera_info(classes, k, width, height))
        assert len(recorder.warnings) == 1


def test_planning_bad_boxes_and_heights_are_reasons(classes):
    frames = [
        [
            ([30.0, 10.0, 50.0, 25.0], 0.9),  # bottom above the horizon (row 30)
            ([30.0, 40.0, 50.0, 59.5], 0.9),  # touches the image bottom: truncated
            ([30.0, 35.0, 50.0, 50.0], 0.9),  # fine
        ]
    ]
    node = core_with(classes, frames, camera_height=1.5)
    node.submit_camera_info(camera_info(classes))
    out = node.process(frame(classes, 100))
    assert [d.results[0].pose.pose.position.z for d in out.detections][:2] == [0.0, 0.0]
    values = node.diagnostics().as_dict()
    assert values["distance_omitted_above_horizon"] == "1"
    assert values["distance_omitted_truncated"] == "1"
    assert values["distance_estimated"] == "1"
    node.update_params(camera_height=0.0)  # "not configured": omitted, counted, no warning
    node.process(frame(classes, 101))
    assert node.diagnostics().as_dict()["distance_omitted_no_camera_height"] == "3"
    assert node.diagnostics().level == OK


class SubscriptionPort:
    """The runtime's side of ``Ports.set_image_subscription``: records the calls."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, subscribed: bool) -> None:
        self.calls.append(subscribed)

    @property
    def subscribed(self) -> bool:
        return bool(self.calls) and self.calls[-1]


def test_planning_enable_disable(classes, monkeypatch):
    """Disabling unsubscribes (through the port), ignores frames still arriving, drops the
    pending one, resets the tracks, releases memory and says so in diagnostics; no inference
    happens while disabled; enabling subscribes again."""
    from dds_perception.utils import runtime

    released = []
    monkeypatch.setattr(
        runtime, "release_cached_memory", lambda device: released.append(device) or ["heap"]
    )
    recorder = Recorder()
    port = SubscriptionPort()
    ports = recorder.ports()
    ports.set_image_subscription = port
    pipeline = ScriptedPipeline([[([10.0, 20.0, 30.0, 40.0], 0.9)]])
    node = DetectorCore(
        pipeline,
        DetectorParams(device="cpu"),
        classes=classes,
        ports=ports,
        clock=lambda: 100.25,
        monotonic=ticking(),
        logger=recorder,
    )
    node.start()
    try:
        assert port.calls == [True]
        node.submit(frame(classes, 100))
        assert node.wait_idle(10) and pipeline.calls == 1
        ok, message = node.set_enabled(False)
        assert ok and message == "disabled: not subscribed to images, no inference"
        assert port.calls == [True, False] and released == ["cpu"]
        for sec in (101, 102):  # frames already in flight when it unsubscribed
            node.submit(frame(classes, sec))
        assert node.wait_idle(10)
        assert pipeline.calls == 1 and node.counters.processed == 1
        report = node.diagnostics()
        values = report.as_dict()
        assert report.level == OK and report.message.startswith("disabled")
        assert values["enabled"] == "false" and values["frames_ignored_disabled"] == "2"
        assert values["frames_processed"] == "1" and values["tracks_active"] == "0"
        ok, message = node.set_enabled(True)
        assert ok and message.startswith("enabled") and port.calls == [True, False, True]
        node.submit(frame(classes, 103))
        assert node.wait_idle(10) and pipeline.calls == 2
        assert recorder.detections[-1].detections[0].id == "2"  # a new track after the pause
        assert node.diagnostics().as_dict()["enabled"] == "true"
        node.update_params(enable=True)  # unchanged: no second subscription
        assert port.calls == [True, False, True]
    finally:
        node.stop()


def test_planning_starts_disabled(classes):
    port = SubscriptionPort()
    recorder = Recorder()
    ports = recorder.ports()
    ports.set_image_subscription = port
    node = DetectorCore(
        ScriptedPipeline([[]]),
        DetectorParams(device="cpu", enable=False),
        classes=classes,
        ports=ports,
        logger=recorder,
    )
    node.start()
    node.stop()
    assert port.calls == [False] and not port.subscribed


def test_planning_disable_while_a_frame_is_in_inference_releases_after_it(classes, monkeypatch):
    from test_node_core import FakePipeline

    from dds_perception.utils import runtime

    released = []
    monkeypatch.setattr(runtime, "release_cached_memory", lambda d: released.append(d) or [])
    pipeline = FakePipeline(block=True)
    node = make_core(classes, pipeline=pipeline)
    node.start()
    try:
        node.submit(image_msg(classes, 1))
        assert pipeline.entered.wait(10)
        node.submit(image_msg(classes, 2))  # pending behind the one in inference
        node.update_params(enable=False)
        assert released == [] and node.counters.dropped == 1  # the pending frame is dropped
        pipeline.release.set()
        assert node.wait_idle(10)
        deadline = 100
        while not released and deadline:
            import time

            time.sleep(0.01)
            deadline -= 1
        assert released == ["cpu"] and pipeline.seen == [1]
    finally:
        node.stop()


def test_planning_kitti_frame_distances_match_labels(classes, kitti_sample):
    """A real KITTI frame's labelled car boxes through the core with the frame's CameraInfo
    (as kitti2bag writes it) and camera_height 1.65: the published z of clearly visible cars
    within 40 m is within 10 % of the labelled location's z for the median car (a car on a
    slope, e.g. frame 000002's 34 m car standing 0.6 m below the camera's road, is off more)."""
    import cv2

    from dds_perception.data.kitti import read_calib_p2, read_label_file

    training = kitti_sample / "training"
    errors = []
    for path in sorted((training / "image_2").glob("*.png"))[:10]:
        labels = [
            o
            for o in read_label_file(training / "label_2" / f"{path.stem}.txt")
            if o.type == "Car" and o.occluded == 0 and o.truncated < 0.1 and o.location[2] < 40
        ]
        if not labels:
            continue
        height, width = cv2.imread(str(path)).shape[:2]
        p2 = read_calib_p2(training / "calib" / f"{path.stem}.txt")
        header = messages.header_msg(0, "cam2", classes)
        pipeline = ScriptedPipeline([[(list(o.bbox), 0.9) for o in labels]])
        node = DetectorCore(
            pipeline, DetectorParams(device="cpu", camera_height=1.65), classes=classes
        )
        node.submit_camera_info(messages.camera_info_msg(p2, width, height, header, classes))
        rgb = np.zeros((height, width, 3), dtype=np.uint8)
        out = node.process(messages.rgb_to_image_msg(rgb, header, classes))
        for det, obj in zip(out.detections, labels, strict=True):
            z = det.results[0].pose.pose.position.z
            if obj.bbox[3] < height - 2:
                errors.append(abs(z - obj.location[2]) / obj.location[2])
    assert len(errors) >= 5
    assert np.median(errors) <= 0.10, errors
    assert ground_plane.KITTI_CAMERA_HEIGHT == 1.65
