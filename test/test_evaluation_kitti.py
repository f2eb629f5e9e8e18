"""KITTI 2D evaluation: hand-computed devkit cases, a literal reference, the CLI, real labels."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dds_perception.data.kitti import KittiFormatError, KittiObject, read_label_file
from dds_perception.evaluation import (
    DIFFICULTIES,
    KittiEvalError,
    KittiEvalWarning,
    evaluate,
    evaluate_folders,
)
from dds_perception.evaluation.kitti import get_thresholds
from dds_perception.evaluation.synthetic import generate, write_set

# ------------------------------------------------------------------------------------------
# helpers


def car(box, truncated=0.0, occluded=0, kind="Car") -> KittiObject:
    return KittiObject(kind, truncated, occluded, 0.0, tuple(float(v) for v in box))


def det(box, score, kind="Car") -> KittiObject:
    return KittiObject(kind, -1.0, -1, -10.0, tuple(float(v) for v in box), score=score)


def easy_box(i: int) -> tuple[float, float, float, float]:
    """A 60-px-high box, distinct per index, valid at every difficulty."""
    x = 10.0 + 150.0 * (i % 8)
    return (x, 100.0, x + 100.0, 160.0)


def perfect_set(n: int, frames_of: int = 4):
    """``n`` easy cars spread over frames, each detected exactly, scores 1.0 > ... distinct."""
    gt: dict[str, list[KittiObject]] = {}
    dt: dict[str, list[KittiObject]] = {}
    for i in range(n):
        frame = f"{i // frames_of:06d}"
        gt.setdefault(frame, []).append(car(easy_box(i)))
        dt.setdefault(frame, []).append(det(easy_box(i), 0.9 - 0.001 * i))
    return gt, dt


def aps(result, cls="Car"):
    return {d: (result.ap(cls, d, "AP_11"), result.ap(cls, d, "AP_40")) for d in DIFFICULTIES}


def assert_all(result, ap_11, ap_40, cls="Car", difficulties=DIFFICULTIES):
    for d in difficulties:
        assert result.ap(cls, d, "AP_11") == pytest.approx(ap_11, abs=1e-9), d
        assert result.ap(cls, d, "AP_40") == pytest.approx(ap_40, abs=1e-9), d


# ------------------------------------------------------------------------------------------
# a literal, loop-by-loop reading of evaluate_object.cpp, written independently of the
# vectorised implementation, used as the oracle for random scenes


MIN_H, MAX_OCC, MAX_TR = (40, 25, 25), (0, 1, 2), (0.15, 0.3, 0.5)
OVERLAP = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}


def ref_overlap(a, b, criterion=-1):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    a_area = (a[2] - a[0]) * (a[3] - a[1])
    b_area = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (a_area + b_area - inter) if criterion == -1 else inter / a_area


def ref_clean(cls, gts, dets, level):
    ig_gt, dc, ig_det, n = [], [], [], 0
    for g in gts:
        t = g.type.lower()
        if t == cls:
            valid = 1
        elif (cls, t) in (("pedestrian", "person_sitting"), ("car", "van")):
            valid = 0
        else:
            valid = -1
        ignore = (
            g.occluded > MAX_OCC[level]
            or g.truncated > MAX_TR[level]
            or (g.bbox[3] - g.bbox[1]) <= MIN_H[level]
        )
        if valid == 1 and not ignore:
            ig_gt.append(0)
            n += 1
        elif valid == 0 or (ignore and valid == 1):
            ig_gt.append(1)
        else:
            ig_gt.append(-1)
    dc = [g for g in gts if g.type.lower() == "dontcare"]
    for d in dets:
        valid = 1 if d.type.lower() == cls else -1
        height = int(abs(d.bbox[1] - d.bbox[3]))
        ig_det.append(1 if height < MIN_H[level] else (0 if valid == 1 else -1))
    return ig_gt, dc, ig_det, n


def ref_stats(cls, gts, dets, dc, ig_gt, ig_det, compute_fp, thresh=0.0):
    no_det = -10000000.0
    min_ov = OVERLAP[cls]
    assigned = [False] * len(dets)
    below = [compute_fp and d.score < thresh for d in dets]
    tp = fp = fn = 0
    v = []
    for i, g in enumerate(gts):
        if ig_gt[i] == -1:
            continue
        idx, valid, max_ov, took_ignored = -1, no_det, 0.0, False
        for j, d in enumerate(dets):
            if ig_det[j] == -1 or assigned[j] or below[j]:
                continue
            ov = ref_overlap(d.bbox, g.bbox)
            if not compute_fp and ov > min_ov and d.score > valid:
                idx, valid = j, d.score
            elif compute_fp and ov > min_ov and (ov > max_ov or took_ignored) and ig_det[j] == 0:
                max_ov, idx, valid, took_ignored = ov, j, 1, False
            elif compute_fp and ov > min_ov and valid == no_det and ig_det[j] == 1:
                idx, valid, took_ignored = j, 1, True
        if valid == no_det and ig_gt[i] == 0:
            fn += 1
        elif valid != no_det and (ig_gt[i] == 1 or ig_det[idx] == 1):
            assigned[idx] = True
        elif valid != no_det:
            tp += 1
            v.append(dets[idx].score)
            assigned[idx] = True
    if compute_fp:
        fp = sum(
            1
            for j in range(len(dets))
            if not (assigned[j] or ig_det[j] == -1 or ig_det[j] == 1 or below[j])
        )
        stuff = 0
        for area in dc:
            for j, d in enumerate(dets):
                if assigned[j] or ig_det[j] in (-1, 1) or below[j]:
                    continue
                if ref_overlap(d.bbox, area.bbox, 0) > min_ov:
                    assigned[j] = True
                    stuff += 1
        fp -= stuff
    return tp, fp, fn, v


def ref_thresholds(v, n_gt):
    v = sorted(v, reverse=True)
    out, current = [], 0.0
    for i in range(len(v)):
        left = (i + 1) / n_gt
        right = (i + 2) / n_gt if i < len(v) - 1 else left
        if (right - current) < (current - left) and i < len(v) - 1:
            continue
        out.append(v[i])
        current += 1.0 / 40.0
    return out


def ref_precision(gt, dt, cls, level):
    frames = list(gt)
    cls = cls.lower()
    cleaned, v, n_gt = [], [], 0
    for f in frames:
        gts, dets = gt[f], dt.get(f, [])
        ig_gt, dc, ig_det, n = ref_clean(cls, gts, dets, level)
        n_gt += n
        cleaned.append((gts, dets, dc, ig_gt, ig_det))
        v += ref_stats(cls, gts, dets, dc, ig_gt, ig_det, False)[3]
    thresholds = ref_thresholds(v, n_gt) if n_gt else []
    precision = [0.0] * 41
    for t, thr in enumerate(thresholds):
        tp = fp = 0
        for gts, dets, dc, ig_gt, ig_det in cleaned:
            a, b, _, _ = ref_stats(cls, gts, dets, dc, ig_gt, ig_det, True, thr)
            tp, fp = tp + a, fp + b
        precision[t] = tp / (tp + fp)
    for t in range(len(thresholds)):
        precision[t] = max(precision[t:])
    return np.array(precision)


def random_scene(rng, n_frames=12):
    """Crowded frames: overlapping cars, vans, pedestrians, DontCare, duplicates, tied scores."""
    kinds = ["Car", "Car", "Car", "Van", "Pedestrian", "Person_sitting", "Cyclist", "DontCare"]
    gt, dt = {}, {}
    for f in range(n_frames):
        gts, dets = [], []
        for _ in range(rng.integers(0, 9)):
            h = float(rng.choice([20, 24, 25, 26, 39, 40, 41, 60, 90]) + rng.integers(0, 3))
            w = h * rng.uniform(0.5, 2.0)
            x, y = rng.uniform(0, 200), rng.uniform(0, 60)
            kind = str(rng.choice(kinds))
            box = (round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2))
            gts.append(
                KittiObject(
                    kind,
                    float(rng.choice([0.0, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6])),
                    int(rng.integers(0, 4)),
                    0.0,
                    box,
                )
            )
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.06, 4) * np.array([w, h, w, h])
                b = np.array(box) + jitter
                dkind = "Car" if kind in ("Car", "Van", "DontCare") else kind
                if rng.random() < 0.15:
                    dkind = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
                score = float(rng.choice([0.3, 0.5, 0.7, 0.9, rng.uniform(0, 1)]))
                dets.append(det(tuple(np.round(b, 2)), round(score, 3), dkind))
        for _ in range(rng.integers(0, 4)):
            x, y, h = rng.uniform(0, 200), rng.uniform(0, 60), rng.uniform(15, 80)
            box = (x, y, x + h * rng.uniform(0.5, 2), y + h)
            kind = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
            dets.append(det(tuple(round(c, 2) for c in box), round(float(rng.random()), 3), kind))
        order = rng.permutation(len(dets))
        gt[f"{f:06d}"] = gts
        dt[f"{f:06d}"] = [dets[i] for i in order]
    return gt, dt


# ------------------------------------------------------------------------------------------
# hand-computed cases


def test_evaluation_perfect_detections_41_valid_boxes_give_100():
    # 41 valid boxes: getThresholds picks all 41 TP scores, precision is 1 at all 41 points
    gt, dt = perfect_set(41)
    result = evaluate(gt, dt)
    assert_all(result, 100.0, 100.0)
    assert result.mean_ap("AP_11") == pytest.approx(100.0)
    assert result.curves["Car"]["easy"].num_gt == 41


@pytest.mark.parametrize(
    ("n", "ap_11", "ap_40"),
    [
        # n thresholds -> precision 1 at points 0..n-1, 0 after.
        # AP_11 counts the points 0, 4, ..., 40 below n; AP_40 counts the points 1..n-1
        (40, 100 * 10 / 11, 100 * 39 / 40),
        (10, 100 * 3 / 11, 100 * 9 / 40),
        (4, 100 * 1 / 11, 100 * 3 / 40),
        (1, 100 * 1 / 11, 0.0),
    ],
)
def test_evaluation_perfect_detections_fewer_boxes_score_below_100(n, ap_11, ap_40):
    gt, dt = perfect_set(n)
    assert_all(evaluate(gt, dt), ap_11, ap_40)


def test_evaluation_no_detections_give_zero():
    gt, _ = perfect_set(50)
    result = evaluate(gt, {})
    assert_all(result, 0.0, 0.0)
    assert result.to_json()["mAP_40"] == 0.0


def test_evaluation_single_false_positive_at_top_score():
    # at the i-th TP threshold (i = 0..40) there are i+1 TP and the FP: (i+1)/(i+2), increasing,
    # so the max-from-the-right makes every point 41/42
    gt, dt = perfect_set(41)
    dt["000000"].append(det((900.0, 200.0, 1000.0, 260.0), 0.99))
    assert_all(evaluate(gt, dt), 100 * 41 / 42, 100 * 41 / 42)


def test_evaluation_pr_curve_with_a_dip_worked_out_by_hand():
    # 41 valid cars; scores: 20 TP, then 10 FP, then 21 TP. All 41 TP scores are thresholds.
    # precision at threshold i: 1 for i < 20, (i+1)/(i+11) for i >= 20 (increasing -> 41/51
    # after the monotone step). AP_11: points 0..16 (5) are 1, points 20..40 (6) are 41/51.
    # AP_40: points 1..19 (19) are 1, points 20..40 (21) are 41/51.
    gt, _ = perfect_set(41)
    dt: dict[str, list[KittiObject]] = {}
    scores = iter(np.linspace(0.99, 0.2, 51))
    boxes = [b for frame in sorted(gt) for b in gt[frame]]
    frames = [frame for frame in sorted(gt) for _ in gt[frame]]
    for i in range(20):
        dt.setdefault(frames[i], []).append(det(boxes[i].bbox, float(next(scores))))
    for _ in range(10):
        dt.setdefault("000000", []).append(det((900.0, 300.0, 980.0, 350.0), float(next(scores))))
    for i in range(20, 41):
        dt.setdefault(frames[i], []).append(det(boxes[i].bbox, float(next(scores))))
    result = evaluate(gt, dt)
    p = 41 / 51
    assert_all(result, 100 * (5 + 6 * p) / 11, 100 * (19 + 21 * p) / 40)
    curve = result.curves["Car"]["moderate"]
    np.testing.assert_allclose(curve.precision[:20], 1.0)
    np.testing.assert_allclose(curve.precision[20:], p)


def test_evaluation_detection_on_van_is_ignored():
    gt, dt = perfect_set(41)
    van = (900.0, 200.0, 1000.0, 260.0)
    gt["000000"].append(car(van, kind="Van"))
    dt["000000"].append(det(van, 0.99))
    assert_all(evaluate(gt, dt), 100.0, 100.0)
    # the same box labelled Truck is skipped, so the detection is a false positive
    gt["000000"][-1] = car(van, kind="Truck")
    assert_all(evaluate(gt, dt), 100 * 41 / 42, 100 * 41 / 42)


def test_evaluation_person_sitting_is_neighbour_of_pedestrian():
    gt = {"0": [car((0, 0, 30, 80), kind="Person_sitting")]}
    dt = {"0": [det((0, 0, 30, 80), 0.9, "Pedestrian")]}
    result = evaluate(gt, dt, classes=["pedestrian"])
    assert result.curves["Pedestrian"]["hard"].num_gt == 0  # ignored, neither TP nor FP
    assert_all(result, 0.0, 0.0, cls="Pedestrian")


def test_evaluation_detection_mostly_inside_dontcare_is_not_a_false_positive():
    gt, dt = perfect_set(41)
    gt["000000"].append(car((900.0, 200.0, 1000.0, 300.0), -1.0, -1, kind="DontCare"))
    # 80 % of the detection's area lies inside the DontCare box -> not a false positive
    dt["000000"].append(det((920.0, 220.0, 1020.0, 270.0), 0.99))
    assert_all(evaluate(gt, dt), 100.0, 100.0)


def test_evaluation_dontcare_uses_the_class_overlap_threshold():
    # 60 % inside: above 0.5 (Pedestrian) but not above 0.7 (Car), as in the devkit
    dontcare = car((900.0, 200.0, 1000.0, 300.0), -1.0, -1, kind="DontCare")
    inside = (940.0, 220.0, 1040.0, 270.0)
    gt, dt = perfect_set(41)
    gt["000000"].append(dontcare)
    dt["000000"].append(det(inside, 0.99))
    assert_all(evaluate(gt, dt), 100 * 41 / 42, 100 * 41 / 42)
    peds = {
        k: [o if o.type == "DontCare" else replace(o, type="Pedestrian") for o in v]
        for k, v in gt.items()
    }
    pdets = {k: [det(o.bbox, o.score, "Pedestrian") for o in v] for k, v in dt.items()}
    assert_all(evaluate(peds, pdets, ["Pedestrian"]), 100.0, 100.0, cls="Pedestrian")


def test_evaluation_24px_high_boxes_are_ignored_at_every_difficulty():
    gt, dt = perfect_set(41)
    small = (900.0, 200.0, 960.0, 224.0)  # 24 px high
    gt["000000"].append(car(small))  # unmatched, but not a false negative
    dt["000001"].append(det((900.0, 200.0, 940.0, 224.0), 0.99))  # not a false positive
    result = evaluate(gt, dt)
    assert_all(result, 100.0, 100.0)
    assert [result.curves["Car"][d].num_gt for d in DIFFICULTIES] == [41, 41, 41]


def test_evaluation_detection_height_limit_depends_on_difficulty():
    gt, dt = perfect_set(41)
    dt["000000"].append(det((900.0, 200.0, 960.0, 239.9), 0.99))  # 39.9 px: easy ignores it
    result = evaluate(gt, dt)
    assert_all(result, 100.0, 100.0, difficulties=["easy"])
    assert_all(result, 100 * 41 / 42, 100 * 41 / 42, difficulties=["moderate", "hard"])


def test_evaluation_low_detection_of_another_class_absorbs_ground_truth_like_the_devkit():
    # the devkit marks every detection lower than the minimum height as "ignored" before it
    # checks the class, and picks thresholds from the highest-scoring candidate: at easy the
    # 39-px Pedestrian box (score 0.9, IoU 39/45 with the car) takes the car, so no TP score
    # is recorded and the AP is 0; at moderate the Pedestrian box is skipped and the Car matches
    gt = {"0": [car((100.0, 100.0, 200.0, 145.0))]}
    dt = {
        "0": [
            det((100.0, 100.0, 200.0, 145.0), 0.5),
            det((100.0, 103.0, 200.0, 142.0), 0.9, "Pedestrian"),
        ]
    }
    result = evaluate(gt, dt)
    assert_all(result, 0.0, 0.0, difficulties=["easy"])
    assert_all(result, 100 / 11, 0.0, difficulties=["moderate", "hard"])


def test_evaluation_iou_of_exactly_0_7_does_not_match():
    from dds_perception.evaluation.kitti import _overlaps

    gt_box, exact, above = (100, 100, 200, 200), (100, 100, 200, 170), (100, 100, 200, 170.5)
    iou, _ = _overlaps(np.array([exact], float), np.array([gt_box], float))
    assert iou[0] == 0.7
    gt = {"0": [car(gt_box)]}
    assert_all(evaluate(gt, {"0": [det(exact, 0.9)]}), 0.0, 0.0)
    # one valid box, matched: one threshold with precision 1 -> point 0 only
    assert_all(evaluate(gt, {"0": [det(above, 0.9)]}), 100 / 11, 0.0)


@pytest.mark.parametrize(
    ("truncated", "occluded", "height", "valid"),
    [
        (0.15, 0, 60, (1, 1, 1)),
        (0.16, 0, 60, (0, 1, 1)),
        (0.30, 0, 60, (0, 1, 1)),
        (0.31, 0, 60, (0, 0, 1)),
        (0.50, 0, 60, (0, 0, 1)),
        (0.51, 0, 60, (0, 0, 0)),
        (0.0, 1, 60, (0, 1, 1)),
        (0.0, 2, 60, (0, 0, 1)),
        (0.0, 3, 60, (0, 0, 0)),
        # the devkit ignores ground truth whose height is <= the minimum
        (0.0, 0, 40.0, (0, 1, 1)),
        (0.0, 0, 40.01, (1, 1, 1)),
        (0.0, 0, 25.0, (0, 0, 0)),
        (0.0, 0, 25.01, (0, 1, 1)),
    ],
)
def test_evaluation_difficulty_boundaries(truncated, occluded, height, valid):
    gt = {"0": [car((10.0, 100.0, 110.0, 100.0 + height), truncated, occluded)]}
    result = evaluate(gt, {})
    assert tuple(result.curves["Car"][d].num_gt for d in DIFFICULTIES) == valid


def test_evaluation_get_thresholds_skips_scores_between_recall_points():
    # 80 valid boxes, 80 TP: recall steps of 1/80, sample points every 1/40 -> every other score
    scores = np.linspace(1.0, 0.2, 80)
    picked = get_thresholds(scores, 80)
    assert len(picked) == 41
    assert picked[0] == scores[0] and picked[-1] == scores[-1]
    # 10 TP of 200 valid boxes (recall 0.005 each): the scores nearest to recall 0.025 and 0.05
    # are kept, plus the last one, always kept
    ten = np.linspace(0.9, 0.45, 10)
    assert get_thresholds(ten, 200).tolist() == ten[[0, 4, 9]].tolist()
    # 3 TP of 100: the second score sits half-way (recall 0.02 and 0.03 around 0.025); in double
    # arithmetic 0.03 - 0.025 < 0.025 - 0.02, so the devkit skips it, and so do we
    assert get_thresholds(np.array([0.9, 0.8, 0.7]), 100).tolist() == [0.9, 0.7]


# ------------------------------------------------------------------------------------------
# against the literal reference


@pytest.mark.parametrize("seed", range(6))
def test_evaluation_matches_literal_devkit_reading_on_crowded_scenes(seed):
    rng = np.random.default_rng(seed)
    gt, dt = random_scene(rng)
    result = evaluate(gt, dt, classes=("Car", "Pedestrian", "Cyclist"))
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for level, d in enumerate(DIFFICULTIES):
            expected = ref_precision(gt, dt, cls, level)
            np.testing.assert_allclose(
                result.curves[cls][d].precision, expected, rtol=0, atol=1e-12, err_msg=f"{cls} {d}"
            )


def test_evaluation_matches_literal_devkit_reading_on_generated_set():
    gt, dt = generate(n_frames=60, seed=3)
    result = evaluate(gt, dt, classes=("Car", "Pedestrian"))
    for cls in ("Car", "Pedestrian"):
        for level, d in enumerate(DIFFICULTIES):
            np.testing.assert_allclose(
                result.curves[cls][d].precision, ref_precision(gt, dt, cls, level), atol=1e-12
            )


# ------------------------------------------------------------------------------------------
# real labels


def _real_labels(root: Path) -> dict[str, list[KittiObject]]:
    label_dir = root / "training" / "label_2"
    return {p.stem: read_label_file(p) for p in sorted(label_dir.glob("*.txt"))}


def _expected_perfect(n: int) -> tuple[float, float]:
    """AP of perfect detections on n valid boxes (all scores equal): devkit sampling."""
    if n == 0:
        return 0.0, 0.0
    if n >= 41:
        return 100.0, 100.0
    return 100 * len(range(0, n, 4)) / 11, 100 * (n - 1) / 40


def test_evaluation_real_labels_ground_truth_as_detections(kitti_sample):
    gt = _real_labels(kitti_sample)
    # every label line (DontCare, Van, ... included) becomes a detection with score 1
    dt = {f: [det(o.bbox, 1.0, o.type) for o in objs] for f, objs in gt.items()}
    classes = ("Car", "Pedestrian", "Cyclist")
    result = evaluate(gt, dt, classes)
    for cls in classes:
        for level, d in enumerate(DIFFICULTIES):
            # valid boxes counted straight from the rules in docs/evaluation.md
            n = sum(
                1
                for objs in gt.values()
                for o in objs
                if o.type == cls
                and o.occluded <= (0, 1, 2)[level]
                and o.truncated <= (0.15, 0.3, 0.5)[level]
                and o.height > (40, 25, 25)[level]
            )
            assert result.curves[cls][d].num_gt == n
            ap_11, ap_40 = _expected_perfect(n)
            assert result.ap(cls, d, "AP_11") == pytest.approx(ap_11), (cls, d, n)
            assert result.ap(cls, d, "AP_40") == pytest.approx(ap_40), (cls, d, n)
    counts = {d: result.curves["Car"][d].num_gt for d in DIFFICULTIES}
    assert counts["easy"] <= counts["moderate"] <= counts["hard"] < 175


def test_evaluation_real_labels_noisy_detections_match_reference(kitti_sample):
    gt = _real_labels(kitti_sample)
    rng = np.random.default_rng(7)
    dt = {}
    for f, objs in gt.items():
        dets = []
        for o in objs:
            if o.type in ("DontCare", "Misc") or rng.random() < 0.1:
                continue
            w, h = o.bbox[2] - o.bbox[0], o.height
            box = np.array(o.bbox) + rng.normal(0, 0.07, 4) * np.array([w, h, w, h])
            kind = "Car" if o.type in ("Van", "Truck") else o.type
            dets.append(det(tuple(np.round(box, 2)), round(float(rng.random()), 4), kind))
        dt[f] = dets
    result = evaluate(gt, dt, ("Car", "Pedestrian"))
    for cls in ("Car", "Pedestrian"):
        for level, d in enumerate(DIFFICULTIES):
            np.testing.assert_allclose(
                result.curves[cls][d].precision, ref_precision(gt, dt, cls, level), atol=1e-12
            )
    assert 0 < result.ap("Car", "moderate") < 100


# ------------------------------------------------------------------------------------------
# API contract and bad input


def test_evaluation_json_shape():
    gt, dt = perfect_set(10)
    data = evaluate(gt, dt, ["Car", "Pedestrian"]).to_json()
    assert list(data) == ["Car", "Pedestrian", "mAP_11", "mAP_40"]
    assert list(data["Car"]) == ["easy", "moderate", "hard"]
    assert list(data["Car"]["easy"]) == ["AP_11", "AP_40"]
    assert data["mAP_40"] == pytest.approx(22.5)
    json.dumps(data)  # plain JSON types


def test_evaluation_markdown_lists_every_class_and_difficulty():
    gt, dt = perfect_set(10)
    text = evaluate(gt, dt, ["Car", "Cyclist"]).markdown()
    assert "| Car | AP_11 | 27.27 | 27.27 | 27.27 |" in text
    assert "| Car | AP_40 | 22.50 | 22.50 | 22.50 |" in text
    assert "| Cyclist | AP_40 | 0.00 | 0.00 | 0.00 |" in text
    assert "mAP" in text


@pytest.mark.parametrize("score", [float("nan"), -0.1, float("inf"), None])
def test_evaluation_rejects_bad_scores_in_memory(score):
    gt, dt = perfect_set(2)
    dt["000000"][0] = KittiObject("Car", -1, -1, -10, (0, 0, 10, 50), score=score)
    with pytest.raises(KittiEvalError, match="000000"):
        evaluate(gt, dt)


def test_evaluation_rejects_unknown_class_and_foreign_frames():
    gt, dt = perfect_set(2)
    with pytest.raises(KittiEvalError, match="Truck"):
        evaluate(gt, dt, ["Truck"])
    with pytest.raises(KittiEvalError, match="999999"):
        evaluate(gt, {**dt, "999999": []})


# ------------------------------------------------------------------------------------------
# folders and the command line


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti_eval")
    gt, dt = generate(n_frames=40, seed=11)
    write_set(root, gt, dt)
    return root, gt, dt


def test_evaluation_folders_equal_in_memory(generated):
    root, gt, dt = generated
    from_files = evaluate_folders(root / "label_2", root / "results", classes=["Car", "Cyclist"])
    in_memory = evaluate(gt, dt, ["Car", "Cyclist"])
    assert from_files.to_json() == in_memory.to_json()


def test_evaluation_folders_missing_and_extra_result_files(generated, tmp_path):
    root, gt, dt = generated
    results = tmp_path / "results"
    results.mkdir()
    frames = sorted(gt)
    for f in frames[3:]:
        (results / f"{f}.txt").write_text((root / "results" / f"{f}.txt").read_text())
    (results / "777777.txt").write_text("")
    split = tmp_path / "split.txt"
    split.write_text("\n".join(frames) + "\n")
    with pytest.warns(KittiEvalWarning) as record:
        result = evaluate_folders(root / "label_2", results, split=split)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith("3 of 40 frame(s) have no result file")
    assert "777777" in messages[1]
    expected = evaluate(gt, {f: dt[f] for f in frames[3:]})
    assert result.to_json() == expected.to_json()


def test_evaluation_folders_malformed_line_names_file_and_line(tmp_path):
    labels, results = tmp_path / "label_2", tmp_path / "results"
    labels.mkdir()
    results.mkdir()
    (labels / "000000.txt").write_text(car(easy_box(0)).to_line() + "\n")
    good = det(easy_box(0), 0.5).to_line()
    (results / "000000.txt").write_text(good + "\n" + good.rsplit(" ", 3)[0] + "\n")
    with pytest.raises(KittiFormatError, match=r"000000\.txt:2: expected 15 or 16 fields"):
        evaluate_folders(labels, results)
    (results / "000000.txt").write_text(good + "\n\n" + good.replace("0.500000", "-0.5") + "\n")
    with pytest.raises(KittiFormatError, match=r"000000\.txt:3: score must be finite and >= 0"):
        evaluate_folders(labels, results)
    (results / "000000.txt").write_text(good.replace("0.500000", "nan") + "\n")
    with pytest.raises(KittiFormatError, match=r"000000\.txt:1: NaN"):
        evaluate_folders(labels, results)
    (results / "000000.txt").write_text(car(easy_box(0)).to_line() + "\n")
    with pytest.raises(KittiFormatError, match=r"000000\.txt:1: a result line needs 16 fields"):
        evaluate_folders(labels, results)


def test_evaluation_cli_end_to_end(generated, tmp_path, cli):
    root, gt, dt = generated
    out_json, plots = tmp_path / "ap.json", tmp_path / "plots"
    split = tmp_path / "val.txt"
    split.write_text("\n".join(sorted(gt)[:30]) + "\n")
    run = cli(
        "evaluate",
        "--labels", str(root / "label_2"),
        "--results", str(root / "results"),
        "--split", str(split),
        "--classes", "Car,Pedestrian,Cyclist",
        "--json", str(out_json),
        "--plots", str(plots),
    )  # fmt: skip
    assert "| Car | AP_40 |" in run.stdout and "| Cyclist | AP_11 |" in run.stdout
    assert "10 result file(s)" in run.stderr  # the 10 frames outside the split
    data = json.loads(out_json.read_text())
    expected = evaluate({f: gt[f] for f in sorted(gt)[:30]}, {f: dt[f] for f in sorted(gt)[:30]},
                        ["Car", "Pedestrian", "Cyclist"]).to_json()  # fmt: skip
    assert data.keys() == expected.keys()
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for d in DIFFICULTIES:
            for m in ("AP_11", "AP_40"):
                assert math.isclose(data[cls][d][m], expected[cls][d][m], abs_tol=1e-9)
    assert math.isclose(data["mAP_40"], expected["mAP_40"], abs_tol=1e-9)
    for name in ("car", "pedestrian", "cyclist"):
        png = plots / f"{name}_detection.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_cli_bad_input_exits_1_with_file_and_line(tmp_path, cli):
    labels, results = tmp_path / "label_2", tmp_path / "results"
    labels.mkdir()
    results.mkdir()
    (labels / "000000.txt").write_text(car(easy_box(0)).to_line() + "\n")
    (results / "000000.txt").write_text("Car 0 0 0 1 2 3\n")
    run = cli("evaluate", "--labels", str(labels), "--results", str(results), check=False)
    assert run.returncode == 1
    assert "dds-perception evaluate: error:" in run.stderr and "000000.txt:1" in run.stderr


def test_evaluation_cli_help_has_examples(cli):
    run = cli("evaluate", "--help")
    assert "dds-perception evaluate --labels" in run.stdout


def test_evaluation_warning_free_on_complete_folders(generated):
    root, _, _ = generated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_folders(root, root / "results")  # dataset root with label_2 inside
