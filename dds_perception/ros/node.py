"""Run the dds_detector ROS 2 node (rclpy): camera images in, vision_msgs/Detection2DArray out.

Examples:
  ros2 run dds_perception detector_node --ros-args -r image:=/camera/image_raw -p device:=cpu
  ros2 launch dds_perception detector.launch.py image_topic:=/camera/image_raw
  dds-perception detector_node --ros-args --params-file config/detector.yaml
  ros2 run dds_perception detector_node --ros-args \
      -p "image_topics:=[/cam_front/image_raw, /cam_rear/image_raw]"   # -> /cam_*/detections
  ros2 topic echo /detections

This is the only module that imports rclpy. It declares the parameters (descriptions and ranges
from ``params.DetectorParams``), creates the subscriptions (images, camera_info), publishers,
the ``~/enable`` service (std_srvs/SetBool) and diagnostic_updater, and hands every frame to
:class:`dds_perception.ros.core.DetectorCore`, which does the work on its own thread (the newest
frame wins). The service sets the ``enable`` parameter (so ``ros2 param get`` agrees); the core
then has this node create or destroy the image subscriptions (one per camera). Without rclpy it
prints how to get it (a sourced ROS 2 install) or to use the Cyclone DDS runtime instead, and
exits with status 1.

  ros2 service call /dds_detector/enable std_srvs/srv/SetBool "{data: false}"
  ros2 param set /dds_detector enable true
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from typing import Any

from dds_perception.ros import core, diagnostics, messages
from dds_perception.ros.error_log import ErrorLog, describe
from dds_perception.ros.params import (
    NODE_NAME,
    DetectorParams,
    ParameterError,
    parameter_names,
    parameter_specs,
)
from dds_perception.ros.ports import Ports
from dds_perception.utils.errors import INPUT_ERRORS

try:  # rclpy exists only on a ROS 2 machine; --help and the CLI table work without it
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    try:
        from rclpy.executors import ExternalShutdownException
    except ImportError:  # Foxy: no such exception; nothing to catch

        class ExternalShutdownException(Exception):
            """Stand-in for rclpy releases that lack it (never raised)."""

    try:
        from rclpy.exceptions import ParameterUninitializedException
    except ImportError:  # Foxy: parameters cannot be declared by type; nothing to catch

        class ParameterUninitializedException(Exception):
            """Stand-in for rclpy releases that lack it (never raised)."""

    ROS_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # pragma: no cover - exercised on machines without ROS 2
    rclpy = None
    Node = object
    ROS_IMPORT_ERROR = error


class _RosLogger:
    """rclpy's logger behind the ``info``/``warning``/``error`` names the core uses."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def info(self, message: str) -> None:
        self._logger.info(message)

    def warning(self, message: str) -> None:
        (getattr(self._logger, "warning", None) or self._logger.warn)(message)

    def error(self, message: str) -> None:
        self._logger.error(message)


def _descriptor(spec: Any) -> Any:
    """A ParameterDescriptor with the field's description, range and read-only flag."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    meta = spec.metadata
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "description": meta["description"],
        "read_only": not meta["runtime"],
    }
    if meta["choices"]:
        kwargs["additional_constraints"] = "one of: " + ", ".join(meta["choices"])
    low, high = meta["range"]
    if low is not None and str(spec.type) == "float":
        kwargs["floating_point_range"] = [
            FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)
        ]
    elif low is not None and str(spec.type) == "int":
        kwargs["integer_range"] = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
    return ParameterDescriptor(**kwargs)


def _declared_default(spec: Any) -> Any:
    """The value to declare a parameter with: its default, or for an empty string array its
    type (rclpy would take an empty list for a byte array)."""
    if isinstance(spec.default, tuple):
        return list(spec.default) if spec.default else Parameter.Type.STRING_ARRAY
    return spec.default


def _image_qos(reliability: str) -> Any:
    """Sensor-data QoS: keep last 1, volatile, best effort (default) or reliable."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=(
            ReliabilityPolicy.RELIABLE
            if reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT
        ),
        durability=DurabilityPolicy.VOLATILE,
    )


