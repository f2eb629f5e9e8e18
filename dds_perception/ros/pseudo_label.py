"""Pseudo-label a folder of images or a ROS 2 bag with a teacher ONNX detector (KITTI labels).

SOURCE is a folder of .png/.jpg images (sorted by name; a KITTI root or its training folder is
read from its image_2) or a ROS 2 bag (its /kitti/camera/image_raw, else .../compressed, or
--image-topic). OUT_ROOT (new, or empty) becomes a KITTI layout that KittiDetectionDataset reads:
  training/image_2/NNNNNN.png   the frame (a PNG source is copied byte for byte)
  training/label_2/NNNNNN.txt   teacher boxes: score >= --score-threshold as the mapped KITTI type,
                                between --ignore-threshold and it as DontCare (neither car nor
                                background: the teacher is unsure); --with-scores adds the score
                                as a 16th field (a KITTI result file, for `evaluate`)
  pseudo_label.json             teacher, thresholds, class map, tiling, counts, failed frames
Frames keep their names when they are KITTI ids (digits: an image's stem, a bag's
/kitti/frame_id), else are numbered in order. Every file is written under a temporary name and
renamed when complete, the label after its image, so an interrupted run leaves no half-written
file; a frame that cannot be decoded is counted and skipped.

examples:
  dds-perception pseudo-label camera_frames/ pseudo_kitti --teacher teachers/nanodet_m.onnx
  dds-perception pseudo-label drive_bag pseudo_kitti --teacher nanodet_m.onnx --every 5 \\
      --image-topic /camera/image_raw/compressed
  dds-perception pseudo-label frames/ out --teacher nanodet_m.onnx --class-map car=Car truck=Van
  # the teacher's own KITTI AP: keep every box with its score and evaluate it
  dds-perception pseudo-label ../shared/data/kitti_sample /tmp/teacher_out \\
      --teacher ../shared/data/teachers/nanodet_m.onnx --score-threshold 0.05 \\
      --ignore-threshold 0.05 --with-scores
  dds-perception evaluate --labels ../shared/data/kitti_sample/training/label_2 \\
      --results /tmp/teacher_out/training/label_2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from dds_perception.data import kitti
from dds_perception.data import teacher as t
from dds_perception.data.images import ImageDecodeError
from dds_perception.ros import bag
from dds_perception.ros import messages as m
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_path, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUMMARY_NAME = "pseudo_label.json"


@dataclass
class SourceFrame:
    """One input frame: its name in the source, the id it gets, and how to read it."""

    source: str  # file name or bag frame name, for the summary
    frame_id: str
    rgb: np.ndarray | None  # None when it could not be decoded (``error`` says why)
    png: bytes | None = None  # a PNG file's own bytes, copied instead of re-encoded
    error: str | None = None


def is_bag(path: Path) -> bool:
    """A ROS 2 bag folder (has metadata.yaml) or a storage file inside one."""
    return (path / "metadata.yaml").is_file() or (
        path.is_file() and (path.parent / "metadata.yaml").is_file()
    )


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Sorted images of ``folder`` (or of a KITTI root's image_2); ValueError when none."""
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or bag")
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder of images or a ROS 2 bag")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        try:
            return image_files(kitti.KittiLayout.find(path).image_dir)
        except FileNotFoundError:
            pass
        raise UsageError(
            f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder and not a ROS 2 bag"
        )
    return files


def select(count: int, every: int, limit: int | None) -> list[int]:
    """Indices of every ``every``-th frame, at most ``limit`` of them."""
    if every < 1:
        raise UsageError(f"--every must be at least 1, got {every}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    picked = list(range(0, count, every))
    return picked if limit is None else picked[:limit]


def folder_frames(
    files: Sequence[Path], every: int = 1, limit: int | None = None
) -> Iterator[SourceFrame]:
    """Frames of an image folder: KITTI ids when every stem is digits, else ``NNNNNN``."""
    keep_names = all(p.stem.isdigit() for p in files) and len({p.stem for p in files}) == len(
        files
    )
    for index in select(len(files), every, limit):
        path = files[index]
        frame_id = path.stem if keep_names else f"{index:06d}"
        data = path.read_bytes()
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if bgr is None:
            yield SourceFrame(path.name, frame_id, None, error=f"{path}: cannot decode image")
            continue
        png = data if path.suffix.lower() == ".png" else None
        yield SourceFrame(path.name, frame_id, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), png)


