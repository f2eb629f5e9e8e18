"""Track-id quality on a labelled sequence: id switches, duplicates, coverage (CLEAR MOT style).

Per frame the tracker's boxes are matched to the ground-truth boxes (IoU >= 0.5, greedy by IoU);
then, as CLEAR MOT counts them:

- an **id switch**: a ground-truth car matched to a tracker id other than the one it was last
  matched to (a missed frame in between is not a switch, a different id afterwards is);
- a **fragmentation**: a ground-truth car's matched id resumes after at least one frame
  unmatched (the id survived, the track was interrupted);
- a **duplicate**: one tracker id on two boxes of the same frame (must never happen);
- an **id on two cars**: a tracker id that named one ground-truth car and later another (a swap
  at a crossing, or a track that jumped to a neighbour);
- **coverage**: matched ground-truth boxes that carry an id, over all ground-truth boxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dds_perception.detection.tracking import box_iou, greedy_match

MATCH_IOU = 0.5


@dataclass(frozen=True)
class FrameTracks:
    """One frame: ground-truth boxes with their car ids, tracker boxes with their ids."""

    truth_boxes: np.ndarray  # (M, 4)
    truth_ids: Sequence[int]
    boxes: np.ndarray  # (N, 4)
    ids: Sequence[str]  # "" = no track


def id_metrics(frames: Iterable[FrameTracks]) -> dict[str, Any]:
    """The counts of the module doc over a whole sequence."""
    last_id: dict[int, str] = {}  # ground-truth car -> tracker id it was last matched to
    last_frame: dict[int, int] = {}
    owner: dict[str, int] = {}  # tracker id -> the ground-truth car it first named
    counts = {
        "frames": 0,
        "truth_boxes": 0,
        "matched": 0,
        "with_id": 0,
        "id_switches": 0,
        "fragmentations": 0,
        "duplicates": 0,
        "ids_on_two_cars": 0,
    }
    moved: set[str] = set()
    for index, frame in enumerate(frames):
        counts["frames"] += 1
        truth = np.asarray(frame.truth_boxes, dtype=np.float64).reshape(-1, 4)
        boxes = np.asarray(frame.boxes, dtype=np.float64).reshape(-1, 4)
        ids = [str(i) for i in frame.ids]
        named = [i for i in ids if i]
        counts["duplicates"] += len(named) - len(set(named))
        counts["truth_boxes"] += len(truth)
        for t, d in greedy_match(box_iou(truth, boxes), MATCH_IOU):
            counts["matched"] += 1
            car, track = int(frame.truth_ids[t]), ids[d]
            if not track:
                continue
            counts["with_id"] += 1
            if car in last_id and last_id[car] != track:
                counts["id_switches"] += 1
            elif car in last_frame and last_frame[car] < index - 1:
                counts["fragmentations"] += 1
            first = owner.setdefault(track, car)
            if first != car and track not in moved:
                moved.add(track)
                counts["ids_on_two_cars"] += 1
            last_id[car], last_frame[car] = track, index
    counts["cars"] = len(last_id)
    counts["coverage"] = (
        counts["with_id"] / counts["truth_boxes"] if counts["truth_boxes"] else 0.0
    )
    return counts