def _cv_bridge_decoder(classes: Any, logger: _RosLogger) -> Any:
    """The node's image decoder when cv_bridge can add encodings, else None (the project's own).

    The project's conversions (``messages.image_msg_to_rgb``) decode rgb8, bgr8, rgba8, bgra8,
    mono8 and JPEG/PNG, checking ``step`` and the buffer size; they decode those always.
    cv_bridge is used only for the raw encodings they do not handle (Bayer, YUV 4:2:2, 16-bit,
    ...); its errors and any result that is not an HxWx3 uint8 frame become
    :class:`~dds_perception.data.images.ImageDecodeError` (a bad frame). cv_bridge on Humble is
    built against NumPy 1.x: under NumPy 2 it fails to import or on first use (``_ARRAY_API not
    found``), so errors of every kind are caught and probe frames (a uniform Bayer frame, a
    mono16 frame) must convert before it is used.
    """
    import numpy as np

    from dds_perception.data.images import RAW_ENCODINGS, ImageDecodeError

    try:
        from cv_bridge import CvBridge

        bridge = CvBridge()
    except Exception as error:  # ImportError, or NumPy ABI errors of several kinds
        logger.info(
            f"cv_bridge not usable ({describe(error)}); decoding the encodings of the project's "
            "image conversions only"
        )
        return None

    def convert(msg: Any) -> np.ndarray:
        size = (int(msg.height), int(msg.width))
        try:
            rgb = np.asarray(bridge.imgmsg_to_cv2(msg, "rgb8"))
        except Exception as error:  # CvBridgeError, a short buffer, ...: a bad frame
            raise ImageDecodeError(
                f"cv_bridge cannot convert a {size[1]}x{size[0]} {msg.encoding!r} frame to "
                f"rgb8: {describe(error)}"
            ) from error
        if rgb.dtype != np.uint8 or rgb.shape != (*size, 3):
            raise ImageDecodeError(
                f"cv_bridge gave a {rgb.dtype} array of shape {rgb.shape} for a {size[1]}x"
                f"{size[0]} {msg.encoding!r} frame; expected {size[0]}x{size[1]}x3 uint8"
            )
        return rgb

    def decode(msg: Any) -> np.ndarray:
        if messages.is_compressed(msg) or str(msg.encoding).lower() in RAW_ENCODINGS:
            return messages.image_msg_to_rgb(msg)
        return convert(msg)

    def probe(encoding: str, values: np.ndarray, step: int) -> np.ndarray:
        return convert(
            classes.Image(
                header=messages.header_msg(0, "probe", classes),
                height=4,
                width=6,
                encoding=encoding,
                is_bigendian=0,
                step=step,
                data=classes.uint8_array(values.tobytes()),
            )
        )

    try:
        bayer = probe("bayer_rggb8", np.full(24, 100, np.uint8), 6)
        mono16 = probe("mono16", np.full(24, 25600, "<u2"), 12)
        usable = bool((bayer == 100).all() and (mono16 == mono16[0, 0, 0]).all())
    except Exception as error:
        logger.info(
            f"cv_bridge failed its self-test ({describe(error)}); decoding the encodings of the "
            "project's image conversions only"
        )
        return None
    if not usable:
        logger.info("cv_bridge converts a uniform probe frame to a non-uniform one; not used")
        return None
    logger.info(
        "cv_bridge decodes the encodings the project's conversions lack (Bayer, YUV, 16-bit)"
    )
    return decode


