"""Convert a KITTI object-detection folder into a ROS 2 bag on a deterministic 10 Hz timeline.

Topics (frame i at header.stamp = log time = 1.0 s + i * 0.1 s, header.frame_id "camera"):
  /kitti/camera/image_raw              sensor_msgs/Image rgb8 (or, with --compressed,
  /kitti/camera/image_raw/compressed   sensor_msgs/CompressedImage: the PNG file's bytes)
  /kitti/camera/camera_info            sensor_msgs/CameraInfo from calib P2
  /kitti/ground_truth                  vision_msgs/Detection2DArray, class_id = KITTI type
  /kitti/labels                        std_msgs/String, the label file's text unchanged
  /kitti/frame_id                      std_msgs/String, the KITTI frame id (e.g. 000123)

The bag is written under a temporary name and renamed when complete. Without a label_2
folder (KITTI's testing set) only images, camera_info and frame ids are written.

examples:
  dds-perception kitti2bag ../shared/data/kitti_sample kitti_sample_bag
  dds-perception kitti2bag KITTI/ val_bag --split splits/val.txt --compressed
  dds-perception kitti2bag KITTI/ small_bag --limit 20 --storage sqlite3
  ros2 bag info kitti_sample_bag     # on a ROS 2 machine; Foxglove opens the .mcap directly
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dds_perception.data import kitti
from dds_perception.data.images import ImageDecodeError
from dds_perception.ros import bag
from dds_perception.ros import messages as m
from dds_perception.utils.errors import UsageError


class _GroundTruth:
    """Label records (every class, DontCare included) shaped like the pipeline's detections,
    score 1, for :func:`~dds_perception.ros.messages.detections_to_msg`."""

    def __init__(self, objects: Sequence[kitti.KittiObject]) -> None:
        self.boxes = np.asarray([o.bbox for o in objects], dtype=np.float64).reshape(-1, 4)
        self.class_names = [o.type for o in objects]
        self.scores = np.ones(len(self.class_names))


def convert(
    kitti_root: str | os.PathLike[str],
    out_bag: str | os.PathLike[str],
    *,
    split: Sequence[str] | None = None,
    limit: int | None = None,
    compressed: bool = False,
    storage: str = "mcap",
    progress: bool = True,
) -> dict[str, int]:
    """Write the KITTI frames of ``kitti_root`` (optionally a split, the first ``limit``) to a
    bag at ``out_bag``; return the message count per topic.
    """
    layout = kitti.KittiLayout.find(kitti_root)
    # KITTI's testing folder has no label_2: convert images and calibration only
    frame_ids = layout.frame_ids(split, require_labels=layout.label_dir.is_dir())
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be at least 1, got {limit}")
        frame_ids = frame_ids[:limit]
    if not frame_ids:
        raise kitti.KittiFormatError(f"{layout.image_dir}: no frames to convert")
    classes = m.rosbags_classes()
    with bag.BagWriter(out_bag, storage=storage, classes=classes) as writer:
        for index, frame_id in enumerate(tqdm(frame_ids, desc="kitti2bag", disable=not progress)):
            write_frame(writer, layout, frame_id, index, compressed=compressed)
        counts = dict(writer.counts)
    return counts


def write_frame(
    writer: bag.BagWriter,
    layout: kitti.KittiLayout,
    frame_id: str,
    index: int,
    *,
    compressed: bool,
) -> None:
    """Write the messages of one KITTI frame at its place on the timeline."""
    classes = writer.classes
    stamp = bag.frame_stamp_ns(index)
    header = m.header_msg(stamp, bag.CAMERA_FRAME, classes)
    image_path = layout.image(frame_id)
    png = image_path.read_bytes()
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"{image_path}: cannot decode image")
    height, width = bgr.shape[:2]
    if compressed:
        image = m.compressed_image_msg(png, "rgb8; png compressed bgr8", header, classes)
        writer.write(bag.COMPRESSED_TOPIC, image, stamp)
    else:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        writer.write(bag.IMAGE_TOPIC, m.rgb_to_image_msg(rgb, header, classes, "rgb8"), stamp)
    p2 = kitti.read_calib_p2(layout.calib(frame_id))
    writer.write(
        bag.CAMERA_INFO_TOPIC, m.camera_info_msg(p2, width, height, header, classes), stamp
    )
    writer.write(bag.FRAME_ID_TOPIC, m.string_msg(frame_id, classes), stamp)
    if not layout.label_dir.is_dir():
        return
    label_path = layout.label(frame_id)
    text = label_path.read_text(encoding="utf-8")
    objects = kitti.read_label_file(label_path)  # validates the text before it goes in the bag
    gt = m.detections_to_msg(_GroundTruth(objects), header, classes)
    writer.write(bag.GROUND_TRUTH_TOPIC, gt, stamp)
    writer.write(bag.LABELS_TOPIC, m.string_msg(text, classes), stamp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kitti_root", type=Path, help="KITTI root (or its training folder)")
    parser.add_argument("out_bag", type=Path, help="bag folder to create (must not exist)")
    parser.add_argument("--split", type=Path, help="file of frame ids (one per line)")
    parser.add_argument("--limit", type=int, help="convert only the first N frames")
    parser.add_argument(
        "--compressed",
        action="store_true",
        help="write the original PNG bytes as sensor_msgs/CompressedImage instead of rgb8",
    )
    parser.add_argument("--storage", choices=bag.STORAGES, default="mcap", help="bag storage")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    split = kitti.read_split(args.split) if args.split else None
    counts = convert(
        args.kitti_root,
        args.out_bag,
        split=split,
        limit=args.limit,
        compressed=args.compressed,
        storage=args.storage,
        progress=not args.quiet,
    )
    frames = counts.get(bag.IMAGE_TOPIC, counts.get(bag.COMPRESSED_TOPIC, 0))
    print(f"wrote {args.out_bag} ({args.storage}): {frames} frames")
    for topic, count in counts.items():
        print(f"  {topic}: {count}")
    return 0
