"""ROS 2 bags (``metadata.yaml`` + ``.mcap`` or ``.db3``) written and read with ``rosbags``.

:class:`BagWriter` writes a bag under a temporary name and renames it when it is closed without
error, so an interrupted run never leaves a bag that looks complete. :class:`BagReader` reads
messages in log-time order as rosbags message objects. Every failure (not a bag, a truncated
file, a missing topic, a corrupt message) is a :class:`BagError` naming the bag and the topic.

The KITTI bag layout (what ``dds-perception kitti2bag`` writes; all messages of one frame share
the log time, which equals the frame's ``header.stamp``, on a 10 Hz timeline starting at 1.0 s):

====================================  ==============================  ===========================
topic                                 type                            content
====================================  ==============================  ===========================
``/kitti/camera/image_raw``           sensor_msgs/Image               rgb8 pixels (default)
``/kitti/camera/image_raw/compressed``  sensor_msgs/CompressedImage   the PNG file's bytes
``/kitti/camera/camera_info``         sensor_msgs/CameraInfo          K, P from calib ``P2``
``/kitti/ground_truth``               vision_msgs/Detection2DArray    every label, class_id=type
``/kitti/labels``                     std_msgs/String                 the label file's text
``/kitti/frame_id``                   std_msgs/String                 the KITTI id, e.g. 000123
====================================  ==============================  ===========================

Headers carry ``frame_id = "camera"``; the KITTI frame id travels on ``/kitti/frame_id``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dds_perception.ros import messages as m
from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import atomic_path

STORAGES = ("mcap", "sqlite3")

IMAGE_TOPIC = "/kitti/camera/image_raw"
COMPRESSED_TOPIC = "/kitti/camera/image_raw/compressed"
CAMERA_INFO_TOPIC = "/kitti/camera/camera_info"
GROUND_TRUTH_TOPIC = "/kitti/ground_truth"
LABELS_TOPIC = "/kitti/labels"
FRAME_ID_TOPIC = "/kitti/frame_id"
DETECTIONS_TOPIC = "/detections"

# metadata.yaml version 8 (QoS profiles as a YAML string): Humble's rosbag2 cannot parse
# version 9's QoS lists ("yaml-cpp: bad conversion"); Jazzy and later read both.
METADATA_VERSION = 8

CAMERA_FRAME = "camera"  # header.frame_id of every KITTI message
START_NS = 1_000_000_000  # first frame at 1.0 s (a stamp of 0 reads as "unset" in ROS tools)
PERIOD_NS = 100_000_000  # 10 Hz, KITTI's capture rate


def frame_stamp_ns(index: int) -> int:
    """Header stamp (and log time) of the ``index``-th frame of a KITTI bag."""
    return START_NS + int(index) * PERIOD_NS


class BagError(DdsPerceptionError, ValueError):
    """A bag cannot be written or read; the message names the bag (and topic)."""


# --------------------------------------------------------------------------------------------
# Writing


class BagWriter:
    """Write rosbags messages to a new ROS 2 bag; use as a context manager.

    The bag is built in a temporary folder beside ``path`` and renamed onto ``path`` when the
    ``with`` block ends without an exception (see :func:`~dds_perception.utils.io.atomic_path`).
    Topics are added on first write with the message's type.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage: str = "mcap",
        classes: m.MessageClasses | None = None,
    ) -> None:
        if storage not in STORAGES:
            raise BagError(f"{path}: unknown storage {storage!r}; choose one of {STORAGES}")
        self.path = Path(path)
        self.storage = storage
        self.classes = classes or m.rosbags_classes()
        if self.classes.typestore is None:
            raise BagError(f"{path}: writing a bag needs rosbags message classes")
        self.counts: dict[str, int] = {}
        self._connections: dict[str, Any] = {}
        self._writer: Any = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> BagWriter:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if self.path.exists():
            raise BagError(f"{self.path}: exists already; remove it or choose another name")
        self._stack = contextlib.ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path))
            plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
            self._writer = Writer(tmp, version=METADATA_VERSION, storage_plugin=plugin)
            self._writer.open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        """Serialise ``msg`` and write it on ``topic`` at log time ``stamp_ns``."""
        if self._writer is None:
            raise BagError(f"{self.path}: bag is not open for writing")
        msgtype = self.classes.msgtype(msg)
        connection = self._connections.get(topic)
        if connection is None:
            connection = self._writer.add_connection(
                topic, msgtype, typestore=self.classes.typestore
            )
            self._connections[topic] = connection
        elif connection.msgtype != msgtype:
            raise BagError(
                f"{self.path}: topic {topic} holds {connection.msgtype}, cannot write {msgtype}"
            )
        self._writer.write(connection, int(stamp_ns), self.classes.serialize(msg))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        writer, self._writer = self._writer, None
        stack, self._stack = self._stack, None
        assert stack is not None
        if exc_type is not None:
            with contextlib.suppress(Exception):
                writer.abort()  # release the storage file; no index, no metadata.yaml
            stack.__exit__(exc_type, exc, tb)  # removes the temporary bag
            return
        try:
            writer.close()  # writes the index and metadata.yaml
        except BaseException as error:
            stack.__exit__(type(error), error, error.__traceback__)
            raise
        stack.__exit__(None, None, None)  # renames the finished bag onto its name


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class BagMessage:
    """One deserialised message with its topic, type and log time (ns)."""

    topic: str
    msgtype: str
    log_ns: int
    msg: Any