class DetectorNode(Node):
    """The ``dds_detector`` node: subscription -> :class:`core.DetectorCore` -> publishers."""

    def __init__(self, *, pipeline_factory: Any = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.core: core.DetectorCore | None = None
        for spec in parameter_specs():
            descriptor = _descriptor(spec)
            try:
                self.declare_parameter(spec.name, _declared_default(spec), descriptor)
            except TypeError:  # Foxy: no declaring by type; an unset parameter takes any value
                self.declare_parameter(spec.name, None, descriptor)
        params = DetectorParams(
            **{spec.name: self._parameter_value(spec) for spec in parameter_specs()}
        )  # ParameterError here: one clear message from main()
        log = _RosLogger(self.get_logger())
        # callbacks of rclpy must not raise (an exception ends spin): bugs are logged instead
        self._errors = ErrorLog(log.warning, log.error)
        # missing or corrupt weights, an unavailable device: raises here, before any topic
        pipeline = (pipeline_factory or core.build_pipeline)(params)
        classes = messages.ros_classes()

        self._label_pub = None
        if classes.LabelInfo is not None:  # vision_msgs 4.x (not Foxy's 2.x)
            self._label_pub = self.create_publisher(
                classes.LabelInfo,
                "label_info",
                QoSProfile(
                    history=HistoryPolicy.KEEP_LAST,
                    depth=1,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL,
                ),
            )
        # each camera's detections and debug image: 'detections' and '~/debug_image' for the
        # one camera of image_topic, beside each image topic for image_topics
        camera_ports = {
            camera.key: self._camera_ports(classes, camera) for camera in params.cameras
        }
        ports = dataclasses.replace(
            next(iter(camera_ports.values())),
            set_image_subscription=self._set_image_subscription,
            cameras=camera_ports if params.image_topics else {},
        )
        if self._label_pub is not None:
            ports.publish_label_info = self._label_pub.publish
        self.core = core.DetectorCore(
            pipeline,
            params,
            classes=classes,
            ports=ports,
            clock=lambda: self.get_clock().now().nanoseconds * 1e-9,
            logger=log,
            decoder=_cv_bridge_decoder(classes, log),
            node_name=self.get_name(),
        )
        self._image_type = classes.CompressedImage if params.use_compressed else classes.Image
        self._subscriptions: dict[str, Any] = {}  # camera key -> its image subscription
        self._updater = self._make_updater(str(self.core.device))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # the process is the node's: once built, it opts into glibc keeping freed memory for
        # its frames (handed back in destroy_node)
        from dds_perception.deploy.runtime import freed_memory_reuse

        self._process_settings = contextlib.ExitStack()
        self._process_settings.enter_context(freed_memory_reuse(params.reuse_freed_memory))
        self.core.start()  # subscribes to the images through the port when enable is true
        # camera_info: best effort keep-last 1 matches both reliable and best-effort drivers
        self._camera_info_subs = [
            self.create_subscription(
                classes.CameraInfo,
                camera.camera_info_topic,
                self._camera_callback(self.core.submit_camera_info, camera.key),
                _image_qos("best_effort"),
            )
            for camera in params.cameras
        ]
        self._enable_srv = self._make_enable_service()
        cameras = ", ".join(
            f"'{c.subscribed_topic}' and '{c.camera_info_topic}' -> '{c.detections_topic}'"
            for c in params.cameras
        )
        log.info(
            f"{'subscribed' if params.enable else 'disabled, not subscribed'} to {cameras} "
            f"({self._image_type.__name__}, {params.reliability}) in namespace "
            f"'{self.get_namespace()}'; device {self.core.device}; service '~/enable'"
        )

    def _parameter_value(self, spec: Any) -> Any:
        """The parameter's value; its default when declared by type and never set."""
        try:
            value = self.get_parameter(spec.name).value
        except ParameterUninitializedException:  # image_topics, nobody set it
            return spec.default
        return spec.default if value is None else value

    def _camera_ports(self, classes: Any, camera: Any) -> Ports:
        """A camera's detections (reliable, depth 10) and debug image (reliable, depth 1)."""
        detections = self.create_publisher(
            classes.Detection2DArray,
            camera.detections_topic,
            QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE
            ),
        )
        debug = self.create_publisher(
            classes.Image,
            camera.debug_image_topic,
            QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE
            ),
        )
        return Ports(
            publish_detections=detections.publish,
            publish_debug_image=debug.publish,
            debug_image_wanted=lambda: debug.get_subscription_count() > 0,
        )

    def _camera_callback(self, callback: Any, key: str) -> Any:
        """``callback(msg)`` for the one camera of image_topic (as always), else
        ``callback(msg, source=key)`` so that each frame stays with its camera."""
        if not self.core.params.image_topics:
            return callback
        return functools.partial(callback, source=key)

    def _set_image_subscription(self, subscribed: bool) -> None:
        """Create or destroy the cameras' image subscriptions (``enable``); idempotent."""
        params = self.core.params if self.core is not None else None
        if subscribed and params is not None:
            for camera in params.cameras:
                if camera.key not in self._subscriptions:
                    self._subscriptions[camera.key] = self.create_subscription(
                        self._image_type,
                        camera.subscribed_topic,
                        self._camera_callback(self.core.submit, camera.key),
                        _image_qos(params.reliability),
                    )
        elif not subscribed:
            while self._subscriptions:
                self.destroy_subscription(self._subscriptions.popitem()[1])

    def _make_enable_service(self) -> Any:
        from std_srvs.srv import SetBool

        return self.create_service(SetBool, "~/enable", self._on_enable)

    def _on_enable(self, request: Any, response: Any) -> Any:
        """std_srvs/SetBool on ``~/enable``: set the ``enable`` parameter (which the parameter
        callback applies to the core), answer with the outcome."""
        enabled = bool(request.data)
        (result,) = self.set_parameters([Parameter("enable", Parameter.Type.BOOL, enabled)])
        response.success = bool(result.successful)
        if not result.successful:
            response.message = str(result.reason)
        elif enabled:
            topics = ", ".join(self.core.params.subscribed_topics)
            response.message = f"enabled: subscribed to {topics}"
        else:
            response.message = "disabled: not subscribed to images, no inference"
        return response

    def _make_updater(self, hardware_id: str) -> Any:
        import diagnostic_updater

        try:
            updater = diagnostic_updater.Updater(self, period=1.0)
        except TypeError:  # older releases: no period argument and no timer of their own
            updater = diagnostic_updater.Updater(self)
            self.create_timer(1.0, updater.update)
        updater.setHardwareID(hardware_id)
        updater.add(diagnostics.DIAGNOSTIC_TASK, self._fill_diagnostics)
        if self.core.params.image_topics:  # several cameras: one status each
            for index, camera in enumerate(self.core.params.cameras):
                name = f"{diagnostics.CAMERA_TASK} {camera.image_topic}"
                updater.add(name, functools.partial(self._fill_camera_diagnostics, index))
        return updater

    def _fill_diagnostics(self, stat: Any) -> Any:
        return self._fill(stat, self.core.diagnostics)

    def _fill_camera_diagnostics(self, index: int, stat: Any) -> Any:
        return self._fill(stat, lambda: self.core.camera_diagnostics()[index])

    def _fill(self, stat: Any, make_report: Any) -> Any:
        try:
            report = make_report()
        except Exception as error:  # a bug: logged with its traceback, reported as ERROR
            self._errors.report(error, "diagnostics failed", "diagnostics")
            level = diagnostics.diagnostic_level(self.core.classes, diagnostics.ERROR)
            stat.summary(level, f"diagnostics failed: {describe(error)}")
            return stat
        stat.summary(diagnostics.diagnostic_level(self.core.classes, report.level), report.message)
        for key, value in report.values:
            stat.add(key, value)
        return stat

    def _on_set_parameters(self, parameters: list[Any]) -> Any:
        from rcl_interfaces.msg import SetParametersResult

        names = set(parameter_names())
        changes = {p.name: p.value for p in parameters if p.name in names}
        if self.core is None or not changes:
            return SetParametersResult(successful=True)
        try:
            self.core.update_params(**changes)
        except ParameterError as error:
            return SetParametersResult(successful=False, reason=str(error))
        except Exception as error:  # a bug: refuse the change, keep the node and the traceback
            self._errors.report(error, f"parameters {changes} not applied", "parameters")
            return SetParametersResult(
                successful=False, reason=f"internal error: {describe(error)}"
            )
        self.get_logger().info(f"parameters updated: {changes}")
        return SetParametersResult(successful=True)

    def destroy_node(self) -> None:
        if self.core is not None:
            self.core.stop()
        settings = getattr(self, "_process_settings", None)
        if settings is not None:
            settings.close()
        super().destroy_node()


