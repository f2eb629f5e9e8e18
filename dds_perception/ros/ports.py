"""The core's interface to its runtime (rclpy, Cyclone DDS, tests): publishing functions, the
debug-image demand, image-subscription control, and the logger it writes through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Logger(Protocol):
    """What the core logs through (``logging.Logger`` and rclpy's logger adapter both fit)."""

    def info(self, message: str) -> Any: ...
    def warning(self, message: str) -> Any: ...
    def error(self, message: str) -> Any: ...


class NullLogger:
    """Drops every message (the default when a runtime gives no logger)."""

    def info(self, message: str) -> None:
        pass

    warning = error = info


def _never() -> bool:
    return False


def _discard(_msg: Any) -> None:
    pass


def _no_subscription_control(_subscribed: bool) -> None:
    pass


@dataclass
class Ports:
    """How the core talks to its runtime: publishing functions and the debug-image demand.

    ``debug_image_wanted`` is asked for every frame: the annotated image is built only while it
    returns True (rclpy: the publisher's ``get_subscription_count() > 0``).
    ``set_image_subscription(True/False)`` creates or destroys the runtime's image subscriptions
    (the ``enable`` parameter): called by :meth:`DetectorCore.start` and on every change; it
    must be idempotent.
    """

    publish_detections: Callable[[Any], None] = _discard
    publish_label_info: Callable[[Any], None] = _discard
    publish_debug_image: Callable[[Any], None] = _discard
    debug_image_wanted: Callable[[], bool] = _never
    set_image_subscription: Callable[[bool], None] = _no_subscription_control
    # several cameras: camera key (its subscribed topic) -> that camera's detections and debug
    # image ports (``publish_detections``, ``publish_debug_image``, ``debug_image_wanted``);
    # a camera without an entry uses the ports above
    cameras: dict[str, Ports] = field(default_factory=dict)

    def for_camera(self, key: str) -> Ports:
        """The ports a camera's detections and debug image go out through."""
        return self.cameras.get(key, self)
