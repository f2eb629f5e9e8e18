"""launch_testing (ROS 2 machines only): start detector.launch.py, publish camera images, and wait
for /detections (headers copied from the images) and /diagnostics (the latency keys).

Run on a ROS 2 machine after ``colcon build``:  ``launch_test test/test_node_launch.py`` or
``colcon test --packages-select dds_perception``. Elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip(
    "launch_testing", reason="launch_testing is not installed (needs a ROS 2 install)"
)
pytest.importorskip("rclpy", reason="rclpy is not installed (needs a ROS 2 install)")

import launch
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray

REPO = Path(__file__).resolve().parents[1]
CAMERA_TOPIC = "/launch_test_camera/image_raw"
FRAME_ID = "launch_test_camera"


@pytest.mark.launch_test
def generate_test_description():
    detector = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(REPO / "launch" / "detector.launch.py")),
        launch_arguments={
            "image_topic": CAMERA_TOPIC,
            "device": "cpu",
            "params_file": str(REPO / "config" / "detector.yaml"),
        }.items(),
    )
    return launch.LaunchDescription([detector, launch_testing.actions.ReadyToTest()])


def _camera_frame(stamp, width: int = 640, height: int = 480) -> Image:
    """A textured rgb8 frame (real pixels, deterministic) with the given stamp."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = FRAME_ID
    msg.height, msg.width, msg.encoding, msg.is_bigendian = height, width, "rgb8", 0
    msg.step = width * 3
    msg.data.frombytes(pixels.tobytes())
    return msg


class TestDetectorNode(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.shutdown()

    def setUp(self):
        self.client = rclpy.create_node("detector_launch_test_client")

    def tearDown(self):
        self.client.destroy_node()

    def test_images_give_detections_and_diagnostics(self):
        detections: list[Detection2DArray] = []
        diagnostics: list = []

        def on_diagnostics(msg: DiagnosticArray) -> None:
            diagnostics.extend(s for s in msg.status if s.name.startswith("dds_detector"))

        self.client.create_subscription(Detection2DArray, "/detections", detections.append, 10)
        self.client.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        publisher = self.client.create_publisher(Image, CAMERA_TOPIC, qos_profile_sensor_data)
        sent = set()
        deadline = time.monotonic() + 120.0  # model loading and warm-up on a slow CPU
        while time.monotonic() < deadline and not (detections and diagnostics):
            stamp = self.client.get_clock().now().to_msg()
            sent.add((stamp.sec, stamp.nanosec))
            publisher.publish(_camera_frame(stamp))
            rclpy.spin_once(self.client, timeout_sec=0.3)
        self.assertTrue(detections, "no Detection2DArray on /detections")
        self.assertTrue(diagnostics, "no dds_detector status on /diagnostics")
        header = detections[0].header
        self.assertEqual(header.frame_id, FRAME_ID)
        self.assertIn((header.stamp.sec, header.stamp.nanosec), sent)  # the image's own stamp
        keys = {kv.key for status in diagnostics for kv in status.values}
        for key in ("end_to_end_ms_p95", "inference_ms_mean", "age_ms_p50", "frames_received"):
            self.assertIn(key, keys)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
