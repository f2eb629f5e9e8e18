"""KITTI 2D object-detection AP with the official devkit's semantics (``evaluate_object.cpp``).

The rules, as the devkit applies them per class and difficulty (easy / moderate / hard):

* Ground truth of the class counts only when it is at most ``MAX_OCCLUSION`` occluded, at most
  ``MAX_TRUNCATION`` truncated and strictly taller than ``MIN_HEIGHT`` pixels; otherwise it is
  *ignored* (a detection may match it, but it is neither a true positive nor a false negative).
  The neighbouring class (``Van`` for ``Car``, ``Person_sitting`` for ``Pedestrian``) is ignored
  the same way; every other class is skipped. Class names compare case-insensitively.
* Detections of the class lower than ``MIN_HEIGHT`` pixels are ignored (never a false positive).
  As in the devkit this height test runs before the class test, so a low detection of *any*
  class may absorb a ground-truth box without counting.
* A detection matches when its IoU with a ground-truth box is strictly greater than 0.7 (Car)
  or 0.5 (Pedestrian, Cyclist). Ground truth is visited in file order and takes the best free
  detection: the highest score when picking thresholds, the largest overlap when counting.
* An unmatched detection whose intersection with a ``DontCare`` box covers more than the class's
  overlap threshold of the detection's own area is not a false positive.
* Score thresholds are the true-positive scores where the recall crosses each of 41 evenly
  spaced points (the devkit's ``getThresholds``); precision is computed at each picked threshold,
  made monotone (maximum to the right), and sample points past the last threshold stay 0. AP_11
  averages points 0, 4, ..., 40; AP_40 averages points 1..40. With fewer than 41 valid boxes even
  perfect detections stay below 100, exactly as with the official tool.

Matching is sequential by nature; it is vectorised across frames (one step per ground-truth rank
within a frame) and across the 41 thresholds, so a KITTI-validation-sized set takes well under
a second per class.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dds_perception.data.kitti import (
    KittiFormatError,
    KittiObject,
    parse_line,
    read_label_file,
    read_split,
)
from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import atomic_path, write_json

DIFFICULTIES = ("easy", "moderate", "hard")
MIN_HEIGHT = (40, 25, 25)  # px, per difficulty
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.30, 0.50)
MIN_OVERLAP = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
NEIGHBOUR = {"Car": "Van", "Pedestrian": "Person_sitting"}
EVAL_CLASSES = tuple(MIN_OVERLAP)
N_SAMPLE_PTS = 41
MAP_CLASS = "Car"  # the paper's "mAP" is the mean of easy, moderate and hard Car AP
METRICS = ("AP_11", "AP_40")


class KittiEvalError(DdsPerceptionError, ValueError):
    """Evaluation input is unusable (bad score, unknown class, frames that do not match)."""


class KittiEvalWarning(UserWarning):
    """Evaluation input is incomplete but usable (missing or extra result files)."""


@dataclass(frozen=True)
class PrecisionCurve:
    """The devkit's 41-point precision curve of one class at one difficulty."""

    precision: np.ndarray  # (41,), monotone, zero past the last picked threshold
    thresholds: np.ndarray  # the picked score thresholds (at most 41)
    recall: np.ndarray  # recall at each picked threshold
    num_gt: int  # valid ground-truth boxes (the recall denominator)

    @property
    def ap_11(self) -> float:
        """Legacy 11-point AP in percent (sample points 0, 4, ..., 40)."""
        return float(self.precision[0::4].sum() / 11.0 * 100.0)

    @property
    def ap_40(self) -> float:
        """40-point AP in percent (sample points 1..40), the current KITTI metric."""
        return float(self.precision[1:].sum() / 40.0 * 100.0)

    def ap(self, metric: str = "AP_40") -> float:
        """AP in percent for ``metric`` ``"AP_11"`` or ``"AP_40"``."""
        if metric == "AP_11":
            return self.ap_11
        if metric == "AP_40":
            return self.ap_40
        raise KittiEvalError(f"unknown metric {metric!r}; use one of {METRICS}")


