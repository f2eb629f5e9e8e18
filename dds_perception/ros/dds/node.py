"""Run the detector node on Cyclone DDS without ROS 2: camera images in, Detection2DArray out.

examples:
  dds-perception node -p image_topic:=/kitti/camera/image_raw -p device:=cpu
  dds-perception node --params-file config/detector.yaml --domain-id 7
  ROS_DOMAIN_ID=7 dds-perception node -p use_compressed:=true -p reliability:=reliable
  dds-perception node -p "image_topics:=[/cam_front/image_raw, /cam_rear/image_raw]"
  ros2 topic echo /detections        # on a ROS 2 machine on the same domain (any RMW)

The node is the same plain-Python core as the rclpy node `detector_node` (parameters from
config/detector.yaml, newest frame wins, counters, latency statistics, diagnostics, track ids,
ground-plane distances), on this runtime: it subscribes `image` (or `image/compressed`) and
`camera_info`, publishes `detections`, `label_info` (transient local), `/diagnostics` (every
--diagnostics-period s) and `~/debug_image` (only while it has a subscriber), with the DDS topic
and type names of ROS 2 (`rt/detections`, `vision_msgs::msg::dds_::Detection2DArray_`), and
serves `~/enable` (std_srvs/SetBool in rmw_cyclonedds_cpp's request/reply layout). SIGINT and
SIGTERM stop it cleanly, exit code 0. With image_topics it runs several cameras as one batch and
publishes each camera's detections beside its image topic (/cam_front/detections).

Enable/disable on this runtime: the `~/enable` service sets the `enable` parameter as on the
rclpy node (no ROS parameter services exist here, so the other run-time parameters are fixed
at start-up: -p enable:=false starts it paused). Disabled, the node deletes its image reader
(publishers stop sending it frames), keeps publishing diagnostics ("disabled ..."), and frees
cached memory. From a ROS 2 machine on the same domain with rmw_cyclonedds_cpp:
  ros2 service call /dds_detector/enable std_srvs/srv/SetBool "{data: false}"
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dds_perception.ros import core, messages
from dds_perception.ros.error_log import ErrorLog
from dds_perception.ros.params import NODE_NAME, DetectorParams, load_params, parse_overrides
from dds_perception.ros.ports import Ports
from dds_perception.utils.errors import UsageError

NAMESPACE_HELP = "ROS namespace of the node and its relative topics (default /)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params-file",
        default=None,
        metavar="YAML",
        help="ROS 2 parameter file with a 'dds_detector: ros__parameters:' block "
        "(default: config/detector.yaml)",
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME:=VALUE",
        help="override one parameter, e.g. -p device:=cpu (repeatable)",
    )
    parser.add_argument(
        "--domain-id",
        type=int,
        default=None,
        help="DDS domain (default: $ROS_DOMAIN_ID, else 0)",
    )
    parser.add_argument("--namespace", default="/", help=NAMESPACE_HELP)
    parser.add_argument(
        "--diagnostics-period",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between /diagnostics messages (diagnostic_updater's default: 1)",
    )


def _logger() -> logging.Logger:
    log = logging.getLogger(NODE_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class DdsDetectorNode:
    """The ``dds_detector`` node on :class:`~dds_perception.ros.dds.runtime.DdsRuntime`.

    Topics and QoS as the rclpy node (docs/node.md, "Topics"): the image subscription with
    sensor-data QoS, ``detections`` reliable depth 10, ``label_info`` reliable transient local
    depth 1, ``~/debug_image`` reliable depth 1, ``/diagnostics`` reliable depth 10.
    """

    def __init__(
        self,
        pipeline: Any,
        params: DetectorParams,
        *,
        domain: int | None = None,
        namespace: str = "/",
        logger: logging.Logger | None = None,
    ) -> None:
        from dds_perception.ros.dds import runtime as rt

        self.log = logger or _logger()
        self.params = params
        self.classes = messages.rosbags_classes()
        self.runtime = rt.DdsRuntime(
            domain=domain,
            namespace=namespace,
            node_name=NODE_NAME,
            typestore=self.classes.typestore,
            on_error=self.log.warning,
            on_bug=self.log.error,
        )
        self._errors = ErrorLog(self.log.warning, self.log.error)
        types = messages.MSGTYPES
        # each camera's detections and debug image: 'detections' and '~/debug_image' for the
        # one camera of image_topic, beside each image topic for image_topics
        self.detections_pubs: dict[str, Any] = {}
        self.debug_pubs: dict[str, Any] = {}
        for camera in params.cameras:
            self.detections_pubs[camera.key] = self.runtime.publisher(
                camera.detections_topic, types["Detection2DArray"], rt.reliable_qos(10)
            )
            self.debug_pubs[camera.key] = self.runtime.publisher(
                camera.debug_image_topic, types["Image"], rt.reliable_qos(1)
            )
        first = params.cameras[0].key
        self.detections_pub, self.debug_pub = self.detections_pubs[first], self.debug_pubs[first]
        self.label_pub = self.runtime.publisher("label_info", types["LabelInfo"], rt.latched_qos())
        self.diagnostics_pub = self.runtime.publisher(
            "/diagnostics", types["DiagnosticArray"], rt.reliable_qos(10)
        )
        camera_ports = {key: self._camera_ports(key) for key in self.detections_pubs}
        ports = dataclasses.replace(
            camera_ports[first],
            publish_label_info=self.label_pub.publish,
            set_image_subscription=self._set_image_subscription,
            cameras=camera_ports if params.image_topics else {},
        )
        self.core = core.DetectorCore(
            pipeline,
            params,
            classes=self.classes,
            ports=ports,
            clock=time.time,
            logger=self.log,
            node_name=NODE_NAME,
        )
        image_type = types["CompressedImage"] if params.use_compressed else types["Image"]
        self.image_topics = [self.runtime.name(c.subscribed_topic) for c in params.cameras]
        self.image_topic = self.image_topics[0]
        self.image_type = image_type
        self._image_subs: dict[str, Any] = {}  # camera key -> its image reader
        self._image_lock = threading.Lock()
        self.camera_info_topics = [self.runtime.name(c.camera_info_topic) for c in params.cameras]
        self.camera_info_topic = self.camera_info_topics[0]
        for camera in params.cameras:
            self.runtime.subscribe(  # best effort: matches reliable and best-effort drivers
                camera.camera_info_topic,
                types["CameraInfo"],
                functools.partial(self.core.submit_camera_info, source=camera.key),
                rt.sensor_qos("best_effort"),
            )
        self.runtime.service("~/enable", "std_srvs/srv/SetBool", self._on_enable)

    def _camera_ports(self, key: str) -> Ports:
        detections, debug = self.detections_pubs[key], self.debug_pubs[key]
        return Ports(
            publish_detections=detections.publish,
            publish_debug_image=debug.publish,
            debug_image_wanted=lambda: debug.subscription_count() > 0,
        )

    def _set_image_subscription(self, subscribed: bool) -> None:
        """Create or delete the cameras' image readers (the ``enable`` parameter); idempotent."""
        from dds_perception.ros.dds import runtime as rt

        with self._image_lock:
            if subscribed:
                for camera in self.params.cameras:
                    if camera.key not in self._image_subs:
                        self._image_subs[camera.key] = self.runtime.subscribe(
                            camera.subscribed_topic,
                            self.image_type,
                            functools.partial(self.core.submit, source=camera.key),
                            rt.sensor_qos(self.params.reliability),
                        )
            else:
                while self._image_subs:
                    self.runtime.unsubscribe(self._image_subs.popitem()[1])

    def _on_enable(self, request: Any) -> dict[str, Any]:
        """``~/enable`` (std_srvs/SetBool): the ``enable`` parameter, applied by the core."""
        success, message = self.core.set_enabled(bool(request.data))
        self.log.info(f"~/enable {bool(request.data)}: {message}")
        return {"success": success, "message": message}

    def start(self) -> None:
        """Publish the label info, start the worker and the subscription dispatcher."""
        self.core.start()  # subscribes to the images through the port when enable is true
        self.runtime.start()
        state = "subscribed to" if self.params.enable else "disabled, not subscribed to"
        published = [
            *(pub.topic_name for pub in self.detections_pubs.values()),
            self.label_pub.topic_name,
            self.diagnostics_pub.topic_name,
            *(pub.topic_name for pub in self.debug_pubs.values()),
        ]
        self.log.info(
            f"ready: domain {self.runtime.domain_id}, {state} {', '.join(self.image_topics)} "
            f"({self.image_type}, {self.params.reliability}) and "
            f"{', '.join(self.camera_info_topics)}, device {self.core.device}; publishing "
            f"{', '.join(published)}; service ~/enable"
        )

    def publish_diagnostics(self) -> None:
        self.diagnostics_pub.publish(self.core.diagnostics_msg())

    def spin(self, stop: threading.Event, period: float = 1.0) -> None:
        """Publish diagnostics every ``period`` s until ``stop`` is set."""
        while not stop.wait(period):
            try:
                self.publish_diagnostics()
            except Exception as error:  # diagnostics must never take the node down
                self._errors.report(error, "diagnostics not published", "diagnostics")

    def close(self, timeout: float = 0.4) -> None:
        """Stop taking frames, let the frame in work finish (up to ``timeout``), leave DDS."""
        self.runtime.stop_dispatch(0.3)  # its wait wakes every 0.1 s
        self.core.stop(timeout)
        self.runtime.close(0.2)
        c = self.core.counters
        self.log.info(
            f"stopped: {c.received} frames received, {c.processed} processed, "
            f"{c.dropped} dropped, {c.failed} failed"
        )


