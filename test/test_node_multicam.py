"""Several cameras, one model (issue 16, point 4): the core keeps each camera's newest frame,
runs the frames that are ready as one batch, and publishes each camera's detections with its
own header on its own topic, with statistics per camera."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_node_core import FakePipeline, Recorder, image_msg, ticking

from dds_perception.ros import messages
from dds_perception.ros import params as node_params
from dds_perception.ros.core import DetectorCore
from dds_perception.ros.diagnostics import ERROR, OK
from dds_perception.ros.frames import Frame
from dds_perception.ros.params import DetectorParams, ParameterError
from dds_perception.ros.ports import Ports

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("/cam_front/image_raw", "/cam_left/image_raw", "/cam_rear/image_raw")


@pytest.fixture(scope="module")
def classes():
    return messages.rosbags_classes()


# --------------------------------------------------------------------------- parameters


def test_node_multicam_topics_follow_the_camera_namespace():
    params = DetectorParams(image_topics=[" /cam_front/image_raw", "cam_rear/image_rect"])
    front, rear = params.cameras
    assert params.image_topics == ("/cam_front/image_raw", "cam_rear/image_rect")
    assert (front.subscribed_topic, front.camera_info_topic, front.detections_topic) == (
        "/cam_front/image_raw",
        "/cam_front/camera_info",
        "/cam_front/detections",
    )
    assert (rear.detections_topic, rear.debug_image_topic) == (
        "cam_rear/detections",
        "cam_rear/debug_image",
    )
    compressed = DetectorParams(image_topics=["/cam_front/image_raw"], use_compressed=True)
    assert compressed.cameras[0].key == "/cam_front/image_raw/compressed"
    assert compressed.cameras[0].camera_info_topic == "/cam_front/camera_info"
    (single,) = DetectorParams().cameras  # one camera: the topics of always
    assert (single.key, single.detections_topic, single.debug_image_topic) == (
        "image",
        "detections",
        "~/debug_image",
    )
    assert node_params.parse_overrides(["image_topics:=[/a/image_raw, /b/image_raw]"]) == {
        "image_topics": ["/a/image_raw", "/b/image_raw"]
    }


@pytest.mark.parametrize(
    ("topics", "extra", "match"),
    [
        (["/a/image_raw", "/a/image_raw"], {}, r"image_topics \['/a/image_raw', '/a/image_raw'\]: "
         r"'/a/image_raw' is listed 2 times"),
        (["/a/image_raw", " "], {}, r"image_topics \['/a/image_raw', ''\]: entry 2 is empty"),
        (["/a/image_raw", "/a/image_rect"], {}, r"'/a/image_raw' and '/a/image_rect' would both "
         r"publish on '/a/detections'"),
        (["/a/image_raw"], {"camera_info_topic": "/calib"}, r"camera_info_topic '/calib': names "
         r"one camera's topic"),
        ("/a/image_raw", {}, r"image_topics '/a/image_raw': expected a list of strings"),
        ([1, 2], {}, r"image_topics \[1, 2\]: expected a list of strings"),
    ],
)  # fmt: skip
def test_node_multicam_bad_camera_list_is_a_clear_error(topics, extra, match):
    with pytest.raises(ParameterError, match=match):
        DetectorParams(image_topics=topics, **extra)


def test_node_multicam_bad_camera_list_in_a_parameter_file(tmp_path):
    path = tmp_path / "cams.yaml"
    path.write_text(
        "dds_detector:\n  ros__parameters:\n    image_topics: [/a/image_raw, /a/image_raw]\n"
    )
    with pytest.raises(ParameterError, match=r"cams\.yaml: image_topics .* listed 2 times"):
        node_params.load_params(path)


# --------------------------------------------------------------------------- the core


class BatchPipeline(FakePipeline):
    """The fake pipeline with ``detect_batch``: it records each batch (the frames' top-left
    values and sizes) and answers per frame, one box whose x1 is that frame's pixel value and
    whose image size is the frame's, so a test sees which frame produced which output."""

    def __init__(self, block: bool = False) -> None:
        super().__init__(block=block)
        self.batches: list[list[tuple[int, tuple[int, int]]]] = []

    def detect_batch(self, images):
        self.batches.append([(int(im[0, 0, 0]), im.shape[:2]) for im in images])
        return [FakePipeline.__call__(self, im) for im in images]


