"""The ByteTrack-style tracker on scripted box sequences, checked by hand.

Frames are 0.1 s apart (KITTI's 10 Hz). Boxes are x1, y1, x2, y2 in pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from dds_perception.detection.tracking import (
    ByteTracker,
    TrackerConfig,
    TrackerConfigError,
    box_iou,
    format_ids,
    greedy_match,
)

DT = 0.1


def box(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y + h]


def run(tracker: ByteTracker, frames: list[list[tuple[list[float], float]]]) -> list[list[int]]:
    """Ids per frame of scripted ``(box, score)`` lists."""
    out = []
    for index, dets in enumerate(frames):
        boxes = [b for b, _ in dets]
        scores = [s for _, s in dets]
        out.append(tracker.update(np.array(boxes).reshape(-1, 4), scores, index * DT).tolist())
    return out


def test_tracking_two_crossing_cars_keep_their_ids():
    """A near car drives right, a far (smaller, higher) car drives left; they cross at frame 7,
    where the near one hides the far one for two frames. Each keeps its id throughout."""
    frames = []
    for f in range(15):
        near = (box(100 + 40 * f, 200, 120, 90), 0.9)
        far = (box(700 - 40 * f, 180, 80, 60), 0.8)
        hidden = f in (7, 8)  # far car's centre within the near car's box: not detected
        frames.append([near] if hidden else [near, far])
    ids = run(ByteTracker(), frames)
    assert ids[0] == [1, 2]
    for f, frame_ids in enumerate(ids):
        assert frame_ids[0] == 1, f"frame {f}: near car got {frame_ids[0]}"
        if len(frame_ids) == 2:
            assert frame_ids[1] == 2, f"frame {f}: far car got {frame_ids[1]}"


def test_tracking_crossing_with_overlapping_detections():
    """Same crossing, both cars detected in every frame (their boxes overlap at the crossing):
    the motion model keeps them apart."""
    frames = [
        [(box(100 + 40 * f, 200, 120, 90), 0.9), (box(700 - 40 * f, 185, 100, 75), 0.85)]
        for f in range(16)
    ]
    ids = run(ByteTracker(), frames)
    assert all(frame_ids == [1, 2] for frame_ids in ids), ids


def test_tracking_id_survives_a_missed_frame():
    frames = [[(box(300 + 10 * f, 150, 80, 60), 0.9)] for f in range(10)]
    frames[5] = []  # the detector missed the car once
    ids = run(ByteTracker(), frames)
    assert ids[5] == []
    assert [i for frame_ids in ids for i in frame_ids] == [1] * 9


def test_tracking_low_score_frame_keeps_the_track():
    """A low-score box (e.g. the car half hidden) matches its track in the second round; a
    low-score box alone never starts a track."""
    frames = [[(box(300 + 10 * f, 150, 80, 60), 0.9)] for f in range(8)]
    frames[4] = [(box(340, 150, 80, 60), 0.3), (box(900, 100, 50, 40), 0.3)]
    ids = run(ByteTracker(), frames)
    assert ids[4] == [1, 0]  # the car keeps id 1; the lone low box gets no id
    assert all(frame_ids[0] == 1 for frame_ids in ids)


def test_tracking_lost_track_expires_and_ids_are_never_reused():
    tracker = ByteTracker(TrackerConfig(track_buffer=0.25))
    assert tracker.update([box(100, 100, 50, 40)], [0.9], 0.0).tolist() == [1]
    assert tracker.update(np.zeros((0, 4)), [], 0.1).tolist() == []
    assert tracker.num_lost == 1
    for stamp in (0.2, 0.3, 0.4):
        tracker.update(np.zeros((0, 4)), [], stamp)
    assert tracker.num_lost == 0  # gone after 0.25 s
    # the same place again: a new car as far as the tracker knows, with a new id
    assert tracker.update([box(100, 100, 50, 40)], [0.9], 0.5).tolist() == [2]
    tracker.reset()
    assert tracker.update([box(100, 100, 50, 40)], [0.9], 0.6).tolist() == [3]


def test_tracking_one_frame_false_positive_does_not_become_a_track():
    """A box born after the first frame is tentative: unmatched in the next frame it is
    dropped, so a car passing there later gets a fresh id, not the ghost's."""
    tracker = ByteTracker()
    car = box(100, 100, 60, 50)
    assert tracker.update([car], [0.9], 0.0).tolist() == [1]
    assert tracker.update([car, box(600, 120, 60, 50)], [0.9, 0.9], 0.1).tolist() == [1, 2]
    assert tracker.update([car], [0.9], 0.2).tolist() == [1]
    assert (tracker.num_tracked, tracker.num_lost) == (1, 0)  # the ghost was dropped
    assert tracker.update([car, box(600, 120, 60, 50)], [0.9, 0.9], 0.3).tolist() == [1, 3]
    assert tracker.update([car, box(602, 120, 60, 50)], [0.9, 0.9], 0.4).tolist() == [1, 3]


