"""Stable ids for detected cars across frames: a small ByteTrack-style multi-object tracker.

ByteTrack (Zhang et al., ECCV 2022) in the form a detector node needs, numpy only:

1. every track's box is predicted to the new frame's time by a constant-velocity Kalman filter
   on the box centre and size (one 2-state filter per coordinate, all tracks at once);
2. high-score boxes (``score >= high_threshold``) are matched to the tracked and lost tracks by
   IoU with the predicted boxes;
3. low-score boxes (``low_threshold <= score < high_threshold``, e.g. a car half hidden) are
   matched to the tracked tracks still unmatched, with a stricter IoU: they keep tracks alive
   but never start one;
4. tentative tracks (born last frame) are matched to the remaining high-score boxes; unmatched
   ones are dropped (a one-frame false positive never becomes a lasting track);
5. unmatched tracked tracks become lost; lost tracks are kept ``track_buffer`` seconds, their
   box still predicted, so a car missed for a frame or hidden for a moment gets its id back;
6. remaining boxes with ``score >= new_track_threshold`` start new tracks.

Matching is greedy by descending IoU (with at most a few dozen cars per frame it agrees with the
optimal assignment except in near-ties, and needs no scipy). Ids are positive integers counted up
per tracker and never reused, not even after :meth:`ByteTracker.reset`. Time is the frames'
stamps in seconds, so dropped frames (the node processes the newest frame only) widen the
prediction step instead of breaking the motion model; a stamp earlier than the last one (a
replayed bag starting over) resets the tracks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dds_perception.utils.errors import DdsPerceptionError

TENTATIVE, TRACKED, LOST = 0, 1, 2


class TrackerConfigError(DdsPerceptionError, ValueError):
    """A tracker setting is out of range; the message names it."""


@dataclass(frozen=True)
class TrackerConfig:
    """Thresholds, the lost-track lifetime and the Kalman filter's noise.

    The noise terms are fractions of the box height (ByteTrack's: 1/20 for positions), per
    square-root second for the process noise, so that a car's size sets its pixel uncertainty.
    """

    high_threshold: float = 0.5
    low_threshold: float = 0.1
    new_track_threshold: float = 0.6
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    tentative_match_iou: float = 0.3
    track_buffer: float = 1.0  # seconds a lost track is kept
    measurement_noise: float = 0.05
    position_noise: float = 0.16
    velocity_noise: float = 0.2
    initial_velocity_noise: float = 0.6

    def __post_init__(self) -> None:
        for name in (
            "high_threshold",
            "low_threshold",
            "new_track_threshold",
            "match_iou",
            "low_match_iou",
            "tentative_match_iou",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise TrackerConfigError(f"{name} {value}: must lie in [0, 1]")
        if self.low_threshold > self.high_threshold:
            raise TrackerConfigError(
                f"low_threshold {self.low_threshold} > high_threshold {self.high_threshold}"
            )
        if not self.track_buffer >= 0:
            raise TrackerConfigError(f"track_buffer {self.track_buffer}: must be >= 0 seconds")
        for name in (
            "measurement_noise",
            "position_noise",
            "velocity_noise",
            "initial_velocity_noise",
        ):
            if not getattr(self, name) > 0:
                raise TrackerConfigError(f"{name} {getattr(self, name)}: must be > 0")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1, y1, x2, y2 boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs, highest IoU first, each row and column used once, IoU >= threshold."""
    if iou.size == 0:
        return []
    rows, cols = np.nonzero(iou >= threshold)
    if len(rows) == 0:
        return []
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    pairs = []
    for k in order.tolist():
        r, c = int(rows[k]), int(cols[k])
        if r in used_rows or c in used_cols:
            continue
        used_rows.add(r)
        used_cols.add(c)
        pairs.append((r, c))
    return pairs


def _xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            0.5 * (boxes[:, 0] + boxes[:, 2]),
            0.5 * (boxes[:, 1] + boxes[:, 3]),
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        axis=1,
    )


