"""Record ROS 2 topics from Cyclone DDS into a ROS 2 bag, as `ros2 bag record` does, without ROS 2.

examples:
  dds-perception record /detections --out detections_bag
  dds-perception record /detections /diagnostics --out run1 --storage sqlite3
  dds-perception record /detections:vision_msgs/msg/Detection2DArray --out run1 --count 20

A topic's type is taken from its publishers (DDS discovery; waits up to --discovery-timeout s)
unless given as TOPIC:TYPE. As ros2 bag record, the subscription offers what all publishers
offer: reliable when they are all reliable, transient local when they all are (so a latched
label_info is recorded too). Messages are stored with their receive time as log time and their
headers unchanged. The bag is written under a temporary name and renamed when recording ends:
on SIGINT/SIGTERM, after --duration seconds or --count messages (exit code 0).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from typing import Any

from dds_perception.utils.errors import UsageError

RECORD_DEPTH = 100  # reader history: a burst of this many messages per topic is kept


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "topics", nargs="+", metavar="TOPIC", help="topics to record (TOPIC or TOPIC:TYPE)"
    )
    parser.add_argument("--out", required=True, metavar="BAG", help="bag folder to create")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    parser.add_argument(
        "--count", type=int, default=None, metavar="N", help="stop after N messages in all"
    )
    parser.add_argument(
        "--discovery-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the publishers of topics given without a type",
    )
    parser.add_argument("--domain-id", type=int, default=None, help="default: $ROS_DOMAIN_ID or 0")


def parse_topic(item: str) -> tuple[str, str | None]:
    """``/topic`` or ``/topic:pkg/msg/Type`` -> (topic, type or None)."""
    topic, sep, msgtype = item.partition(":")
    if sep and msgtype.count("/") != 2:
        raise UsageError(f"topic {item!r}: the type must read pkg/msg/Type")
    return topic, (msgtype or None)


def msgtype_from_dds(type_name: str) -> str:
    """``vision_msgs::msg::dds_::Detection2DArray_`` -> ``vision_msgs/msg/Detection2DArray``."""
    parts = type_name.split("::")
    if len(parts) != 4 or parts[2] != "dds_" or not parts[3].endswith("_"):
        raise UsageError(f"DDS type {type_name!r} is not a ROS 2 message type")
    return f"{parts[0]}/{parts[1]}/{parts[3][:-1]}"


def discover(
    runtime: Any,
    topics: list[str],
    timeout: float,
    stop: threading.Event,
    *,
    required: list[str] | None = None,
) -> dict[str, list[Any]]:
    """The publications (DcpsEndpoint samples) seen for each DDS topic in ``topics``, waiting
    until every topic of ``required`` (default: all) has one, or TimeoutError naming them after
    ``timeout`` s. Topics not required get what discovery found meanwhile (maybe nothing)."""
    required = topics if required is None else required
    from cyclonedds.builtin import BuiltinDataReader, BuiltinTopicDcpsPublication
    from cyclonedds.internal import InvalidSample

    reader = BuiltinDataReader(runtime.participant, BuiltinTopicDcpsPublication)
    found: dict[str, list[Any]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout
    while True:
        for sample in reader.take(N=256):
            if not isinstance(sample, InvalidSample) and sample.topic_name in found:
                found[sample.topic_name].append(sample)
        missing = [t for t in required if not found[t]]
        if not missing or stop.is_set():
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no publisher of {', '.join(missing)} within {timeout:.0f} s on domain "
                f"{runtime.domain_id}; start the publisher or give the type as TOPIC:TYPE"
            )
        stop.wait(0.05)


def _reader_qos(publications: list[Any]) -> Any:
    """Reliable / transient local only when every publisher offers it (ros2 bag's rule)."""
    from cyclonedds.qos import Policy, Qos
    from cyclonedds.util import duration

    reliable = bool(publications) and all(
        isinstance(pub.qos[Policy.Reliability], Policy.Reliability.Reliable)
        for pub in publications
    )
    latched = bool(publications) and all(
        pub.qos[Policy.Durability] == Policy.Durability.TransientLocal for pub in publications
    )
    return Qos(
        Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100))
        if reliable
        else Policy.Reliability.BestEffort,
        Policy.History.KeepLast(RECORD_DEPTH),
        Policy.Durability.TransientLocal if latched else Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True),
    )


def record(args: argparse.Namespace, stop: threading.Event) -> dict[str, int]:
    """Record until ``stop``, --duration or --count; return the message count per topic."""
    from dds_perception.ros.bag import BagWriter
    from dds_perception.ros.dds import runtime as rt
    from dds_perception.ros.dds import types as idl

    requested = [parse_topic(item) for item in args.topics]
    if args.count is not None and args.count <= 0:
        raise UsageError(f"--count {args.count}: must be positive")
    received: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    # The bag is opened first: an existing --out fails at once, and a failure later (discovery
    # timeout, unknown type) removes the temporary bag instead of leaving a partial one.
    with (
        BagWriter(args.out, storage=args.storage) as writer,
        rt.DdsRuntime(domain=args.domain_id) as runtime,
    ):
        names = {runtime.name(topic): (topic, msgtype) for topic, msgtype in requested}
        untyped = [name for name, (_, msgtype) in names.items() if msgtype is None]
        publications = discover(
            runtime, list(names), args.discovery_timeout, stop, required=untyped
        )
        for dds_name, (topic, msgtype) in names.items():
            pubs = publications.get(dds_name, [])
            if msgtype is None:
                if not pubs:  # stopped while discovering
                    return {}
                msgtype = msgtype_from_dds(pubs[0].type_name)
            idl.idl_type(msgtype)  # DdsError naming the known types
            ros_name = rt.ros_topic(dds_name)

            def deliver(msg: Any, ros_name: str = ros_name) -> None:
                received.put((ros_name, time.time_ns(), msg))

            qos = _reader_qos(pubs) if pubs else rt.sensor_qos("best_effort")
            runtime.subscribe(topic, msgtype, deliver, qos)
        runtime.start()
        print(
            f"record: recording {', '.join(rt.ros_topic(n) for n in names)} to {args.out}",
            file=sys.stderr,
            flush=True,
        )
        deadline = None if args.duration is None else time.monotonic() + args.duration

        def full() -> bool:
            return args.count is not None and sum(writer.counts.values()) >= args.count

        while not stop.is_set() and not full():
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                topic, log_ns, msg = received.get(timeout=0.05)
            except queue.Empty:
                continue
            writer.write(topic, msg, log_ns)
        runtime.stop_dispatch()
        while not full():  # what arrived before the stop still goes into the bag
            try:
                topic, log_ns, msg = received.get_nowait()
            except queue.Empty:
                break
            writer.write(topic, msg, log_ns)
        return dict(writer.counts)


def run(args: argparse.Namespace) -> int:
    from dds_perception.ros.dds.node import format_counts, run_stoppable

    counts = run_stoppable("record", record, args)
    if counts is None:
        return 1
    print(f"record: wrote {sum(counts.values())} messages to {args.out} ({format_counts(counts)})")
    return 0