def bag_frames(
    reader: bag.BagReader, topic: str, every: int = 1, limit: int | None = None
) -> Iterator[SourceFrame]:
    """Frames of a bag's image topic, named by /kitti/frame_id when recorded (digits)."""
    wanted = set(select(reader.message_count(topic), every, limit))
    for frame in bag.read_kitti_frames(reader, topic, optional=(bag.FRAME_ID_TOPIC,)):
        if frame.index not in wanted:
            continue
        name = frame.name if frame.name.isdigit() else f"{frame.index:06d}"
        try:
            rgb = m.image_msg_to_rgb(frame.image)
        except ImageDecodeError as error:
            yield SourceFrame(frame.name, name, None, error=f"{reader.path}:{frame.name}: {error}")
            continue
        yield SourceFrame(frame.name, name, rgb)


def _check_output(out_root: Path) -> kitti.KittiLayout:
    layout = kitti.KittiLayout(out_root / "training")
    for folder in (layout.image_dir, layout.label_dir):
        if folder.is_dir() and any(folder.iterdir()):
            raise UsageError(f"{folder}: not empty; choose a new OUT_ROOT or empty this one")
    if (out_root / SUMMARY_NAME).exists():
        raise UsageError(f"{out_root / SUMMARY_NAME}: exists; choose a new OUT_ROOT")
    return layout


