"""A small ROS 2-compatible runtime on Cyclone DDS: names, QoS, publishers, subscriptions.

- Names: a ROS name is expanded as rcl does (relative names under the namespace, ``~`` to the
  node's private namespace) and becomes the DDS topic ``rt/<name without leading slash>``.
- QoS profiles mirror the node's rclpy ones (:func:`sensor_qos`, :func:`reliable_qos`,
  :func:`latched_qos`), with the XCDR1 data representation ROS 2 uses.
- :class:`DdsRuntime` owns one participant on ``ROS_DOMAIN_ID`` (or an explicit id), creates
  :class:`DdsPublisher` objects that take rosbags messages, and runs ONE dispatcher thread that
  waits on every subscription's reader, skips ``InvalidSample`` entries (a writer leaving), and
  hands rosbags messages to the callbacks. ``CYCLONEDDS_URI`` configures Cyclone as usual (the
  tests restrict it to the loopback interface).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
from cyclonedds.domain import DomainParticipant
from cyclonedds.internal import InvalidSample
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy, Qos
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration

from dds_perception.ros import messages
from dds_perception.ros.dds import DdsError, convert
from dds_perception.ros.dds import types as idl

DOMAIN_ENV = "ROS_DOMAIN_ID"
MAX_DOMAIN_ID = 232  # rmw's limit for the default port mapping
_NAME_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# --------------------------------------------------------------------------------------- names


def domain_id(explicit: int | None = None) -> int:
    """The DDS domain: ``explicit``, else ``$ROS_DOMAIN_ID``, else 0 (ROS 2's rule)."""
    if explicit is None:
        text = os.environ.get(DOMAIN_ENV, "").strip()
        if not text:
            return 0
        try:
            explicit = int(text)
        except ValueError:
            raise DdsError(f"{DOMAIN_ENV}={text!r} is not an integer") from None
    if not 0 <= int(explicit) <= MAX_DOMAIN_ID:
        raise DdsError(f"domain id {explicit} outside 0..{MAX_DOMAIN_ID}")
    return int(explicit)


def resolve_name(name: str, namespace: str = "/", node_name: str = "") -> str:
    """The fully qualified ROS name (``image`` -> ``/image``, ``~/debug`` -> ``/node/debug``)."""
    name = name.strip()
    namespace = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("~"):
        if not node_name:
            raise DdsError(f"topic {name!r} needs a node name to expand '~'")
        name = f"{namespace}/{node_name}{name[1:]}"
    elif not name.startswith("/"):
        name = f"{namespace}/{name}"
    tokens = name.strip("/").split("/")
    if not name.strip("/") or any(not _NAME_TOKEN.match(t) for t in tokens):
        raise DdsError(f"invalid ROS topic name {name!r}")
    return "/" + "/".join(tokens)


def dds_topic(name: str, namespace: str = "/", node_name: str = "") -> str:
    """The DDS topic of a ROS topic name: ``/detections`` -> ``rt/detections``."""
    return "rt" + resolve_name(name, namespace, node_name)


def ros_topic(dds_name: str) -> str:
    """The ROS topic of a DDS topic: ``rt/detections`` -> ``/detections``."""
    if not dds_name.startswith("rt/"):
        raise DdsError(f"{dds_name!r} is not a ROS 2 topic (no 'rt/' prefix)")
    return dds_name[2:]


# ----------------------------------------------------------------------------------------- QoS

_XCDR1 = Policy.DataRepresentation(use_cdrv0_representation=True)
_BLOCKING = duration(milliseconds=100)


def sensor_qos(reliability: str = "best_effort") -> Qos:
    """The node's image QoS: keep last 1, volatile, best effort (or ``reliable``)."""
    if reliability not in ("best_effort", "reliable"):
        raise DdsError(f"reliability {reliability!r}: use best_effort or reliable")
    policy = (
        Policy.Reliability.Reliable(max_blocking_time=_BLOCKING)
        if reliability == "reliable"
        else Policy.Reliability.BestEffort
    )
    return Qos(policy, Policy.History.KeepLast(1), Policy.Durability.Volatile, _XCDR1)


def reliable_qos(depth: int = 10) -> Qos:
    """Reliable, volatile, keep last ``depth`` (ROS 2's default profile with depth 10)."""
    return Qos(
        Policy.Reliability.Reliable(max_blocking_time=_BLOCKING),
        Policy.History.KeepLast(depth),
        Policy.Durability.Volatile,
        _XCDR1,
    )


def latched_qos() -> Qos:
    """``label_info``: reliable, transient local, keep last 1 (late joiners get the last one)."""
    return Qos(
        Policy.Reliability.Reliable(max_blocking_time=_BLOCKING),
        Policy.History.KeepLast(1),
        Policy.Durability.TransientLocal,
        _XCDR1,
    )


# ------------------------------------------------------------------------------------- runtime


class DdsPublisher:
    """A DataWriter that takes rosbags messages of one ROS 2 type."""

    def __init__(self, runtime: DdsRuntime, topic: str, msgtype: str, qos: Qos) -> None:
        self.topic_name = runtime.name(topic)
        self.msgtype = msgtype
        self._runtime = runtime
        self._writer = DataWriter(runtime.participant, runtime.topic(topic, msgtype), qos=qos)

    def publish(self, msg: Any) -> None:
        """Send a rosbags message (converted to its IDL struct)."""
        self._writer.write(convert.to_idl(msg, self._runtime.typestore, self.msgtype))

    def subscription_count(self) -> int:
        """Readers matched right now (rclpy's ``get_subscription_count``)."""
        return int(self._writer.get_publication_matched_status().current_count)


@dataclass
class _Subscription:
    topic: str
    msgtype: str
    reader: Any
    condition: Any
    callback: Callable[[Any], None]
    raw: bool


class DdsRuntime:
    """One participant, its publishers, and one dispatcher thread for its subscriptions.

    Callbacks run on the dispatcher thread, one sample at a time, and must return quickly (the
    node's ``submit`` does). An exception in a callback is reported through ``on_error`` and
    never stops the dispatcher. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        domain: int | None = None,
        namespace: str = "/",
        node_name: str = "",
        typestore: Any = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.domain_id = domain_id(domain)
        self.namespace = namespace
        self.node_name = node_name
        self.typestore = typestore if typestore is not None else messages.typestore()
        self.participant = DomainParticipant(self.domain_id)
        self._on_error = on_error or (lambda text: None)
        self._topics: dict[str, Any] = {}
        self._subscriptions: list[_Subscription] = []
        self._waitset = WaitSet(self.participant)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- entities
    def name(self, ros_name: str) -> str:
        """The DDS topic name of a ROS name in this runtime's namespace."""
        return dds_topic(ros_name, self.namespace, self.node_name)

    def topic(self, ros_name: str, msgtype: str) -> Any:
        """The (cached) DDS topic for ``ros_name`` of ROS 2 type ``msgtype``."""
        dds_name = self.name(ros_name)
        with self._lock:
            topic = self._topics.get(dds_name)
            if topic is None:
                topic = Topic(self.participant, dds_name, idl.idl_type(msgtype))
                self._topics[dds_name] = topic
        if topic.data_type is not idl.idl_type(msgtype):
            raise DdsError(f"topic {dds_name} already has type {topic.data_type.__name__}")
        return topic

    def publisher(self, ros_name: str, msgtype: str, qos: Qos | None = None) -> DdsPublisher:
        """A publisher of rosbags messages of ``msgtype`` on ``ros_name``."""
        return DdsPublisher(self, ros_name, msgtype, qos or reliable_qos())

    def subscribe(
        self,
        ros_name: str,
        msgtype: str,
        callback: Callable[[Any], None],
        qos: Qos | None = None,
        *,
        raw: bool = False,
    ) -> None:
        """Call ``callback(msg)`` for every sample (default QoS: :func:`reliable_qos`);
        ``raw=True`` passes the IDL sample instead of a rosbags message."""
        reader = DataReader(
            self.participant, self.topic(ros_name, msgtype), qos=qos or reliable_qos()
        )
        condition = ReadCondition(reader, SampleState.Any | ViewState.Any | InstanceState.Any)
        self._waitset.attach(condition)
        self._subscriptions.append(
            _Subscription(self.name(ros_name), msgtype, reader, condition, callback, raw)
        )

    def publisher_count(self, ros_name: str) -> int:
        """Writers matched right now by this runtime's subscription(s) of ``ros_name``."""
        dds_name = self.name(ros_name)
        return sum(
            int(sub.reader.get_subscription_matched_status().current_count)
            for sub in self._subscriptions
            if sub.topic == dds_name
        )

    # -------------------------------------------------------------- dispatching
    def start(self) -> None:
        """Start the dispatcher thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._dispatch, name="dds_dispatch", daemon=True
            )
            self._thread.start()

    def spin_once(self, timeout: float = 0.1) -> int:
        """Wait up to ``timeout`` s for samples, deliver them, return how many were delivered."""
        self._waitset.wait(duration(seconds=timeout))
        delivered = 0
        for sub in list(self._subscriptions):
            try:
                samples = sub.reader.take(N=64)
            except Exception as error:  # a sample Cyclone could not hand over: skip, go on
                self._on_error(f"{sub.topic}: take failed: {error}")
                continue
            for sample in samples:
                if isinstance(sample, InvalidSample):  # instance state change, no data
                    continue
                try:
                    value = (
                        sample
                        if sub.raw
                        else convert.from_idl(sample, self.typestore, sub.msgtype)
                    )
                    sub.callback(value)
                    delivered += 1
                except Exception as error:
                    self._on_error(f"{sub.topic}: {type(error).__name__}: {error}")
        return delivered

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                self.spin_once(0.1)
            except Exception as error:  # keep dispatching: a runtime must not die on one error
                self._on_error(f"dispatcher: {type(error).__name__}: {error}")
                self._stop.wait(0.1)

    def stop_dispatch(self, timeout: float = 1.0) -> None:
        """Stop delivering samples (the publishers stay usable until :meth:`close`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self, timeout: float = 1.0) -> None:
        """Stop the dispatcher and delete the participant with its readers and writers.

        cyclonedds deletes an entity when its Python object is finalised; deleting the
        participant now (instead of at garbage collection) tells peers at once that its writers
        left. Deleting a reliable writer waits for its readers' acknowledgements up to Cyclone's
        writer linger duration (1 s), so the deletion runs on a helper thread that is given
        ``timeout`` s; a process that exits meanwhile loses nothing.
        """
        self.stop_dispatch(timeout)
        for sub in self._subscriptions:
            self._waitset.detach(sub.condition)
        self._subscriptions.clear()
        self._topics.clear()
        participant, self.participant = self.participant, None
        if participant is not None:
            # dds_delete: recursive, children included
            deleter = threading.Thread(target=participant.__del__, name="dds_delete", daemon=True)
            deleter.start()
            deleter.join(timeout)

    def __enter__(self) -> DdsRuntime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