class CameraRecorder(Recorder):
    """Ports per camera: what each camera's detections port received."""

    def __init__(self, keys) -> None:
        super().__init__()
        self.per_camera = {key: [] for key in keys}

    def ports(self) -> Ports:
        ports = super().ports()
        ports.cameras = {
            key: Ports(publish_detections=sent.append) for key, sent in self.per_camera.items()
        }
        return ports


def make_multicam(classes, pipeline, cameras=CAMERAS, **params):
    recorder = CameraRecorder(cameras)
    node = DetectorCore(
        pipeline,
        DetectorParams(device="cpu", image_topics=list(cameras), **params),
        classes=classes,
        ports=recorder.ports(),
        clock=lambda: 100.25,
        monotonic=ticking(),
        logger=recorder,
    )
    return node, recorder


def camera_frame(classes, camera: int, value: int, sec: int, size=(6, 8)):
    """Camera ``camera``'s frame: pixels ``value``, stamp ``sec`` + camera/10 s, its frame_id."""
    return image_msg(
        classes, value, sec=sec, nanosec=camera * 100_000_000, frame_id=f"cam{camera}",
        height=size[0], width=size[1],
    )  # fmt: skip


def test_node_multicam_one_batch_per_ready_frames_never_mixed(classes):
    """While a frame is in inference, each camera's newest frame waits (an older one of the
    same camera is dropped); the waiting frames then run as ONE batch of different sizes, and
    each camera's port gets exactly its own frames with its own headers."""
    pipeline = BatchPipeline(block=True)
    node, recorder = make_multicam(classes, pipeline)
    sizes = {0: (6, 8), 1: (12, 16), 2: (5, 20)}
    front, left, rear = CAMERAS
    node.start()
    try:
        node.submit(camera_frame(classes, 0, 10, 1, sizes[0]), source=front)
        assert pipeline.entered.wait(10)  # front's first frame is in inference
        node.submit(camera_frame(classes, 1, 20, 1, sizes[1]), source=left)
        node.submit(camera_frame(classes, 2, 30, 1, sizes[2]), source=rear)
        node.submit(camera_frame(classes, 0, 11, 2, sizes[0]), source=front)
        node.submit(camera_frame(classes, 0, 12, 3, sizes[0]), source=front)  # replaces 11
        pipeline.release.set()
        assert node.wait_idle(10)
    finally:
        node.stop()
    # the first frame alone (nothing else was ready), then the three cameras in one call
    assert pipeline.seen[0] == 10
    assert pipeline.batches == [[(20, (12, 16)), (30, (5, 20)), (12, (6, 8))]]
    for camera, (key, values) in enumerate(zip(CAMERAS, ([10, 12], [20], [30]), strict=True)):
        sent = recorder.per_camera[key]
        assert [m.detections[0].bbox.center.position.x - 5 for m in sent] == values
        assert {m.header.frame_id for m in sent} == {f"cam{camera}"}
        assert {m.header.stamp.nanosec for m in sent} == {camera * 100_000_000}
        assert all(d.header.frame_id == f"cam{camera}" for m in sent for d in m.detections)
    assert [m.header.stamp.sec for m in recorder.per_camera[front]] == [1, 3]
    assert recorder.detections == [] and recorder.errors == [] and recorder.warnings == []
    assert vars(node.counters) == {"received": 5, "processed": 4, "dropped": 1, "failed": 0}
    reports = {r.name: r.as_dict() for r in node.camera_diagnostics()}
    assert list(reports) == [f"camera {topic}" for topic in CAMERAS]
    front_values = reports[f"camera {front}"]
    assert (front_values["frames_received"], front_values["frames_processed"]) == ("3", "2")
    assert front_values["frames_dropped"] == "1"
    assert front_values["detections_topic"] == "/cam_front/detections"
    assert reports[f"camera {left}"]["frames_dropped"] == "0"
    node_values = node.diagnostics().as_dict()
    assert (node_values["cameras"], node_values["batch_size_max"]) == ("3", "3")
    assert node_values["batch_size_mean"] == "2.00"  # a batch of one, then one of three


def test_node_multicam_silent_camera_never_stalls_the_others(classes):
    """Only two of three cameras send: their frames are processed as they come (the worker
    never waits for the silent one), which diagnostics show as waiting."""
    pipeline = BatchPipeline()
    node, recorder = make_multicam(classes, pipeline, latency_budget_ms=1e6)
    front, left, rear = CAMERAS
    node.start()
    try:
        for sec in range(1, 4):
            node.submit(camera_frame(classes, 0, sec, sec), source=front)
            assert node.wait_idle(10), "the front camera's frame waited for another camera"
        node.submit(camera_frame(classes, 1, 40, 4), source=left)
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert [len(recorder.per_camera[key]) for key in CAMERAS] == [3, 1, 0]
    reports = {r.name: r for r in node.camera_diagnostics()}
    assert reports[f"camera {rear}"].level == OK
    assert reports[f"camera {rear}"].message == "waiting for images"
    assert reports[f"camera {front}"].as_dict()["frames_processed"] == "3"
    assert node.diagnostics().level == OK