def test_tracking_new_track_threshold():
    tracker = ByteTracker(TrackerConfig(high_threshold=0.5, new_track_threshold=0.6))
    assert tracker.update([box(0, 0, 50, 50)], [0.55], 0.0).tolist() == [0]
    assert tracker.update([box(0, 0, 50, 50)], [0.65], 0.1).tolist() == [1]


def test_tracking_no_id_twice_in_a_frame_random_scenes():
    """Property on seeded random traffic: ids are unique within every frame and every id, once
    it disappears for longer than the buffer, never comes back."""
    rng = np.random.default_rng(0)
    tracker = ByteTracker(TrackerConfig(track_buffer=0.3))
    cars = rng.uniform([0, 100, 40, 30], [1200, 250, 150, 110], size=(12, 4))
    speed = rng.uniform(-60, 60, size=12)
    last_seen: dict[int, float] = {}
    for f in range(60):
        stamp = f * DT
        visible = rng.random(12) > 0.15
        boxes = np.array(
            [box(x + v * f, y, w, h) for (x, y, w, h), v in zip(cars, speed, strict=True)]
        )[visible]
        boxes += rng.normal(0, 2.0, boxes.shape)
        scores = rng.uniform(0.2, 1.0, len(boxes))
        ids = tracker.update(boxes, scores, stamp)
        nonzero = ids[ids > 0].tolist()
        assert len(nonzero) == len(set(nonzero)), f"frame {f}: ids {ids}"
        for i in nonzero:
            if i in last_seen:
                assert stamp - last_seen[i] <= 0.3 + 1e-9 + DT, f"id {i} came back"
            last_seen[i] = stamp


def test_tracking_stamp_going_back_resets_but_keeps_counting():
    tracker = ByteTracker()
    tracker.update([box(0, 0, 50, 50)], [0.9], 5.0)
    assert tracker.update([box(0, 0, 50, 50)], [0.9], 1.0).tolist() == [2]  # a bag looped


def test_tracking_ignores_non_finite_boxes_and_checks_lengths():
    tracker = ByteTracker()
    ids = tracker.update([[np.nan, 0, 10, 10], box(0, 0, 50, 50)], [0.9, 0.9], 0.0)
    assert ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        tracker.update([box(0, 0, 5, 5), box(9, 9, 5, 5)], [0.9], 0.1)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"high_threshold": 1.5}, r"high_threshold 1.5: must lie in \[0, 1\]"),
        ({"low_threshold": 0.7, "high_threshold": 0.5}, r"low_threshold 0.7 > high_threshold"),
        ({"track_buffer": -1.0}, r"track_buffer -1.0: must be >= 0"),
        ({"measurement_noise": 0.0}, r"measurement_noise 0.0: must be > 0"),
    ],
)
def test_tracking_config_validation(changes, match):
    with pytest.raises(TrackerConfigError, match=match):
        TrackerConfig(**changes)


def test_tracking_helpers():
    a = np.array([box(0, 0, 10, 10), box(20, 0, 10, 10)], dtype=float)
    b = np.array([box(5, 0, 10, 10)], dtype=float)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150], [0.0]])
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)
    iou = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_match(iou, 0.2) == [(0, 0)]  # row 1's only good column is taken
    assert greedy_match(np.array([[0.9, 0.8], [0.85, 0.3]]), 0.2) == [(0, 0), (1, 1)]
    assert format_ids(np.array([3, 0, 12])) == ["3", "", "12"]