def _shutdown() -> None:
    """rclpy.try_shutdown (Galactic and later), or its equivalent on Foxy."""
    try_shutdown = getattr(rclpy, "try_shutdown", None)
    if try_shutdown is not None:
        try_shutdown()
    elif rclpy.ok():
        rclpy.shutdown()


def main(args: list[str] | None = None) -> int:
    """Console script ``detector_node``: init, build the node, spin, clean up; exit status."""
    if rclpy is None:
        print(
            f"detector_node: error: rclpy is not importable ({ROS_IMPORT_ERROR}). Source a ROS 2 "
            "install (source /opt/ros/humble/setup.bash), or run the node on the project's "
            "Cyclone DDS runtime without ROS 2.",
            file=sys.stderr,
        )
        return 1
    rclpy.init(args=args)
    node = None
    status = 0
    try:
        node = DetectorNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C or a shutdown from outside (launch): not an error
    except INPUT_ERRORS as error:  # bad configuration: one clear line, non-zero exit
        print(f"{NODE_NAME}: error: {error}", file=sys.stderr)
        status = 1
    except Exception as error:
        if type(error).__module__.startswith("rclpy"):  # e.g. a parameter out of its range
            print(f"{NODE_NAME}: error: {type(error).__name__}: {error}", file=sys.stderr)
            status = 1
        else:
            raise
    finally:
        if node is not None:
            node.destroy_node()
        _shutdown()
    return status


# ----------------------------------------------------------------------- dds-perception command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dds-perception detector_node [--ros-args ...]``: the ROS arguments go to rclpy."""
    parser.add_argument(
        "--ros-args",
        dest="ros_args",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="ARG",
        help="ROS arguments to the end of the line, e.g. --ros-args -p device:=cpu "
        "-r image:=/camera/image_raw --params-file config/detector.yaml",
    )


def run(args: argparse.Namespace) -> int:
    """Entry of the ``dds-perception detector_node`` command."""
    ros_args = ["--ros-args", *args.ros_args] if args.ros_args else []
    return main(["detector_node", *ros_args])


if __name__ == "__main__":
    sys.exit(main())