def test_node_multicam_bad_frame_fails_only_its_camera(classes):
    """A corrupt frame of one camera and a bug in another camera's planning fail those frames
    only; the other frame of the same batch goes out."""
    pipeline = BatchPipeline(block=True)
    node, recorder = make_multicam(classes, pipeline, latency_budget_ms=1e6)
    front, left, rear = CAMERAS
    plan = node.planner.plan

    def plan_with_a_bug(detections, size, header, source, params):
        if source == rear and header.stamp.sec == 2:
            raise KeyError("track 7")
        return plan(detections, size, header, source, params)

    node.planner.plan = plan_with_a_bug
    node.start()
    try:
        node.submit(camera_frame(classes, 2, 1, 1), source=rear)
        assert pipeline.entered.wait(10)
        node.submit(camera_frame(classes, 0, 5, 2), source=front)
        bad = image_msg(classes, 6, sec=2, encoding="yuv422_10", frame_id="cam1")
        node.submit(bad, source=left)
        node.submit(camera_frame(classes, 2, 7, 2), source=rear)
        pipeline.release.set()
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert pipeline.batches == [[(5, (6, 8)), (7, (6, 8))]]  # left's frame never decoded
    assert [len(recorder.per_camera[key]) for key in CAMERAS] == [1, 0, 1]
    reports = {r.name: r for r in node.camera_diagnostics()}
    assert reports[f"camera {left}"].level == ERROR
    assert "unsupported encoding 'yuv422_10'" in reports[f"camera {left}"].message
    assert reports[f"camera {rear}"].level == ERROR
    assert "KeyError: 'track 7'" in reports[f"camera {rear}"].message
    assert reports[f"camera {front}"].level == OK
    (line,) = recorder.warnings
    assert f"from {left} failed" in line and "Traceback" not in line
    (trace,) = recorder.errors
    assert f"from {rear} failed" in trace and "in plan_with_a_bug" in trace


def test_node_multicam_failed_batch_is_counted_per_camera(classes):
    """A bug in the batched network call: every frame of that batch fails (counted on each
    camera, traceback logged once), and the worker takes the next frames."""

    class Broken(BatchPipeline):
        def detect_batch(self, images):
            raise RuntimeError("CUDA error: out of memory")

    pipeline = Broken(block=True)
    node, recorder = make_multicam(classes, pipeline)
    front, left, rear = CAMERAS
    node.start()
    try:
        node.submit(camera_frame(classes, 0, 1, 1), source=front)
        assert pipeline.entered.wait(10)
        node.submit(camera_frame(classes, 1, 2, 1), source=left)
        node.submit(camera_frame(classes, 2, 3, 1), source=rear)
        pipeline.release.set()
        assert node.wait_idle(10)
        node.submit(camera_frame(classes, 1, 4, 2), source=left)  # alone: no batch, works
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert vars(node.counters) == {"received": 4, "processed": 2, "dropped": 0, "failed": 2}
    assert [len(recorder.per_camera[key]) for key in CAMERAS] == [1, 1, 0]
    (trace,) = recorder.errors  # the second frame's failure: the same bug, held back
    assert "RuntimeError: CUDA error: out of memory" in trace and "Traceback" in trace
    failed = {r.name: r.as_dict()["frames_failed"] for r in node.camera_diagnostics()}
    assert failed == {f"camera {front}": "0", f"camera {left}": "1", f"camera {rear}": "1"}


