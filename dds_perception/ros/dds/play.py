"""Publish a ROS 2 bag's topics over Cyclone DDS, as `ros2 bag play` does, without ROS 2.

examples:
  dds-perception play kitti_bag
  dds-perception play kitti_bag --rate 0.5 --loop --topics /kitti/camera/image_raw
  dds-perception play kitti_bag --remap /kitti/camera/image_raw:=/image --wait-for /image
  dds-perception play kitti_bag --lockstep /detections   # next frame once the node answered

Messages keep their recorded headers; they go out at their bag log times scaled by --rate
(2 = twice as fast). --lockstep TOPIC replays for evaluation: after each camera frame the player
waits (up to --lockstep-timeout s) for a vision_msgs/Detection2DArray with that frame's stamp on
TOPIC, so a slow detector drops no frame (the bag's timing and --rate are then ignored). Topics
of types this runtime has no IDL struct for are skipped with a note. SIGINT/SIGTERM stop the
replay (exit code 0).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from dds_perception.ros import messages
from dds_perception.utils.errors import UsageError

IMAGE_TYPES = (messages.MSGTYPES["Image"], messages.MSGTYPES["CompressedImage"])
DETECTIONS_TYPE = messages.MSGTYPES["Detection2DArray"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="ROS 2 bag folder (mcap or sqlite3)")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="speed factor on the bag's timeline (default 1)"
    )
    parser.add_argument("--loop", action="store_true", help="play again from the start forever")
    parser.add_argument(
        "--topics", nargs="+", default=None, metavar="TOPIC", help="play only these topics"
    )
    parser.add_argument(
        "--remap",
        action="append",
        default=[],
        metavar="FROM:=TO",
        help="publish bag topic FROM as TO (repeatable)",
    )
    parser.add_argument(
        "--reliability",
        choices=("reliable", "best_effort"),
        default="reliable",
        help="publisher reliability (default reliable, as ros2 bag play)",
    )
    parser.add_argument(
        "--wait-for",
        action="append",
        default=[],
        metavar="TOPIC",
        help="before playing, wait until TOPIC (as published) has a subscriber (repeatable)",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="give up waiting for --wait-for / --lockstep peers after S seconds (error)",
    )
    parser.add_argument(
        "--lockstep",
        default=None,
        metavar="TOPIC",
        help="after each camera frame wait for its Detection2DArray on TOPIC (replaces the "
        "bag's timing)",
    )
    parser.add_argument(
        "--lockstep-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for one frame's answer before going on (counted as missed)",
    )
    parser.add_argument("--domain-id", type=int, default=None, help="default: $ROS_DOMAIN_ID or 0")


def parse_remaps(items: list[str]) -> dict[str, str]:
    """``FROM:=TO`` strings -> {FROM: TO} (ValueError naming a malformed item)."""
    remaps = {}
    for item in items:
        old, sep, new = item.partition(":=")
        if not sep or not old.strip() or not new.strip():
            raise UsageError(f"--remap {item!r}: use FROM:=TO")
        remaps[old.strip()] = new.strip()
    return remaps


class _Lockstep:
    """Collects the stamps of the detections answering the played frames."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._stamps: set[int] = set()

    def __call__(self, msg: Any) -> None:
        with self._cond:
            self._stamps.add(messages.stamp_ns(msg.header))
            self._cond.notify_all()

    def wait(self, stamp: int, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while stamp not in self._stamps:
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self._cond.wait(min(left, 0.1))
            self._stamps.discard(stamp)
            return True


def _timeline(reader: Any, topics: list[str], loop: bool) -> Iterator[tuple[int, Any]]:
    """(offset ns from the first message, bag message), forever with ``loop``."""
    offset = 0
    while True:
        first = last = None
        for item in reader.messages(topics):
            first = item.log_ns if first is None else first
            last = item.log_ns
            yield offset + item.log_ns - first, item
        if not loop or first is None:
            return
        offset += last - first + 1  # next round starts right after the last message


def play(args: argparse.Namespace, stop: threading.Event) -> dict[str, int]:
    """Play the bag; return the number of messages published per topic (as published)."""
    from dds_perception.ros.bag import BagReader
    from dds_perception.ros.dds import runtime as rt
    from dds_perception.ros.dds import types as idl

    if args.rate <= 0:
        raise UsageError(f"--rate {args.rate}: must be positive")
    remaps = parse_remaps(args.remap)
    counts: dict[str, int] = {}
    with BagReader(args.bag) as reader, rt.DdsRuntime(domain=args.domain_id) as runtime:
        available = reader.topics
        wanted = list(args.topics) if args.topics else sorted(available)
        reader.require(*wanted)
        playable = []
        for topic in wanted:
            if available[topic] in idl.IDL_TYPES:
                playable.append(topic)
            elif args.topics:
                raise UsageError(
                    f"{args.bag}: topic {topic} has type {available[topic]}, "
                    "which this runtime cannot publish"
                )
            else:
                print(f"play: skipping {topic} ({available[topic]}: no DDS type)", file=sys.stderr)
        if not playable:
            raise UsageError(f"{args.bag}: nothing to play")
        qos = (
            rt.reliable_qos(10) if args.reliability == "reliable" else rt.sensor_qos("best_effort")
        )
        publishers = {
            topic: runtime.publisher(remaps.get(topic, topic), available[topic], qos)
            for topic in playable
        }
        by_name = {p.topic_name: p for p in publishers.values()}
        lockstep = None
        if args.lockstep:
            lockstep = _Lockstep()
            runtime.subscribe(args.lockstep, DETECTIONS_TYPE, lockstep, rt.reliable_qos(10))
            runtime.start()
        _wait_for_peers(args, runtime, by_name, stop)
        image_topics = {t for t in playable if available[t] in IMAGE_TYPES}
        start = time.monotonic()
        missed = 0
        for offset_ns, item in _timeline(reader, playable, args.loop):
            if lockstep is None:
                delay = start + offset_ns / 1e9 / args.rate - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            if stop.is_set():
                break
            publisher = publishers[item.topic]
            publisher.publish(item.msg)
            counts[publisher.topic_name] = counts.get(publisher.topic_name, 0) + 1
            if lockstep is not None and item.topic in image_topics:
                stamp = messages.stamp_ns(item.msg.header)
                if not lockstep.wait(stamp, args.lockstep_timeout, stop):
                    missed += 1
        if missed:
            print(f"play: {missed} frame(s) got no answer on {args.lockstep}", file=sys.stderr)
    return counts


def _wait_for_peers(
    args: argparse.Namespace, runtime: Any, by_name: dict[str, Any], stop: threading.Event
) -> None:
    waits = [runtime.name(t) for t in args.wait_for]
    unknown = [t for t in waits if t not in by_name]
    if unknown:
        raise UsageError(f"--wait-for {', '.join(unknown)}: not a topic this replay publishes")
    deadline = time.monotonic() + args.wait_timeout
    while not stop.is_set():
        pending = [t for t in waits if by_name[t].subscription_count() == 0]
        if args.lockstep and runtime.publisher_count(args.lockstep) == 0:
            pending.append(f"a publisher of {runtime.name(args.lockstep)}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no peer after {args.wait_timeout:.0f} s for: {', '.join(pending)} "
                f"(domain {runtime.domain_id})"
            )
        stop.wait(0.05)


def run(args: argparse.Namespace) -> int:
    from dds_perception.ros.dds.node import format_counts, run_stoppable

    counts = run_stoppable("play", play, args)
    if counts is None:
        return 1
    total = sum(counts.values())
    print(f"play: published {total} messages ({format_counts(counts)})")
    return 0