@dataclass
class KittiEvalResult:
    """AP per class and difficulty; ``to_json`` / ``markdown`` / ``save_plots`` for reporting."""

    curves: dict[str, dict[str, PrecisionCurve]]
    num_frames: int
    num_detections: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.curves)

    def ap(self, cls: str, difficulty: str, metric: str = "AP_40") -> float:
        """AP in percent of one class and difficulty."""
        return self.curves[_canonical_class(cls)][difficulty].ap(metric)

    def mean_ap(self, metric: str = "AP_40") -> float | None:
        """The paper's mAP: mean of easy, moderate and hard Car AP (None if Car not evaluated)."""
        if MAP_CLASS not in self.curves:
            return None
        return float(np.mean([self.ap(MAP_CLASS, d, metric) for d in DIFFICULTIES]))

    def to_json(self) -> dict:
        """``{"Car": {"easy": {"AP_11": x, "AP_40": y}, ...}, ..., "mAP_11": x, "mAP_40": y}``."""
        out: dict = {
            cls: {d: {m: by_diff[d].ap(m) for m in METRICS} for d in DIFFICULTIES}
            for cls, by_diff in self.curves.items()
        }
        out["mAP_11"] = self.mean_ap("AP_11")
        out["mAP_40"] = self.mean_ap("AP_40")
        return out

    def markdown(self) -> str:
        """A table per class and difficulty for both AP variants, then the paper's mAP."""
        lines = [
            "| class | metric | easy | moderate | hard |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for cls, by_diff in self.curves.items():
            for metric in METRICS:
                cells = " | ".join(f"{by_diff[d].ap(metric):.2f}" for d in DIFFICULTIES)
                lines.append(f"| {cls} | {metric} | {cells} |")
            counts = " | ".join(str(by_diff[d].num_gt) for d in DIFFICULTIES)
            lines.append(f"| {cls} | valid GT boxes | {counts} |")
        lines.append("")
        if self.mean_ap() is not None:
            lines.append(
                f"mAP (paper: mean of Car easy, moderate, hard): "
                f"AP_11 {self.mean_ap('AP_11'):.2f}, AP_40 {self.mean_ap('AP_40'):.2f}"
            )
        lines.append(f"{self.num_frames} frames, {self.num_detections} detections")
        return "\n".join(lines) + "\n"

    def save_plots(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write a precision/recall PNG per class (``car_detection.png``, the devkit's name)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        recall_points = np.linspace(0.0, 1.0, N_SAMPLE_PTS)
        written = []
        for cls, by_diff in self.curves.items():
            fig = Figure(figsize=(5.0, 3.6), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            for difficulty in DIFFICULTIES:
                curve = by_diff[difficulty]
                ax.plot(
                    recall_points,
                    curve.precision,
                    label=f"{difficulty} (AP_40 {curve.ap_40:.1f})",
                    linewidth=2,
                )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("Recall")
            ax.set_ylabel("Precision")
            ax.set_title(cls)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{cls.lower()}_detection.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            written.append(path)
        return written


# --------------------------------------------------------------------------------------------
# In-memory API


def evaluate(
    gt: Mapping[str, Sequence[KittiObject]],
    dt: Mapping[str, Sequence[KittiObject]],
    classes: Iterable[str] = ("Car",),
) -> KittiEvalResult:
    """KITTI 2D AP of detections ``dt`` against ground truth ``gt`` (both keyed by frame id).

    Every frame of ``gt`` is evaluated; a frame absent from ``dt`` has no detections. A frame in
    ``dt`` but not in ``gt`` is an error (the caller mixed up frame sets), as is a detection
    without a finite, non-negative score.
    """
    wanted = tuple(dict.fromkeys(_canonical_class(c) for c in classes))
    if not wanted:
        raise KittiEvalError("no classes to evaluate")
    extra = sorted(set(dt) - set(gt))
    if extra:
        raise KittiEvalError(
            f"detections for {len(extra)} frame(s) without ground truth: {_preview(extra)}"
        )
    frames = list(gt)
    table = _Table.build(frames, gt, dt)
    curves = {
        cls: {name: _evaluate_class(table, cls, level) for level, name in enumerate(DIFFICULTIES)}
        for cls in wanted
    }
    return KittiEvalResult(curves=curves, num_frames=len(frames), num_detections=table.n_dt)


def _canonical_class(name: str) -> str:
    for cls in EVAL_CLASSES:
        if cls.lower() == str(name).strip().lower():
            return cls
    raise KittiEvalError(f"cannot evaluate class {name!r}; the devkit evaluates {EVAL_CLASSES}")


def _preview(items: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(items[:limit])
    return head + (f" ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class _Table:
    """All frames' boxes as flat arrays, plus every same-frame (ground truth, detection) pair."""

    gt_box: np.ndarray  # (G, 4) float64
    gt_type: np.ndarray  # (G,) lower-case str
    gt_trunc: np.ndarray
    gt_occ: np.ndarray
    gt_frame: np.ndarray
    dt_box: np.ndarray  # (D, 4)
    dt_type: np.ndarray
    dt_score: np.ndarray
    dt_height: np.ndarray  # int, truncated as the devkit's int32_t
    pair_gt: np.ndarray  # (P,) ordered by ground truth, then detection
    pair_dt: np.ndarray
    pair_iou: np.ndarray
    dc_dt: np.ndarray  # detections of (detection, DontCare) pairs
    dc_cover: np.ndarray  # their intersection / detection area (the DontCare criterion)

    @property
    def n_dt(self) -> int:
        return len(self.dt_score)

    @classmethod
    def build(
        cls,
        frames: Sequence[str],
        gt: Mapping[str, Sequence[KittiObject]],
        dt: Mapping[str, Sequence[KittiObject]],
    ) -> _Table:
        gts = [list(gt[f]) for f in frames]
        dts = [list(dt.get(f, ())) for f in frames]
        for frame, objs in zip(frames, dts, strict=True):
            for index, obj in enumerate(objs):
                score = obj.score
                if score is None or not math.isfinite(score) or score < 0:
                    raise KittiEvalError(
                        f"frame {frame}: detection {index + 1} ({obj.type}) has score "
                        f"{score!r}; scores must be finite and >= 0"
                    )
        n_gt = np.array([len(o) for o in gts], dtype=np.int64)
        n_dt = np.array([len(o) for o in dts], dtype=np.int64)
        flat_gt = [o for objs in gts for o in objs]
        flat_dt = [o for objs in dts for o in objs]
        gt_box = np.array([o.bbox for o in flat_gt], dtype=np.float64).reshape(-1, 4)
        dt_box = np.array([o.bbox for o in flat_dt], dtype=np.float64).reshape(-1, 4)
        frame_idx = np.arange(len(frames))
        gt_frame = np.repeat(frame_idx, n_gt)

        # every same-frame pair, ordered by ground-truth index then detection index
        dt_start = np.concatenate([[0], np.cumsum(n_dt)[:-1]]).astype(np.int64)
        per_gt = n_dt[gt_frame]
        pair_gt = np.repeat(np.arange(len(flat_gt)), per_gt)
        run_start = np.repeat(np.cumsum(per_gt) - per_gt, per_gt)
        pair_dt = np.repeat(dt_start[gt_frame], per_gt) + (np.arange(len(pair_gt)) - run_start)
        iou, cover = _overlaps(dt_box[pair_dt], gt_box[pair_gt])
        gt_type = np.array([o.type.lower() for o in flat_gt], dtype=object)
        dc_pair = (gt_type == "dontcare")[pair_gt]
        return cls(
            gt_box=gt_box,
            gt_type=gt_type,
            gt_trunc=np.array([o.truncated for o in flat_gt], dtype=np.float64),
            gt_occ=np.array([o.occluded for o in flat_gt], dtype=np.int64),
            gt_frame=gt_frame,
            dt_box=dt_box,
            dt_type=np.array([o.type.lower() for o in flat_dt], dtype=object),
            dt_score=np.array([o.score for o in flat_dt], dtype=np.float64),
            # int32_t height = fabs(y1 - y2): truncation toward zero
            dt_height=np.trunc(np.abs(dt_box[:, 1] - dt_box[:, 3])).astype(np.int64),
            pair_gt=pair_gt,
            pair_dt=pair_dt,
            pair_iou=iou,
            dc_dt=pair_dt[dc_pair],
            dc_cover=cover[dc_pair],
        )


def _overlaps(det: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise IoU and intersection-over-detection-area, with the devkit's arithmetic order."""
    w = np.minimum(det[:, 2], other[:, 2]) - np.maximum(det[:, 0], other[:, 0])
    h = np.minimum(det[:, 3], other[:, 3]) - np.maximum(det[:, 1], other[:, 1])
    positive = (w > 0) & (h > 0)
    inter = w * h
    det_area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    other_area = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(positive, inter / (det_area + other_area - inter), 0.0)
        cover = np.where(positive, inter / det_area, 0.0)
    return iou, cover


def get_thresholds(scores: np.ndarray, num_gt: int) -> np.ndarray:
    """The devkit's ``getThresholds``: TP scores where recall reaches each of 41 sample points.

    Scores are visited best first; a score is skipped while the next one's recall lies closer to
    the current sample point. The arithmetic (a running sum of 1/40) matches the C++ exactly.
    """
    v = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    picked = []
    current_recall = 0.0
    last = len(v) - 1
    step = 1.0 / (N_SAMPLE_PTS - 1.0)
    for i, score in enumerate(v):
        l_recall = (i + 1) / num_gt
        r_recall = (i + 2) / num_gt if i < last else l_recall
        if (r_recall - current_recall) < (current_recall - l_recall) and i < last:
            continue
        picked.append(score)
        current_recall += step
    return np.array(picked, dtype=np.float64)


def _evaluate_class(table: _Table, cls: str, level: int) -> PrecisionCurve:
    """One class at one difficulty: the devkit's cleanData + computeStatistics + eval_class."""
    name = cls.lower()
    neighbour = NEIGHBOUR.get(cls, "").lower()
    min_overlap = MIN_OVERLAP[cls]

    # cleanData: ignored_gt 0 = valid, 1 = ignored (difficulty or neighbour class), -1 = skipped
    height = table.gt_box[:, 3] - table.gt_box[:, 1]
    too_hard = (
        (table.gt_occ > MAX_OCCLUSION[level])
        | (table.gt_trunc > MAX_TRUNCATION[level])
        | (height <= MIN_HEIGHT[level])
    )
    same = table.gt_type == name
    ig_gt = np.full(len(height), -1, dtype=np.int8)
    ig_gt[same & ~too_hard] = 0
    ig_gt[(same & too_hard) | ((table.gt_type == neighbour) if neighbour else False)] = 1
    num_gt = int((ig_gt == 0).sum())
    # ignored_det: 1 = lower than the minimum height (any class), 0 = the class, -1 = other
    ig_dt = np.where(table.dt_type == name, 0, -1).astype(np.int8)
    ig_dt[table.dt_height < MIN_HEIGHT[level]] = 1

    # detections inside a DontCare region (only consulted for unassigned class detections)
    in_dontcare = np.zeros(table.n_dt, dtype=bool)
    in_dontcare[table.dc_dt[table.dc_cover > min_overlap]] = True

    # candidate (gt, det) pairs: both taking part and overlapping more than the threshold
    keep = (
        (table.pair_iou > min_overlap)
        & (ig_gt[table.pair_gt] != -1)
        & (ig_dt[table.pair_dt] != -1)
    )
    cand = _Candidates.build(table, table.pair_gt[keep], table.pair_dt[keep], table.pair_iou[keep])

    # pass 1: TP scores for the thresholds (highest-scoring free candidate per gt)
    tp_scores = _match_for_thresholds(cand, ig_gt, ig_dt, table.dt_score)
    thresholds = get_thresholds(tp_scores, num_gt)[:N_SAMPLE_PTS] if num_gt else np.zeros(0)

    # pass 2: TP / FP / FN at every picked threshold (largest-overlap free candidate per gt)
    tp, fn, assigned = _match_at_thresholds(cand, ig_gt, ig_dt, table.dt_score, thresholds)
    counted = (ig_dt == 0) & ~in_dontcare
    above = table.dt_score[None, counted] >= thresholds[:, None]
    fp = (above & ~assigned[:, counted]).sum(axis=1)
    # valid gt without any candidate is a false negative at every threshold
    fn = fn + int(((ig_gt == 0) & ~cand.has_candidate).sum())

    precision = np.zeros(N_SAMPLE_PTS, dtype=np.float64)
    recall = np.zeros(len(thresholds), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if len(thresholds):
            # tp + fp is 0 only if a threshold's own detection went to ignored ground truth in
            # the second pass; the C++ divides 0 by 0 there, we take precision 0
            denom = tp + fp
            precision[: len(thresholds)] = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
            recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    precision = np.maximum.accumulate(precision[::-1])[::-1].copy()
    return PrecisionCurve(precision=precision, thresholds=thresholds, recall=recall, num_gt=num_gt)


@dataclass
class _Candidates:
    """Candidate detections per ground-truth box, padded, grouped into per-frame rank steps."""

    gt: np.ndarray  # (C,) ground-truth index of each row
    det: np.ndarray  # (C, K) detection indices in file order, 0-padded
    iou: np.ndarray  # (C, K)
    valid: np.ndarray  # (C, K) bool
    steps: list[np.ndarray]  # rows of the r-th candidate gt of each frame, r = 0, 1, ...
    has_candidate: np.ndarray  # (G,) bool

    @classmethod
    def build(
        cls, table: _Table, pair_gt: np.ndarray, pair_dt: np.ndarray, pair_iou: np.ndarray
    ) -> _Candidates:
        n_gt_total = len(table.gt_type)
        rows_gt, first, counts = np.unique(pair_gt, return_index=True, return_counts=True)
        k_max = int(counts.max()) if len(counts) else 1
        n_rows = len(rows_gt)
        row_of_pair = np.repeat(np.arange(n_rows), counts)
        col_of_pair = np.arange(len(pair_gt)) - np.repeat(first, counts)
        det = np.zeros((n_rows, k_max), dtype=np.int64)
        iou = np.zeros((n_rows, k_max), dtype=np.float64)
        valid = np.zeros((n_rows, k_max), dtype=bool)
        det[row_of_pair, col_of_pair] = pair_dt
        iou[row_of_pair, col_of_pair] = pair_iou
        valid[row_of_pair, col_of_pair] = True
        # rank of each row among the candidate gts of its frame (rows are in gt order)
        frame = table.gt_frame[rows_gt]
        frame_first = np.searchsorted(frame, frame, side="left")
        rank = np.arange(n_rows) - frame_first
        order = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[order], np.arange(int(rank.max()) + 2 if n_rows else 0))
        steps = [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]
        has_candidate = np.zeros(n_gt_total, dtype=bool)
        has_candidate[rows_gt] = True
        return cls(rows_gt, det, iou, valid, steps, has_candidate)


def _match_for_thresholds(
    cand: _Candidates, ig_gt: np.ndarray, ig_dt: np.ndarray, score: np.ndarray
) -> np.ndarray:
    """computeStatistics(compute_fp=false): the scores of true positives."""
    assigned = np.zeros(len(score), dtype=bool)
    tp_scores = []
    for rows in cand.steps:
        det = cand.det[rows]
        free = cand.valid[rows] & ~assigned[det]
        masked = np.where(free, score[det], -np.inf)
        k = masked.argmax(axis=1)  # first of equal maxima, as the strict '>' in the C++
        found = free.any(axis=1)
        chosen = det[np.arange(len(rows)), k][found]
        assigned[chosen] = True
        is_tp = (ig_gt[cand.gt[rows][found]] == 0) & (ig_dt[chosen] == 0)
        tp_scores.append(score[chosen[is_tp]])
    return np.concatenate(tp_scores) if tp_scores else np.zeros(0)


def _match_at_thresholds(
    cand: _Candidates,
    ig_gt: np.ndarray,
    ig_dt: np.ndarray,
    score: np.ndarray,
    thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """computeStatistics(compute_fp=true) at every threshold at once.

    Returns TP and FN counts of candidate gts per threshold and the (T, D) assigned mask.
    """
    n_t = len(thresholds)
    assigned = np.zeros((n_t, len(score)), dtype=bool)
    tp = np.zeros(n_t, dtype=np.int64)
    fn = np.zeros(n_t, dtype=np.int64)
    if n_t == 0:
        return tp, fn, assigned
    t_index = np.arange(n_t)
    for rows in cand.steps:
        det = cand.det[rows]  # (n, K)
        n = len(rows)
        free = (
            cand.valid[rows][:, None, :]
            & (score[det][:, None, :] >= thresholds[None, :, None])
            & ~assigned[:, det].transpose(1, 0, 2)
        )  # (n, T, K)
        kind = ig_dt[det][:, None, :]
        own = free & (kind == 0)
        low = free & (kind == 1)
        k_own = np.where(own, cand.iou[rows][:, None, :], -np.inf).argmax(axis=2)
        k_low = low.argmax(axis=2)  # first ignored (too low) candidate
        has_own = own.any(axis=2)
        found = has_own | low.any(axis=2)  # (n, T)
        k = np.where(has_own, k_own, k_low)
        chosen = np.take_along_axis(det, k.reshape(n, -1), axis=1)  # (n, T)
        r_i, t_i = np.nonzero(found)
        assigned[t_index[t_i], chosen[r_i, t_i]] = True
        valid_gt = (ig_gt[cand.gt[rows]] == 0)[:, None]
        tp += (found & has_own & valid_gt).sum(axis=0)
        fn += (~found & valid_gt).sum(axis=0)
    return tp, fn, assigned


# --------------------------------------------------------------------------------------------
# Folders of label / result files


def read_result_file(path: str | os.PathLike[str]) -> list[KittiObject]:
    """Read a result file: 16 fields per line, finite non-negative score last."""
    file = Path(path)
    objects = []
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            obj = parse_line(line, source=str(file), lineno=lineno)
            if obj.score is None:
                raise KittiFormatError(
                    f"{file}:{lineno}: a result line needs 16 fields (score last), got 15"
                )
            if not math.isfinite(obj.score) or obj.score < 0:
                raise KittiFormatError(
                    f"{file}:{lineno}: score must be finite and >= 0, got {obj.score!r}"
                )
            objects.append(obj)
    return objects


def _resolve_label_dir(path: Path) -> Path:
    """Accept ``label_2`` itself, a ``training`` folder or the dataset root."""
    for candidate in (path, path / "label_2", path / "training" / "label_2"):
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such label folder")
    raise FileNotFoundError(f"{path}: no label files (*.txt) here or in label_2/")


def _resolve_result_dir(path: Path) -> Path:
    """Accept the result folder itself or the devkit's layout with a ``data/`` sub-folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such result folder")
    if not any(path.glob("*.txt")) and (path / "data").is_dir():
        return path / "data"
    return path


def evaluate_folders(
    label_dir: str | os.PathLike[str],
    result_dir: str | os.PathLike[str],
    split: str | os.PathLike[str] | Sequence[str] | None = None,
    classes: Iterable[str] = ("Car",),
) -> KittiEvalResult:
    """Evaluate KITTI result files (``NNNNNN.txt``) against ``label_2`` files.

    ``split`` is a split file or a list of frame ids (default: every label file). A frame of the
    split without a result file has no detections (one warning gives the count); result files
    for frames outside the split are reported by a warning and not evaluated.
    """
    labels = _resolve_label_dir(Path(label_dir))
    results = _resolve_result_dir(Path(result_dir))
    if split is None:
        frames = sorted(p.stem for p in labels.glob("*.txt"))
    elif isinstance(split, (str, os.PathLike)):
        frames = read_split(split)
    else:
        frames = [str(f) for f in split]
    missing_labels = [f for f in frames if not (labels / f"{f}.txt").is_file()]
    if missing_labels:
        raise FileNotFoundError(
            f"{labels}: no label file for {len(missing_labels)} frame(s) of the split: "
            f"{_preview(missing_labels)}"
        )
    present = {p.stem for p in results.glob("*.txt")}
    wanted = set(frames)
    notes = []
    missing = [f for f in frames if f not in present]
    if missing:
        notes.append(
            f"{len(missing)} of {len(frames)} frame(s) have no result file in {results} and count "
            f"as frames without detections: {_preview(missing)}"
        )
    extra = sorted(present - wanted)
    if extra:
        notes.append(
            f"{len(extra)} result file(s) in {results} are for frames outside the evaluated set "
            f"and are ignored: {_preview(extra)}"
        )
    for note in notes:
        warnings.warn(note, KittiEvalWarning, stacklevel=2)
    gt = {f: read_label_file(labels / f"{f}.txt") for f in frames}
    dt = {f: read_result_file(results / f"{f}.txt") for f in frames if f in present}
    result = evaluate(gt, dt, classes)
    result.notes.extend(notes)
    return result


def write_json_result(path: str | os.PathLike[str], result: KittiEvalResult) -> None:
    """Write ``result.to_json()`` atomically."""
    write_json(path, result.to_json())
