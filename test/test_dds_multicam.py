"""Several cameras on the Cyclone DDS runtime, in this process over loopback (issue 16, point 4):
the node subscribes each camera's image topic, publishes each camera's detections beside it with
that frame's header, and one diagnostics status per camera."""

from __future__ import annotations

import threading

import pytest
from dds_env import loopback_domain, wait_until

pytest.importorskip("cyclonedds", reason="the DDS runtime needs cyclonedds (pip install '.[dds]')")

from test_node_core import image_msg
from test_node_multicam import BatchPipeline

from dds_perception.ros import messages
from dds_perception.ros.dds import runtime as rt
from dds_perception.ros.dds.node import DdsDetectorNode
from dds_perception.ros.params import DetectorParams

CAMERAS = ("/cam_a/image_raw", "/cam_b/image_raw")


@pytest.fixture(scope="module")
def domain() -> int:
    with loopback_domain() as domain:
        yield domain


def test_dds_node_several_cameras(domain: int) -> None:
    classes = messages.rosbags_classes()
    types = messages.MSGTYPES
    params = DetectorParams(device="cpu", image_topics=list(CAMERAS), reliability="reliable")
    node = DdsDetectorNode(BatchPipeline(), params, domain=domain)
    client = rt.DdsRuntime(domain=domain, typestore=classes.typestore)
    lock = threading.Lock()
    received: dict[str, list] = {"/cam_a/detections": [], "/cam_b/detections": []}
    statuses: list = []

    def keep(topic: str):
        def callback(msg) -> None:
            with lock:
                received[topic].append(msg)

        return callback

    try:
        for topic in received:
            client.subscribe(topic, types["Detection2DArray"], keep(topic), rt.reliable_qos(10))
        client.subscribe(
            "/diagnostics", types["DiagnosticArray"], statuses.append, rt.reliable_qos(10)
        )
        publishers = [
            client.publisher(topic, types["Image"], rt.sensor_qos("reliable")) for topic in CAMERAS
        ]
        node.start()
        client.start()
        assert wait_until(lambda: all(p.subscription_count() == 1 for p in publishers))
        assert wait_until(lambda: all(client.publisher_count(topic) == 1 for topic in received)), (
            "the node's detections publishers were not discovered"
        )
        for sec in range(1, 4):  # lockstep: the newest frame wins, so wait for each answer
            for camera, pub in enumerate(publishers):
                frame = image_msg(classes, 10 * camera + sec, sec=sec, frame_id=f"cam{camera}")
                pub.publish(frame)
            assert wait_until(lambda sec=sec: all(len(m) == sec for m in received.values())), (
                received
            )
        node.publish_diagnostics()
        assert wait_until(lambda: statuses)
    finally:
        node.close()
        client.close()
    for camera, topic in enumerate(received):
        msgs = received[topic]
        assert {m.header.frame_id for m in msgs} == {f"cam{camera}"}
        assert sorted(m.header.stamp.sec for m in msgs) == [1, 2, 3]
        xs = sorted(round(m.detections[0].bbox.center.position.x - 5) for m in msgs)
        assert xs == [10 * camera + sec for sec in (1, 2, 3)]  # each from its own frames
    names = [status.name for status in statuses[0].status]
    assert names == [
        "dds_detector: detector",
        "dds_detector: camera /cam_a/image_raw",
        "dds_detector: camera /cam_b/image_raw",
    ]
    values = {kv.key: kv.value for kv in statuses[0].status[1].values}
    assert values["frames_processed"] == "3" and values["detections_topic"] == "/cam_a/detections"