def _write_png(path: Path, frame: SourceFrame) -> None:
    with atomic_path(path) as tmp:
        if frame.png is not None:
            tmp.write_bytes(frame.png)
        elif not cv2.imwrite(str(tmp), cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: cannot write image")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pseudo_label(
    source: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    teacher_path: str | os.PathLike[str],
    *,
    class_map: dict[str, str] | None = None,
    score_threshold: float = 0.4,
    ignore_threshold: float = 0.25,
    with_scores: bool = False,
    image_topic: str | None = None,
    every: int = 1,
    limit: int | None = None,
    threads: int = 1,
    tile_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Label every selected frame of ``source`` into the KITTI layout ``out_root`` (see the
    module doc); return the summary also written to ``pseudo_label.json``."""
    source, out = Path(source), Path(out_root)
    class_map = dict(class_map or t.DEFAULT_CLASS_MAP)
    t.check_thresholds(score_threshold, ignore_threshold)
    select(1, every, limit)  # argument errors before the model loads
    layout = _check_output(out)
    from_bag = is_bag(source)
    files = [] if from_bag else image_files(source)  # an empty folder fails before the model
    names = t.class_names_for(teacher_path)
    mapped = t.class_indices(class_map, names)
    counts: Counter[str] = Counter()
    failed: list[str] = []
    seen: set[str] = set()
    with bag.BagReader(source) if from_bag else contextlib.nullcontext() as reader:
        if reader is not None:  # a bag without the topic fails before the model loads
            topic = image_topic or reader.first_topic(bag.IMAGE_TOPIC, bag.COMPRESSED_TOPIC)
            reader.require(topic)
            total = len(select(reader.message_count(topic), every, limit))
            frames = bag_frames(reader, topic, every, limit)
        else:
            topic = None
            total = len(select(len(files), every, limit))
            frames = folder_frames(files, every, limit)
        teacher = t.OnnxTeacher(
            teacher_path,
            threads=threads,
            # decode only what can become a label: the mapped classes above the ignore threshold
            score_floor=max(ignore_threshold, 0.01),
            classes=sorted(mapped),
            tile_size=tile_size,
            class_names=names,
        )
        start = time.perf_counter()
        layout.image_dir.mkdir(parents=True, exist_ok=True)
        layout.label_dir.mkdir(parents=True, exist_ok=True)
        for frame in tqdm(frames, total=total, desc="pseudo-label", disable=not progress):
            if frame.frame_id in seen:
                raise UsageError(f"{source}: frame id {frame.frame_id} appears twice")
            seen.add(frame.frame_id)
            if frame.rgb is None:
                failed.append(frame.error or frame.source)
                continue
            objects = t.to_kitti_objects(
                teacher.detect(frame.rgb),
                mapped,
                score_threshold=score_threshold,
                ignore_threshold=ignore_threshold,
                keep_scores=with_scores,
            )
            _write_png(layout.image(frame.frame_id), frame)  # the label last: it marks done
            kitti.write_label_file(layout.label(frame.frame_id), objects)
            counts["frames"] += 1
            counts.update(f"objects.{o.type}" for o in objects)
    if counts["frames"] == 0 and not failed:
        where = f"topic {topic} of {source}" if topic else str(source)
        raise UsageError(f"{where}: no frames selected (--every {every}, --limit {limit})")
    seconds = time.perf_counter() - start
    summary = {
        "source": str(source),
        "image_topic": topic,
        "teacher": str(teacher_path),
        "teacher_sha256": _sha256(Path(teacher_path)),
        "score_threshold": score_threshold,
        "ignore_threshold": ignore_threshold,
        "with_scores": with_scores,
        "class_map": class_map,
        "tiling": {
            "input_size": teacher.input_size,
            "tile_size": tile_size,
            "tile_factor": teacher.tile_factor,
            "full_frame": teacher.full_frame,
            "drop_cut": teacher.drop_cut,
            "nms_iou": teacher.nms_iou,
        },
        "every": every,
        "limit": limit,
        "counts": {
            "frames": counts["frames"],
            "failed": len(failed),
            "objects": {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if "." in k},
        },
        "failed": failed[:100],
        "seconds": round(seconds, 2),
        "ms_per_frame": round(1000 * seconds / max(1, counts["frames"]), 1),
    }
    write_json(out / SUMMARY_NAME, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="folder of .png/.jpg images, or a ROS 2 bag")
    parser.add_argument("out_root", type=Path, help="KITTI root to create (new or empty)")
    parser.add_argument("--teacher", type=Path, required=True, help="NanoDet-style ONNX model")
    parser.add_argument(
        "--score-threshold", type=float, default=0.4, help="least score of a label (0.4)"
    )
    parser.add_argument(
        "--ignore-threshold",
        type=float,
        default=0.25,
        help="boxes from here up to --score-threshold become DontCare (0.25; equal to the "
        "score threshold for none)",
    )
    parser.add_argument(
        "--class-map",
        nargs="+",
        metavar="COCO=KITTI",
        default=[f"{k}={v}" for k, v in t.DEFAULT_CLASS_MAP.items()],
        help="teacher class to KITTI type (default: car=Car truck=Van bus=Van)",
    )
    parser.add_argument(
        "--with-scores",
        action="store_true",
        help="keep the score as a 16th field (KITTI result files, for `evaluate`)",
    )
    parser.add_argument(
        "--image-topic", help=f"bag topic (default {bag.IMAGE_TOPIC}, else {bag.COMPRESSED_TOPIC})"
    )
    parser.add_argument("--every", type=int, default=1, help="label every N-th frame (1)")
    parser.add_argument("--limit", type=int, help="label at most N frames")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (1)")
    parser.add_argument(
        "--tile-size", type=int, help="tile side in pixels (default 1.25x the frame height)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = pseudo_label(
        args.source,
        args.out_root,
        args.teacher,
        class_map=t.parse_class_map(args.class_map),
        score_threshold=args.score_threshold,
        ignore_threshold=args.ignore_threshold,
        with_scores=args.with_scores,
        image_topic=args.image_topic,
        every=args.every,
        limit=args.limit,
        threads=args.threads,
        tile_size=args.tile_size,
        progress=not args.quiet,
    )
    counts = summary["counts"]
    objects = ", ".join(f"{n} {k}" for k, n in counts["objects"].items()) or "no objects"
    print(
        f"wrote {args.out_root}: {counts['frames']} frames ({objects}), "
        f"{counts['failed']} failed, {summary['ms_per_frame']} ms per frame"
    )
    for line in summary["failed"][:5]:
        print(f"  failed: {line}")
    return 0