def test_node_multicam_trackers_and_camera_models_per_camera(classes):
    """Each camera has its own tracker (ids count per camera) and its own CameraInfo."""
    pipeline = BatchPipeline()
    node, recorder = make_multicam(classes, pipeline, cameras=CAMERAS[:2], camera_height=1.65)
    front, left = CAMERAS[:2]
    p2 = np.array([[700.0, 0, 4, 0], [0, 700.0, 3, 0], [0, 0, 1, 0]])
    header = messages.header_msg(0, "cam0", classes)
    node.submit_camera_info(messages.camera_info_msg(p2, 8, 6, header, classes), source=front)
    for sec in (1, 2):
        node.process(camera_frame(classes, 0, 1, sec), source=front)
        node.process(camera_frame(classes, 1, 1, sec), source=left)
    ids = {key: [m.detections[0].id for m in sent] for key, sent in recorder.per_camera.items()}
    assert ids == {front: ["1", "1"], left: ["1", "1"]}  # ids per camera, each car tracked
    reports = {r.name: r for r in node.camera_diagnostics()}
    assert reports[f"camera {front}"].as_dict()["camera_info"].startswith("ok: 8x6")
    assert reports[f"camera {left}"].as_dict()["camera_info"].startswith("none received on")
    assert "no usable CameraInfo on /cam_left/camera_info" in node.diagnostics().message
    assert node.diagnostics().as_dict()["camera_info"] == "1 of 2 cameras ok"


# --------------------------------------------------------------------------- the real pipeline


def test_node_multicam_real_pipeline_batch_of_different_sizes(classes):
    """The shipped detector through the core with three cameras whose frames differ in size
    (a KITTI frame, a crop, a portrait cut): one detect_batch call, and each camera's published
    boxes are those the pipeline finds in that frame alone, in that frame's pixels."""
    from dds_perception import pipeline as pipeline_module

    pipeline = pipeline_module.Pipeline.from_weights(
        pipeline_module.default_weights(), device="cpu", score_threshold=0.05
    )
    frames = sorted((REPO / "samples" / "kitti" / "training" / "image_2").glob("*.png"))
    kitti = cv2.cvtColor(cv2.imread(str(frames[0])), cv2.COLOR_BGR2RGB)
    other = cv2.cvtColor(cv2.imread(str(frames[1])), cv2.COLOR_BGR2RGB)
    rgbs = [kitti, np.ascontiguousarray(other[40:, 300:940]), np.ascontiguousarray(kitti[:, :280])]
    calls = []
    batch = pipeline.detect_batch
    pipeline.detect_batch = lambda images: calls.append(len(images)) or batch(images)
    node, recorder = make_multicam(classes, pipeline, score_threshold=0.05)
    outputs = node.process_batch(  # three frames ready together, as the worker finds them
        [
            camera_rgb_frame(classes, rgb, cam, key)
            for cam, (rgb, key) in enumerate(zip(rgbs, CAMERAS, strict=True))
        ]
    )
    assert calls == [3] and all(out is not None for out in outputs)
    assert recorder.errors == [] and recorder.warnings == [] and node.counters.failed == 0
    for camera, (rgb, key) in enumerate(zip(rgbs, CAMERAS, strict=True)):
        (msg,) = recorder.per_camera[key]
        assert msg.header.frame_id == f"cam{camera}"
        got = messages.msg_to_detections(msg)
        alone = pipeline(rgb)
        assert len(got) == len(alone) > 0
        np.testing.assert_allclose(got.boxes, alone.boxes, atol=0.05)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-3)
        height, width = rgb.shape[:2]
        assert (got.boxes[:, [0, 2]] >= -1).all() and (got.boxes[:, [0, 2]] <= width + 1).all()
        assert (got.boxes[:, [1, 3]] >= -1).all() and (got.boxes[:, [1, 3]] <= height + 1).all()


def camera_rgb_frame(classes, rgb, camera, key) -> Frame:
    header = messages.header_msg(5_000_000_000 + camera, f"cam{camera}", classes)
    return Frame(messages.rgb_to_image_msg(rgb, header, classes, "rgb8"), 0.0, key)


def test_node_multicam_worker_thread_never_raises(classes):
    """Many frames from three cameras at once, some corrupt: the worker survives them all."""
    pipeline = BatchPipeline()
    node, recorder = make_multicam(classes, pipeline)
    node.start()
    threads = [
        threading.Thread(
            target=lambda cam=cam: [
                node.submit(
                    camera_frame(classes, cam, v, v) if v % 4 else
                    image_msg(classes, v, sec=v, step=1, frame_id=f"cam{cam}"),
                    source=CAMERAS[cam],
                )
                for v in range(1, 30)
            ]
        )
        for cam in range(3)
    ]  # fmt: skip
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert node.wait_idle(10)
        assert node._thread is not None and node._thread.is_alive()
    finally:
        node.stop()
    counters = node.counters
    assert counters.received == 87 and recorder.errors == []
    assert counters.processed + counters.dropped + counters.failed == counters.received
    for camera, key in enumerate(CAMERAS):
        assert {m.header.frame_id for m in recorder.per_camera[key]} <= {f"cam{camera}"}
