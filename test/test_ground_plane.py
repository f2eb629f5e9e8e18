"""Ground-plane distance: hand-computed cases, bad input, and KITTI's labelled car locations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from dds_perception.detection import ground_plane as gp

K = [1000.0, 0.0, 600.0, 0.0, 1000.0, 200.0, 0.0, 0.0, 1.0]  # fx = fy = 1000, (600, 200)
CAMERA = gp.Intrinsics.from_k(K, width=1200, height=400)
SIZE = (400, 1200)  # (height, width)


def plane(**changes) -> gp.GroundPlane:
    return gp.GroundPlane(camera_height=1.5, **{"center_offset": 0.0, **changes})


def test_ground_plane_level_camera_hand_computed():
    """Pitch 0: z = h * fy / (v - cy) = 1.5 * 1000 / 100 = 15 m; x = z * (u - cx) / fx."""
    boxes = [[550, 250, 650, 300], [750, 250, 850, 300]]  # bottom centres (600, 300), (800, 300)
    est = gp.estimate(boxes, CAMERA, plane(), SIZE)
    assert est.reasons == ("", "")
    np.testing.assert_allclose(est.positions, [[0.0, 1.5, 15.0], [3.0, 1.5, 15.0]], atol=1e-9)


def test_ground_plane_center_offset_along_the_viewing_direction():
    est = gp.estimate([[550, 250, 650, 300], [750, 250, 850, 300]], CAMERA,
                      plane(center_offset=1.4), SIZE)  # fmt: skip
    # straight ahead: 1.4 m further in z; at x = 3, z = 15: along (3, 15) / 15.297
    norm = math.hypot(3.0, 15.0)
    np.testing.assert_allclose(
        est.positions,
        [[0.0, 1.5, 16.4], [3.0 + 1.4 * 3.0 / norm, 1.5, 15.0 + 1.4 * 15.0 / norm]],
        atol=1e-9,
    )


def test_ground_plane_pitched_camera_hand_computed():
    """A camera pitched down 0.1 rad: put a road point 10 m ahead, 2 m right in the level frame,
    project it by hand, and get it back from its pixel."""
    pitch, h = 0.1, 1.5
    x_l, y_l, z_l = 2.0, h, 10.0
    c, s = math.cos(pitch), math.sin(pitch)
    cam = np.array([x_l, y_l * c - z_l * s, y_l * s + z_l * c])  # level -> camera frame
    u = 600 + 1000 * cam[0] / cam[2]
    v = 200 + 1000 * cam[1] / cam[2]
    est = gp.estimate([[u - 40, v - 30, u + 40, v]], CAMERA, plane(pitch=pitch), SIZE)
    assert est.reasons == ("",)
    np.testing.assert_allclose(est.positions[0], cam, atol=1e-9)
    # the horizon moves up by fy * tan(pitch) = 100.3 px
    assert gp.horizon_row(CAMERA, pitch) == pytest.approx(200 - 1000 * math.tan(0.1))


def test_ground_plane_horizon_truncation_range():
    boxes = [
        [500, 100, 700, 200],  # bottom on the horizon (v = cy)
        [500, 100, 700, 150],  # above it
        [500, 200, 700, 399],  # touches the bottom of a 400-row image: truncated
        [500, 150, 700, 200.5],  # 0.5 px below the horizon: 3 km away
        [500, 150, 700, 201.0],  # 1 px below: 1.5 km
        [500, 150, 700, 220.0],  # 75 m
    ]
    est = gp.estimate(boxes, CAMERA, plane(), SIZE)
    assert est.reasons == (
        gp.ABOVE_HORIZON,
        gp.ABOVE_HORIZON,
        gp.TRUNCATED,
        gp.BEYOND_RANGE,
        gp.BEYOND_RANGE,
        "",
    )
    assert np.isnan(est.positions[:5]).all() and est.positions[5, 2] == pytest.approx(75.0)
    assert est.valid.tolist() == [False] * 5 + [True]
    # pitched down 0.1 rad, the row 150 is below the horizon (~100): a distance
    pitched = gp.estimate([[500, 100, 700, 150]], CAMERA, plane(pitch=0.1), SIZE)
    assert pitched.reasons == ("",) and 10 < pitched.positions[0, 2] < 40


def test_ground_plane_covariance_grows_with_distance():
    """One pixel of bottom-edge error: sigma_z = z^2 / (fy * h) (model terms switched off)."""
    quiet = plane(relative_sigma=0.0, offset_sigma=0.0, floor_sigma=0.0)
    rows = [300.0, 250.0, 225.0]  # z = 15, 30, 60 m
    est = gp.estimate([[550, r - 50, 650, r] for r in rows], CAMERA, quiet, SIZE)
    z = est.positions[:, 2]
    np.testing.assert_allclose(z, [15, 30, 60])
    sigma_z = np.sqrt(est.covariances[:, 2, 2])
    np.testing.assert_allclose(sigma_z, z**2 / (1000 * 1.5), rtol=1e-9)
    assert np.all(np.diff(sigma_z) > 0)
    default = gp.estimate([[550, r - 50, 650, r] for r in rows], CAMERA, plane(), SIZE)
    assert np.all(np.sqrt(default.covariances[:, 2, 2]) > sigma_z)  # model terms add up
    for cov in default.covariances:  # symmetric positive definite
        np.testing.assert_allclose(cov, cov.T)
        assert np.all(np.linalg.eigvalsh(cov) > 0)
    cov36 = gp.pose_covariances(default.covariances)
    assert cov36.shape == (3, 36)
    assert cov36[0, 14] == pytest.approx(default.covariances[0, 2, 2])  # row 2, column 2
    assert cov36[0, 21] == cov36[0, 28] == cov36[0, 35] == 1.0e9  # orientation: unknown


@pytest.mark.parametrize(
    ("k", "match"),
    [
        ([0.0] * 9, r"k is all zero"),
        ([1000.0, 0, 600, 0, 1000, 200, 0, 0], r"k has 8 values: a 3x3 K needs 9"),
        ([0.0, 0, 600, 0, 1000, 200, 0, 0, 1], r"fx 0.0: focal length must be > 0"),
        ([1000.0, 0, 600, 0, -5, 200, 0, 0, 1], r"fy -5.0: focal length must be > 0"),
        ([1000.0, 0, float("nan"), 0, 1000, 200, 0, 0, 1], r"k holds non-finite values"),
        ("garbage", r"not a list of numbers"),
    ],
)
def test_ground_plane_bad_camera_matrix_names_the_field(k, match):
    with pytest.raises(gp.CameraModelError, match=match):
        gp.Intrinsics.from_k(k)


def test_ground_plane_camera_info_binning_and_roi():
    roi = SimpleNamespace(x_offset=100, y_offset=50, width=800, height=300)
    info = SimpleNamespace(k=K, width=1200, height=400, binning_x=2, binning_y=2, roi=roi)
    cam = gp.Intrinsics.from_camera_info(info)
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == (500.0, 500.0, 250.0, 75.0)
    assert (cam.width, cam.height) == (400, 150)
    no_roi = SimpleNamespace(x_offset=0, y_offset=0, width=0, height=0)
    plain = SimpleNamespace(k=K, width=1200, height=400, binning_x=0, binning_y=0, roi=no_roi)
    assert gp.Intrinsics.from_camera_info(plain) == CAMERA


def test_ground_plane_missing_inputs_are_reasons_not_errors():
    boxes = [[550, 250, 650, 300]]
    assert gp.estimate(boxes, None, plane(), SIZE).reasons == (gp.NO_CAMERA_INFO,)
    for height in (0.0, -1.65, float("nan")):
        est = gp.estimate(boxes, CAMERA, gp.GroundPlane(camera_height=height), SIZE)
        assert est.reasons == (gp.NO_CAMERA_HEIGHT,) and np.isnan(est.positions).all()
    assert gp.estimate(boxes, CAMERA, plane(), (375, 1242)).reasons == (gp.SIZE_MISMATCH,)
    assert gp.estimate(np.zeros((0, 4)), CAMERA, plane(), SIZE).positions.shape == (0, 3)
    assert gp.estimate([[np.nan, 0, 1, 300]], CAMERA, plane(), SIZE).reasons == (gp.ABOVE_HORIZON,)


def test_ground_plane_against_kitti_labels(kitti_sample):
    """The labels' own 2-D boxes of clearly visible cars within 40 m of the 60 real frames:
    the ground-plane z (KITTI camera height 1.65 m) against the labelled 3-D location's z."""
    from dds_perception.evaluation.distance import label_distance_errors, summarize

    rows = label_distance_errors(kitti_sample)
    summary = summarize(rows, max_distance=40.0)
    assert summary["count"] >= 50, summary
    assert summary["median"] <= 0.10, summary
    assert summary["p90"] <= 0.35, summary
    # the nearest-point estimate (offset 0) is biased short: the centre offset fixes that
    near = summarize(label_distance_errors(kitti_sample, center_offset=0.0), max_distance=40.0)
    assert near["median_signed"] < summary["median_signed"]