def _bag_dir(path: str | os.PathLike[str]) -> Path:
    """Accept a bag folder or a storage file inside it."""
    p = Path(path)
    if p.is_file() and (p.parent / "metadata.yaml").is_file():
        return p.parent
    return p


class BagReader:
    """Read a ROS 2 bag (mcap or sqlite3) with rosbags; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, store: str = "humble") -> None:
        self.path = _bag_dir(path)
        self.classes = m.rosbags_classes(store)
        self._reader: Any = None
        self._decoders: dict[int, Any] = {}  # connection id -> typestore that decodes it

    def __enter__(self) -> BagReader:
        from rosbags.rosbag2 import Reader, ReaderError

        if not self.path.exists():
            raise BagError(f"{self.path}: no such bag")
        if not (self.path / "metadata.yaml").is_file():
            raise BagError(
                f"{self.path}: not a ROS 2 bag (no metadata.yaml; an interrupted conversion "
                f"or recording leaves none)"
            )
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except (ReaderError, OSError, ValueError, KeyError, IndexError) as error:
            self._reader = None
            raise BagError(f"{self.path}: cannot open bag: {error}") from error
        return self

    def __exit__(self, *exc: Any) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def _open_reader(self) -> Any:
        if self._reader is None:
            raise BagError(f"{self.path}: bag is not open")
        return self._reader

    @property
    def topics(self) -> dict[str, str]:
        """Topic name -> message type."""
        return {c.topic: c.msgtype for c in self._open_reader().connections}

    def message_count(self, topic: str) -> int:
        """Number of messages on ``topic`` (0 when absent)."""
        return sum(c.msgcount for c in self._open_reader().connections if c.topic == topic)

    def require(self, *topics: str) -> None:
        """Raise :class:`BagError` naming the first of ``topics`` the bag lacks."""
        have = self.topics
        for topic in topics:
            if topic not in have:
                listed = ", ".join(sorted(have)) or "none"
                raise BagError(f"{self.path}: no topic {topic} in this bag (topics: {listed})")

    def first_topic(self, *candidates: str) -> str:
        """The first of ``candidates`` present in the bag (BagError naming all when none is)."""
        have = self.topics
        for topic in candidates:
            if topic in have:
                return topic
        listed = ", ".join(sorted(have)) or "none"
        raise BagError(
            f"{self.path}: none of the topics {', '.join(candidates)} in this bag "
            f"(topics: {listed})"
        )

    def _typestore_for(self, connection: Any) -> Any:
        """Our typestore, or one built from the bag's own definition when the type differs.

        A bag records each type's definition (MCAP, and sqlite3 from Iron on) and its RIHS01 hash
        (from Jazzy on). When the hash differs from ours (e.g. vision_msgs 3.x recorded on
        Galactic) or the type is unknown to us, the bag's definition decodes it, so readers of
        the fields (``msg_to_detections``) see the layout that was recorded.
        """
        store = self._decoders.get(connection.id)
        if store is not None:
            return store
        from rosbags.interfaces import MessageDefinitionFormat
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore

        ours = self.classes.typestore
        msgtype = connection.msgtype
        known = msgtype in ours.types
        definition = connection.msgdef
        has_definition = definition.format == MessageDefinitionFormat.MSG and definition.data
        if known and (not connection.digest or connection.digest == ours.hash_rihs01(msgtype)):
            store = ours
        elif has_definition:
            try:
                store = get_typestore(Stores.EMPTY)
                store.register(get_types_from_msg(definition.data, msgtype))
            except Exception as error:
                raise BagError(
                    f"{self.path}: topic {connection.topic}: cannot parse the recorded "
                    f"definition of {msgtype}: {error}"
                ) from error
        elif known:
            store = ours  # no definition recorded: assume the distribution's layout
        else:
            raise BagError(
                f"{self.path}: topic {connection.topic}: unknown type {msgtype} and no "
                f"definition recorded in the bag"
            )
        self._decoders[connection.id] = store
        return store

    def messages(self, topics: Iterable[str]) -> Iterator[BagMessage]:
        """Deserialised messages of ``topics`` in log-time order."""
        wanted = list(dict.fromkeys(topics))
        self.require(*wanted)
        reader = self._open_reader()
        connections = [c for c in reader.connections if c.topic in wanted]
        iterator = reader.messages(connections=connections)
        topic = ", ".join(wanted)
        while True:
            try:
                connection, log_ns, raw = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # truncated / corrupt storage while iterating
                raise BagError(f"{self.path}: cannot read topic {topic}: {error}") from error
            try:
                msg = self._typestore_for(connection).deserialize_cdr(raw, connection.msgtype)
            except BagError:
                raise
            except Exception as error:
                raise BagError(
                    f"{self.path}: topic {connection.topic}: cannot decode a "
                    f"{connection.msgtype} at {log_ns} ns: {error}"
                ) from error
            yield BagMessage(connection.topic, connection.msgtype, int(log_ns), msg)


# --------------------------------------------------------------------------------------------
# KITTI bags: frames grouped by log time


@dataclass
class KittiBagFrame:
    """The messages of one frame of a KITTI bag (any but ``image`` may be None when its topic
    is absent)."""

    index: int  # position in the bag
    stamp_ns: int  # the image's header stamp
    log_ns: int  # the bag's log time of the frame's messages
    image: Any
    camera_info: Any = None
    ground_truth: Any = None
    labels: str | None = None
    kitti_id: str | None = None

    @property
    def name(self) -> str:
        """The KITTI frame id when recorded, else the 6-digit index."""
        return self.kitti_id if self.kitti_id else f"{self.index:06d}"


KITTI_TOPICS = (CAMERA_INFO_TOPIC, GROUND_TRUTH_TOPIC, LABELS_TOPIC, FRAME_ID_TOPIC)


def read_kitti_frames(
    reader: BagReader, image_topic: str | None = None, *, optional: Sequence[str] = KITTI_TOPICS
) -> Iterator[KittiBagFrame]:
    """Frames of a bag, one per image message, with the other KITTI topics of the same time.

    ``image_topic`` defaults to the raw image topic, else the compressed one. The topics in
    ``optional`` are read when the bag has them. Messages are matched to an image by log time,
    which kitti2bag sets to the image's header stamp.
    """
    image_topic = image_topic or reader.first_topic(IMAGE_TOPIC, COMPRESSED_TOPIC)
    reader.require(image_topic)
    wanted = [t for t in optional if t in reader.topics and t != image_topic]
    pending: dict[int, dict[str, Any]] = {}
    index = 0

    def text(msg: Any) -> str | None:
        return None if msg is None else str(msg.data)

    def make(log_ns: int, parts: dict[str, Any]) -> KittiBagFrame:
        image = parts[image_topic]
        return KittiBagFrame(
            index=index,
            stamp_ns=m.stamp_ns(image.header),
            log_ns=log_ns,
            image=image,
            camera_info=parts.get(CAMERA_INFO_TOPIC),
            ground_truth=parts.get(GROUND_TRUTH_TOPIC),
            labels=text(parts.get(LABELS_TOPIC)),
            kitti_id=text(parts.get(FRAME_ID_TOPIC)),
        )

    for item in reader.messages([image_topic, *wanted]):
        # A frame is complete once a later log time appears (all its messages share one time).
        for log_ns in [t for t in pending if t < item.log_ns]:
            parts = pending.pop(log_ns)
            if image_topic in parts:
                yield make(log_ns, parts)
                index += 1
        pending.setdefault(item.log_ns, {})[item.topic] = item.msg
    for log_ns in sorted(pending):
        if image_topic in pending[log_ns]:
            yield make(log_ns, pending[log_ns])
            index += 1
