"""A small ROS 2-compatible runtime on Cyclone DDS: names, QoS, publishers, subscriptions.

- Names: a ROS name is expanded as rcl does (relative names under the namespace, ``~`` to the
  node's private namespace) and becomes the DDS topic ``rt/<name without leading slash>``.
- QoS profiles mirror the node's rclpy ones (:func:`sensor_qos`, :func:`reliable_qos`,
  :func:`latched_qos`), with the XCDR1 data representation ROS 2 uses.
- :class:`DdsRuntime` owns one participant on ``ROS_DOMAIN_ID`` (or an explicit id), creates
  :class:`DdsPublisher` objects that take rosbags messages, and runs ONE dispatcher thread that
  waits on every subscription's reader, skips ``InvalidSample`` entries (a writer leaving), and
  hands rosbags messages to the callbacks. Subscriptions can be dropped again
  (:meth:`DdsRuntime.unsubscribe`: the reader is deleted, so publishers stop sending to it).
  ``CYCLONEDDS_URI`` configures Cyclone as usual (the tests restrict it to the loopback
  interface).
- Services (:meth:`DdsRuntime.service`, :class:`DdsServiceClient`) as rmw_cyclonedds_cpp puts
  them on the wire: topics ``rq/<name>Request`` and ``rr/<name>Reply``, each sample the request
  header (client writer id, sequence number) followed by the request or response fields (see
  :mod:`~dds_perception.ros.dds.types`); the server echoes the header in its reply.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
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
from dds_perception.ros.error_log import ErrorLog

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
        except ValueError as error:
            raise DdsError(f"{DOMAIN_ENV}={text!r} is not an integer") from error
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
    closed: bool = False


def service_topics(name: str, namespace: str = "/", node_name: str = "") -> tuple[str, str]:
    """The DDS request and reply topics of a ROS service name (rmw_cyclonedds_cpp's naming):
    ``~/enable`` of node ``dds_detector`` -> ``rq/dds_detector/enableRequest``,
    ``rr/dds_detector/enableReply``."""
    full = resolve_name(name, namespace, node_name)
    return f"rq{full}Request", f"rr{full}Reply"


class DdsRuntime:
    """One participant, its publishers, and one dispatcher thread for its subscriptions.

    Callbacks run on the dispatcher thread, one sample at a time, and must return quickly (the
    node's ``submit`` does). An exception in a callback never stops the dispatcher: it is
    reported through ``on_error`` (:class:`~dds_perception.ros.error_log.ErrorLog`: a package
    error such as a sample that does not convert in one line, any other exception with its
    traceback the first time its type occurs on a topic; throttled per topic). Use as a context
    manager or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        domain: int | None = None,
        namespace: str = "/",
        node_name: str = "",
        typestore: Any = None,
        on_error: Callable[[str], None] | None = None,
        on_bug: Callable[[str], None] | None = None,
    ) -> None:
        self.domain_id = domain_id(domain)
        self.namespace = namespace
        self.node_name = node_name
        self.typestore = typestore if typestore is not None else messages.typestore()
        self.participant = DomainParticipant(self.domain_id)
        # ``on_bug`` (default ``on_error``) gets the reports of exceptions that are not the
        # package's own, tracebacks included
        self._errors = ErrorLog(on_error or (lambda text: None), on_bug)
        self._topics: dict[str, Any] = {}
        self._subscriptions: list[_Subscription] = []
        self._waitset = WaitSet(self.participant)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # held while samples are delivered; unsubscribe() takes it, so a reader is never
        # deleted under the dispatcher's feet (re-entrant: callbacks may unsubscribe)
        self._dispatch_lock = threading.RLock()

    # -------------------------------------------------------------- entities
    def name(self, ros_name: str) -> str:
        """The DDS topic name of a ROS name in this runtime's namespace."""
        return dds_topic(ros_name, self.namespace, self.node_name)

    def topic(self, ros_name: str, msgtype: str) -> Any:
        """The (cached) DDS topic for ``ros_name`` of ROS 2 type ``msgtype``."""
        return self._dds_topic(self.name(ros_name), idl.idl_type(msgtype))

    def _dds_topic(self, dds_name: str, data_type: type) -> Any:
        with self._lock:
            topic = self._topics.get(dds_name)
            if topic is None:
                topic = Topic(self.participant, dds_name, data_type)
                self._topics[dds_name] = topic
        if topic.data_type is not data_type:
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
    ) -> _Subscription:
        """Call ``callback(msg)`` for every sample (default QoS: :func:`reliable_qos`);
        ``raw=True`` passes the IDL sample instead of a rosbags message. Returns a handle
        for :meth:`unsubscribe`."""
        return self._subscribe(
            self.name(ros_name), self.topic(ros_name, msgtype), msgtype, callback, qos, raw
        )

    def _subscribe(
        self,
        dds_name: str,
        topic: Any,
        msgtype: str,
        callback: Callable[[Any], None],
        qos: Qos | None,
        raw: bool,
    ) -> _Subscription:
        reader = DataReader(self.participant, topic, qos=qos or reliable_qos())
        condition = ReadCondition(reader, SampleState.Any | ViewState.Any | InstanceState.Any)
        self._waitset.attach(condition)
        sub = _Subscription(dds_name, msgtype, reader, condition, callback, raw)
        self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        """Stop ``sub``'s callbacks and delete its reader (idempotent). Callable from any
        thread, callbacks included; from another thread it waits for the current delivery."""
        with self._dispatch_lock:
            if sub.closed:
                return
            sub.closed = True
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)
            self._waitset.detach(sub.condition)
            sub.condition.__del__()  # dds_delete now (both are idempotent), not at GC time
            sub.reader.__del__()

    def service(
        self,
        ros_name: str,
        srvtype: str,
        handler: Callable[[Any], dict[str, Any]],
        *,
        reply_wait: float = 1.0,
    ) -> tuple[_Subscription, Any]:
        """Serve ROS service ``ros_name`` of type ``srvtype`` (e.g. ``std_srvs/srv/SetBool``):
        ``handler(request)`` gets the IDL request sample and returns the response fields; the
        reply carries the request's header. Runs on the dispatcher thread. A reply waits up to
        ``reply_wait`` s for a reader to match (a client's reply reader may be discovered just
        after its request arrived)."""
        request_type, response_type = idl.service_types(srvtype)
        request_topic, reply_topic = service_topics(ros_name, self.namespace, self.node_name)
        writer = DataWriter(
            self.participant, self._dds_topic(reply_topic, response_type), qos=reliable_qos()
        )

        def serve(request: Any) -> None:
            fields = handler(request)
            deadline = time.monotonic() + reply_wait
            while (
                writer.get_publication_matched_status().current_count == 0
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            writer.write(
                response_type(
                    client_guid=request.client_guid,
                    sequence_number=request.sequence_number,
                    **fields,
                )
            )

        sub = self._subscribe(
            request_topic,
            self._dds_topic(request_topic, request_type),
            srvtype,
            serve,
            reliable_qos(),
            True,
        )
        return sub, writer

    def service_client(self, ros_name: str, srvtype: str) -> DdsServiceClient:
        """A client of ROS service ``ros_name`` (resolved in this runtime's namespace)."""
        return DdsServiceClient(self, ros_name, srvtype)

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
        with self._dispatch_lock:
            for sub in list(self._subscriptions):
                if sub.closed:  # unsubscribed by a callback of this very pass
                    continue
                try:
                    samples = sub.reader.take(N=64)
                except Exception as error:  # a sample Cyclone could not hand over: skip, go on
                    self._errors.report(error, f"{sub.topic}: take failed", f"take {sub.topic}")
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
                    except Exception as error:  # bad sample or a callback's bug: go on
                        self._errors.report(error, sub.topic, sub.topic)
        return delivered

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                self.spin_once(0.1)
            except Exception as error:  # keep dispatching: a runtime must not die on one error
                self._errors.report(error, "dispatcher", "dispatcher")
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


class DdsServiceClient:
    """Calls a ROS 2 service over DDS in rmw_cyclonedds_cpp's request/reply layout.

    Replies are told apart by the header this client puts in its requests (a random 64-bit
    client id and a sequence number), so several clients may share the service. Needs the
    runtime's dispatcher running (:meth:`DdsRuntime.start`).
    """

    def __init__(self, runtime: DdsRuntime, ros_name: str, srvtype: str) -> None:
        self._request_type, response_type = idl.service_types(srvtype)
        request_topic, reply_topic = service_topics(ros_name, runtime.namespace, runtime.node_name)
        self.service_name = request_topic[2:].removesuffix("Request")
        self._writer = DataWriter(
            runtime.participant,
            runtime._dds_topic(request_topic, self._request_type),
            qos=reliable_qos(),
        )
        self._guid = random.SystemRandom().getrandbits(63) + 1
        self._sequence = 0
        self._replies: dict[int, Any] = {}
        self._cond = threading.Condition()
        runtime._subscribe(
            reply_topic,
            runtime._dds_topic(reply_topic, response_type),
            srvtype,
            self._on_reply,
            reliable_qos(),
            True,
        )

    def _on_reply(self, sample: Any) -> None:
        if sample.client_guid != self._guid:
            return  # another client's answer
        with self._cond:
            self._replies[int(sample.sequence_number)] = sample
            self._cond.notify_all()

    def wait_for_service(self, timeout: float = 10.0) -> bool:
        """True once a server's request reader matched this client's writer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._writer.get_publication_matched_status().current_count > 0:
                return True
            time.sleep(0.02)
        return False

    def call(self, timeout: float = 10.0, **fields: Any) -> Any:
        """Send a request with ``fields``; return the reply sample (DdsError on timeout)."""
        if not self.wait_for_service(timeout):
            raise DdsError(f"service {self.service_name} not available after {timeout:.0f} s")
        with self._cond:
            self._sequence += 1
            sequence = self._sequence
        self._writer.write(
            self._request_type(client_guid=self._guid, sequence_number=sequence, **fields)
        )
        with self._cond:
            if not self._cond.wait_for(lambda: sequence in self._replies, timeout):
                raise DdsError(f"service {self.service_name}: no reply within {timeout:.0f} s")
            return self._replies.pop(sequence)