def test_distance_eval_detector_matching(kitti_sample):
    """A stand-in detector that returns the labelled boxes (plus a stray one) matches every
    labelled car and gives the labels' own numbers."""
    from dds_perception.data.kitti import read_label_file
    from dds_perception.evaluation.distance import (
        detection_distance_errors,
        label_distance_errors,
        summarize,
    )

    frames = ["000000", "000001", "000002"]
    label_dir = kitti_sample / "training" / "label_2"
    current = iter(frames)

    def detect(rgb):
        objects = read_label_file(label_dir / f"{next(current)}.txt")
        boxes = [o.bbox for o in objects if o.type == "Car"] + [(0.0, 0.0, 5.0, 5.0)]
        return np.array(boxes), np.full(len(boxes), 0.9)

    rows, counts = detection_distance_errors(kitti_sample, detect, frames=frames)
    assert counts["matched"] == counts["cars"] and counts["detections"] == counts["cars"] + 3
    by_label = [r for r in label_distance_errors(kitti_sample) if r.frame in frames]
    assert summarize(rows, 1000.0)["median"] == pytest.approx(
        summarize(by_label, 1000.0)["median"]
    )


def test_distance_eval_command(cli, kitti_sample, tmp_path):
    import json

    out = tmp_path / "distance.json"
    result = cli("distance-eval", "--kitti-root", str(kitti_sample), "--json", str(out))
    assert "labels (all cars):" in result.stdout and "median relative error" in result.stdout
    report = json.loads(out.read_text())
    assert report["labels"]["all"]["median"] <= 0.10 and report["camera_height"] == 1.65
    bad = cli("distance-eval", "--kitti-root", str(tmp_path), check=False)
    assert bad.returncode == 1 and "no KITTI labels" in bad.stderr