def _cxcywh_to_xyxy(state: np.ndarray) -> np.ndarray:
    half_w = 0.5 * np.maximum(state[:, 2], 1.0)
    half_h = 0.5 * np.maximum(state[:, 3], 1.0)
    return np.stack(
        [state[:, 0] - half_w, state[:, 1] - half_h, state[:, 0] + half_w, state[:, 1] + half_h],
        axis=1,
    )


class ByteTracker:
    """Tracks of one camera; :meth:`update` once per processed frame, in stamp order.

    Not thread-safe: the node calls it from its one worker thread.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._next_id = 1
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every track (ids are not reused afterwards) and the last stamp."""
        self._ids = np.zeros(0, dtype=np.int64)
        self._state = np.zeros(0, dtype=np.int8)
        self._x = np.zeros((0, 4))  # cx, cy, w, h
        self._v = np.zeros((0, 4))  # their rates, px/s
        self._ppp = np.zeros((0, 4))  # covariance per coordinate: var(p), cov(p, v), var(v)
        self._ppv = np.zeros((0, 4))
        self._pvv = np.zeros((0, 4))
        self._last_seen = np.zeros(0)
        self._stamp: float | None = None

    def _keep(self, mask: np.ndarray) -> None:
        for name in ("_ids", "_state", "_x", "_v", "_ppp", "_ppv", "_pvv", "_last_seen"):
            setattr(self, name, getattr(self, name)[mask])

    @property
    def num_tracked(self) -> int:
        """Tracks matched in the last frame (tentative ones included)."""
        return int(np.count_nonzero(self._state != LOST))

    @property
    def num_lost(self) -> int:
        """Tracks unmatched lately but still kept (``track_buffer``)."""
        return int(np.count_nonzero(self._state == LOST))

    @property
    def next_id(self) -> int:
        """The id the next new track will get (every smaller id was used once)."""
        return self._next_id

    def predicted_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, x1 y1 x2 y2 boxes) of every kept track at the last stamp (for drawing)."""
        return self._ids.copy(), _cxcywh_to_xyxy(self._x)

    # ---------------------------------------------------------------- Kalman filter
    def _predict(self, dt: float) -> None:
        if dt <= 0 or len(self._ids) == 0:
            return
        lost = self._state == LOST
        self._v[lost, 2:] = 0.0  # a lost track keeps moving but stops growing (ByteTrack)
        self._x += self._v * dt
        scale = np.maximum(self._x[:, 3:4], 1.0) ** 2
        cfg = self.config
        self._ppp += 2 * dt * self._ppv + dt * dt * self._pvv + cfg.position_noise**2 * dt * scale
        self._ppv += dt * self._pvv
        self._pvv += cfg.velocity_noise**2 * dt * scale

    def _correct(self, rows: np.ndarray, measured: np.ndarray) -> None:
        h2 = np.maximum(measured[:, 3:4], 1.0) ** 2
        r = self.config.measurement_noise**2 * h2
        ppp, ppv, pvv = self._ppp[rows], self._ppv[rows], self._pvv[rows]
        s = ppp + r
        k_p, k_v = ppp / s, ppv / s
        residual = measured - self._x[rows]
        self._x[rows] += k_p * residual
        self._v[rows] += k_v * residual
        self._ppp[rows] = (1 - k_p) * ppp
        self._ppv[rows] = (1 - k_p) * ppv
        self._pvv[rows] = pvv - k_v * ppv

    def _birth(self, measured: np.ndarray, state: int, stamp: float) -> np.ndarray:
        n = len(measured)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        h2 = np.maximum(measured[:, 3:4], 1.0) ** 2 * np.ones((1, 4))
        cfg = self.config
        self._ids = np.concatenate([self._ids, ids])
        self._state = np.concatenate([self._state, np.full(n, state, dtype=np.int8)])
        self._x = np.concatenate([self._x, measured])
        self._v = np.concatenate([self._v, np.zeros((n, 4))])
        self._ppp = np.concatenate([self._ppp, (2 * cfg.measurement_noise) ** 2 * h2])
        self._ppv = np.concatenate([self._ppv, np.zeros((n, 4))])
        self._pvv = np.concatenate([self._pvv, cfg.initial_velocity_noise**2 * h2])
        self._last_seen = np.concatenate([self._last_seen, np.full(n, stamp)])
        return ids

    # ---------------------------------------------------------------- one frame
    def update(self, boxes: Any, scores: Any, stamp: float) -> np.ndarray:
        """Associate one frame's boxes (N x 4: x1, y1, x2, y2) to the tracks.

        Returns the track id of each box (int64; 0 = no track: a low-score box that matched
        none, or a box below ``new_track_threshold``).
        """
        cfg = self.config
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
        stamp = float(stamp)
        if self._stamp is not None and stamp < self._stamp:
            self.reset()  # time went backwards: a bag started over, or a clock jumped
        first = self._stamp is None
        dt = 0.0 if first else stamp - self._stamp
        self._stamp = stamp
        self._predict(dt)
        expired = (self._state == LOST) & (stamp - self._last_seen > cfg.track_buffer)
        if expired.any():
            self._keep(~expired)

        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        measured = _xyxy_to_cxcywh(np.where(finite[:, None], boxes, 0.0))
        result = np.zeros(len(boxes), dtype=np.int64)
        high = np.flatnonzero(finite & (scores >= cfg.high_threshold))
        low = np.flatnonzero(
            finite & (scores < cfg.high_threshold) & (scores >= cfg.low_threshold)
        )
        predicted = _cxcywh_to_xyxy(self._x)
        matched_tracks: list[int] = []
        matched_dets: list[int] = []

        def associate(tracks: np.ndarray, dets: np.ndarray, threshold: float) -> np.ndarray:
            """Match ``tracks`` x ``dets``; return the detections left unmatched."""
            pairs = greedy_match(box_iou(predicted[tracks], boxes[dets]), threshold)
            used = np.zeros(len(dets), dtype=bool)
            for r, c in pairs:
                matched_tracks.append(int(tracks[r]))
                matched_dets.append(int(dets[c]))
                used[c] = True
            return dets[~used]

        confirmed = np.flatnonzero(self._state != TENTATIVE)
        high_left = associate(confirmed, high, cfg.match_iou)
        first_round = set(matched_tracks)
        tracked_left = np.array(
            [t for t in confirmed if self._state[t] == TRACKED and t not in first_round],
            dtype=np.int64,
        )
        associate(tracked_left, low, cfg.low_match_iou)
        tentative = np.flatnonzero(self._state == TENTATIVE)
        high_left = associate(tentative, high_left, cfg.tentative_match_iou)

        if matched_tracks:
            rows = np.asarray(matched_tracks, dtype=np.int64)
            dets = np.asarray(matched_dets, dtype=np.int64)
            self._correct(rows, measured[dets])
            self._last_seen[rows] = stamp
            result[dets] = self._ids[rows]
        was_matched = np.zeros(len(self._ids), dtype=bool)
        was_matched[matched_tracks] = True
        self._state[(self._state == TRACKED) & ~was_matched] = LOST
        self._state[matched_tracks] = TRACKED
        drop = (self._state == TENTATIVE) & ~was_matched
        if drop.any():
            self._keep(~drop)

        newborn = high_left[scores[high_left] >= cfg.new_track_threshold]
        if len(newborn):
            result[newborn] = self._birth(
                measured[newborn], TRACKED if first else TENTATIVE, stamp
            )
        return result


def format_ids(ids: np.ndarray) -> list[str]:
    """Track ids as Detection2D.id strings ("" for no track)."""
    return [str(int(i)) if i > 0 else "" for i in np.asarray(ids).reshape(-1)]