def install_stop_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (a clean shutdown with exit code 0, not an exception)."""

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run_stoppable(
    command: str,
    work: Callable[[argparse.Namespace, threading.Event], dict[str, int]],
    args: argparse.Namespace,
) -> dict[str, int] | None:
    """``work(args, stop)`` for a bag command (play, record) until done or SIGINT/SIGTERM.

    Returns its per-topic message counts, or None after printing ``dds-perception COMMAND:
    error: ...`` when DDS is unavailable or fails.
    """
    from dds_perception.ros.dds import DdsError, require

    stop = threading.Event()
    install_stop_signals(stop)
    try:
        require()
        return work(args, stop)
    except DdsError as error:
        print(f"dds-perception {command}: error: {error}", file=sys.stderr)
        return None


def format_counts(counts: dict[str, int]) -> str:
    """``"topic_a 3, topic_b 5"`` (by topic), or ``"none"``."""
    return ", ".join(f"{topic} {n}" for topic, n in sorted(counts.items())) or "none"


def run(args: argparse.Namespace) -> int:
    from dds_perception.ros.dds import DdsError, require

    log = _logger()
    try:
        require()
        params = load_params(args.params_file, parse_overrides(args.param))
    except DdsError as error:
        print(f"dds-perception node: error: {error}", file=sys.stderr)
        return 1
    if args.diagnostics_period <= 0:
        raise UsageError(f"--diagnostics-period {args.diagnostics_period}: must be positive")
    stop = threading.Event()
    install_stop_signals(stop)  # before loading the model: a SIGTERM while loading still counts
    from dds_perception.deploy.runtime import freed_memory_reuse  # torch: after the checks

    with freed_memory_reuse(params.reuse_freed_memory):  # the process is the node's
        pipeline = core.build_pipeline(params)  # bad weights/device: one line, exit 1
        if stop.is_set():
            return 0
        try:
            node = DdsDetectorNode(
                pipeline, params, domain=args.domain_id, namespace=args.namespace
            )
        except DdsError as error:
            print(f"dds-perception node: error: {error}", file=sys.stderr)
            return 1
        node.start()
        try:
            node.spin(stop, args.diagnostics_period)
        finally:
            node.close()
    log.info("shut down cleanly")
    fast_exit(0)
    return 0  # not reached


def fast_exit(status: int) -> None:
    """Flush and leave now, skipping the interpreter's teardown.

    Tearing down torch, torchvision and OpenCV takes seconds on a small CPU (2.5 s measured on
    the 2-core development machine), which would break the promise to stop within a second of
    SIGTERM. Everything the node owns is released by then (DDS entities deleted, worker
    stopped) and it writes no files, so nothing is lost.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
