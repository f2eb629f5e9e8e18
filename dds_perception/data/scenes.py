"""Write generated KITTI-format road scenes (PNG images, label_2, calib, ImageSets splits).

Writes a real KITTI object folder (``training/image_2/*.png``, ``label_2/*.txt``,
``calib/*.txt``, ``ImageSets/{train,val,trainval}.txt`` and ``scenes.json`` naming the
generator version and seed) of rendered road scenes, for tests, the demo and the shipped
weights. The scenes are drawn from a small 3-D world seen through a real KITTI calibration, so
the labels are consistent the way KITTI's are:

- cars (and some vans and trucks) are two stacked boxes (body + cabin with dark windows) with
  tyres, tail and head lights, on the ground plane at depths of 5-80 m; the 2-D box is the
  projection of the rendered model, so lower in the image means nearer and bigger, and the
  aspect ratio follows the heading (rear views ~1.2, side views ~2.5-3);
- ``alpha = ry - atan2(x, z)``, ``dimensions`` (h, w, l) and ``location`` (bottom centre, camera
  coordinates) are the values the object was rendered with;
- ``truncated`` is the fraction of the projected box outside the image; ``occluded`` is 0, 1 or
  2 for less than 10 %, less than 50 % or more of the box hidden by nearer objects (objects more
  than 85 % hidden are not drawn);
- distant clusters of tiny cars are labelled ``DontCare``, as KITTI does;
- heights range from ~10 px to ~200 px, so easy, moderate and hard objects all occur.

Around them: a sky gradient, a road with perspective lane markings, pavements, buildings with
windows, poles, trees, signs, boxy and round distractors, shadows, lighting changes, sensor noise
and blur. Each frame ``i`` is drawn from its own generator seeded with ``(seed, i)``, so a
frame does not depend on how many frames are made.

With ``--sequence`` the frames are one 10 Hz clip of a single road instead (issue 19: tracking):
the same background and camera throughout, cars driving in their lanes (each lane its own speed
and direction, towards or away from the camera), one or two cars crossing, parked cars; cars
enter and leave the view and hide one another. ``scenes.json`` then also holds
``sequence.track_ids``: per frame, the track id of each label line (ids count from 1 and name
the same car in every frame).

Examples:
  dds-perception make-scenes /tmp/scenes --frames 50 --seed 0
  dds-perception make-scenes /tmp/clip --sequence --frames 60 --seed 0   # a tracking clip
  dds-perception make-scenes data/scenes_val --frames 200 --seed 1 --val-fraction 0
  dds-perception make-scenes /tmp/small --frames 100 --size 621 188   # half-size, fast training
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dds_perception.data.kitti import KittiObject, random_split, write_label_file, write_split
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_path, write_json

# The four native KITTI image sizes, (width, height).
KITTI_SIZES: tuple[tuple[int, int], ...] = ((1242, 375), (1224, 370), (1238, 374), (1241, 376))

# Real KITTI intrinsics per image size (fx = fy, cx, cy) and the translation columns of P1-P3,
# from the calibration of each recording day (2011_09_26, _28, _29, _30).
_INTRINSICS: dict[tuple[int, int], dict[str, tuple[float, ...]]] = {
    (1242, 375): {
        "fcc": (721.5377, 609.5593, 172.854),
        "p1": (-387.5744, 0.0, 0.0),
        "p2": (44.85728, 0.2163791, 0.002745884),
        "p3": (-339.5242, 2.199936, 0.002729905),
    },
    (1224, 370): {
        "fcc": (707.0493, 604.0814, 180.5066),
        "p1": (-379.7842, 0.0, 0.0),
        "p2": (45.75831, -0.3454157, 0.004981016),
        "p3": (-334.1081, 2.33066, 0.003201153),
    },
    (1238, 374): {
        "fcc": (718.3351, 600.3891, 181.5122),
        "p1": (-385.8846, 0.0, 0.0),
        "p2": (44.50382, -0.5951107, 0.002616315),
        "p3": (-336.3147, 3.159867, 0.005323834),
    },
    (1241, 376): {
        "fcc": (718.856, 607.1928, 185.2157),
        "p1": (-386.1448, 0.0, 0.0),
        "p2": (45.38225, -0.1130887, 0.003779761),
        "p3": (-337.2877, 2.369057, 0.004915215),
    },
}
# Extrinsics of 2011_09_26 (shared by every generated frame; the scenes have no lidar).
_R0_RECT = (
    0.9999239, 0.00983776, -0.007445048, -0.009869795, 0.9999421, -0.004278459,
    0.007402527, 0.004351614, 0.9999631,
)  # fmt: skip
_TR_VELO_TO_CAM = (
    0.007533745, -0.9999714, -0.000616602, -0.004069766, 0.01480249, 0.0007280733,
    -0.9998902, -0.07631618, 0.9998621, 0.00752379, 0.01480755, -0.2717806,
)  # fmt: skip
_TR_IMU_TO_VELO = (
    0.9999976, 0.0007553071, -0.002035826, -0.8086759, -0.0007854027, 0.9998898,
    -0.01482298, 0.3195559, 0.002024406, 0.01482454, 0.9998881, -0.7997231,
)  # fmt: skip

CAR_COLOURS = (
    (235, 235, 232), (190, 192, 196), (130, 132, 138), (40, 40, 44), (25, 28, 35),
    (165, 25, 30), (30, 55, 130), (20, 35, 70), (35, 85, 55), (200, 185, 150),
    (120, 30, 40), (90, 110, 140), (215, 120, 30),
)  # fmt: skip

# Bumped whenever the rendering changes, so a model card can name the data it was trained on.
GENERATOR_VERSION = 1
MIN_VISIBLE = 0.15  # objects hidden more than 85 % are not drawn
MAX_TRUNCATION = 0.75


def _fmt(values) -> str:
    return " ".join(f"{float(v):.12e}" for v in values)


def camera_matrix(size: tuple[int, int]) -> np.ndarray:
    """The 3x4 ``P2`` used for frames of ``size`` (width, height)."""
    fx, cx, cy = _intrinsics(size)["fcc"]
    tx, ty, tz = _intrinsics(size)["p2"]
    return np.array([[fx, 0, cx, tx], [0, fx, cy, ty], [0, 0, 1, tz]], dtype=np.float64)


def _intrinsics(size: tuple[int, int]) -> dict[str, tuple[float, ...]]:
    if size in _INTRINSICS:
        return _INTRINSICS[size]
    # Any other size: the 1242x375 camera resized (focal length and P's pixel translations scale
    # with the width, the principal point's row with the height).
    base = _INTRINSICS[(1242, 375)]
    fx, cx, cy = base["fcc"]
    k = size[0] / 1242
    out = {"fcc": (fx * k, cx * k, cy * size[1] / 375)}
    for name in ("p1", "p2", "p3"):
        tx, ty, tz = base[name]
        out[name] = (tx * k, ty * k, tz)
    return out


def calib_text(size: tuple[int, int]) -> str:
    """A KITTI ``calib`` file (P0-P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo) for ``size``."""
    intr = _intrinsics(size)
    fx, cx, cy = intr["fcc"]
    lines = []
    for name, t in (("P0", (0.0, 0.0, 0.0)), ("P1", intr["p1"]), ("P2", intr["p2"]),
                    ("P3", intr["p3"])):  # fmt: skip
        lines.append(f"{name}: {_fmt((fx, 0, cx, t[0], 0, fx, cy, t[1], 0, 0, 1, t[2]))}")
    lines.append(f"R0_rect: {_fmt(_R0_RECT)}")
    lines.append(f"Tr_velo_to_cam: {_fmt(_TR_VELO_TO_CAM)}")
    lines.append(f"Tr_imu_to_velo: {_fmt(_TR_IMU_TO_VELO)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# 3-D helpers (camera coordinates: x right, y down, z forward; KITTI's rectified camera frame)


def _rot_y(ry: float) -> np.ndarray:
    c, s = math.cos(ry), math.sin(ry)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _project(P: np.ndarray, pts: np.ndarray) -> np.ndarray:
    homo = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ P.T
    return homo[:, :2] / homo[:, 2:3]


def _box_corners(loc, ry, xr, yr, zr) -> np.ndarray:
    """8 corners of an object-local box (x along the length, y down, z across), in camera
    coordinates; corner index bits: 1 = x max, 2 = y max, 4 = z max."""
    local = np.array(
        [[xr[i & 1], yr[(i >> 1) & 1], zr[(i >> 2) & 1]] for i in range(8)], dtype=np.float64
    )
    return local @ _rot_y(ry).T + np.asarray(loc)


# faces of a box as (corner indices in cyclic order, local outward normal)
_FACES = (
    ((1, 3, 7, 5), (1, 0, 0)),  # front (+x)
    ((0, 4, 6, 2), (-1, 0, 0)),  # rear (-x)
    ((0, 1, 5, 4), (0, -1, 0)),  # top (y min: up)
    ((2, 6, 7, 3), (0, 1, 0)),  # bottom
    ((4, 5, 7, 6), (0, 0, 1)),  # side +z
    ((0, 2, 3, 1), (0, 0, -1)),  # side -z
)


def _visible_faces(corners: np.ndarray, ry: float):
    """Faces of a convex box that face the camera (at the origin)."""
    rot = _rot_y(ry)
    for idx, normal in _FACES:
        centre = corners[list(idx)].mean(axis=0)
        if float(np.dot(rot @ np.asarray(normal, dtype=np.float64), centre)) < 0:
            yield idx, normal


_SHIFT = 4  # sub-pixel bits for cv2 drawing


def _poly(img, pts2d, colour, lines: bool = False) -> None:
    pts = np.round(pts2d * (1 << _SHIFT)).astype(np.int32)
    if lines:
        cv2.polylines(img, [pts], True, colour, 1, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillConvexPoly(img, pts, colour, cv2.LINE_AA, _SHIFT)


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


# --------------------------------------------------------------------------------------------
# Objects


@dataclass
class _Vehicle:
    kind: str  # "Car" or "Van"
    dims: tuple[float, float, float]  # h, w, l
    loc: np.ndarray  # bottom centre
    ry: float
    colour: tuple[int, int, int]
    box: np.ndarray = field(default_factory=lambda: np.zeros(4))  # clipped
    truncated: float = 0.0
    occluded_fraction: float = 0.0

    @property
    def depth(self) -> float:
        return float(np.hypot(self.loc[0], self.loc[2]))

    def parts(self):
        """(x range, y range, z range) of body and cabin, object-local (y down, 0 = ground)."""
        h, w, l = self.dims  # noqa: E741
        if self.kind == "Van":
            body = ((-l / 2, l / 2), (-0.5 * h, -0.12 * h), (-w / 2, w / 2))
            cabin = ((-0.5 * l, 0.3 * l), (-h, -0.5 * h), (-0.47 * w, 0.47 * w))
        elif self.kind == "Truck":  # cargo box behind, a lower cab with windows in front
            body = ((-l / 2, 0.25 * l), (-h, -0.12 * h), (-w / 2, w / 2))
            cabin = ((0.27 * l, l / 2), (-0.72 * h, -0.12 * h), (-0.47 * w, 0.47 * w))
        else:
            body = ((-l / 2, l / 2), (-0.58 * h, -0.14 * h), (-w / 2, w / 2))
            cabin = ((-0.3 * l, 0.2 * l), (-h, -0.58 * h), (-0.42 * w, 0.42 * w))
        return body, cabin

    def outline_points(self) -> np.ndarray:
        """3-D points whose projection bounds the rendered vehicle (body to the ground)."""
        (bx, by, bz), (cx, cy, cz) = self.parts()
        _h, w, l = self.dims  # noqa: E741
        return np.concatenate(
            [
                _box_corners(self.loc, self.ry, bx, (by[0], 0.0), bz),
                _box_corners(self.loc, self.ry, cx, cy, cz),
                _box_corners(self.loc, self.ry, (-l / 2, l / 2), (0.0, 0.0), (-w / 2, w / 2)),
            ]
        )

    def to_object(self) -> KittiObject:
        alpha = self.ry - math.atan2(float(self.loc[0]), float(self.loc[2]))
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        frac = self.occluded_fraction
        occluded = 0 if frac < 0.1 else 1 if frac < 0.5 else 2
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return KittiObject(
            type=self.kind,
            truncated=round(self.truncated, 2),
            occluded=occluded,
            alpha=alpha,
            bbox=(x1, y1, x2, y2),
            dimensions=tuple(float(v) for v in self.dims),
            location=tuple(float(v) for v in self.loc),
            rotation_y=self.ry,
        )


def _draw_vehicle(img: np.ndarray, P: np.ndarray, v: _Vehicle, light: float) -> None:
    _h, w, l = v.dims  # noqa: E741
    # soft shadow under the vehicle
    margin_x, margin_z = l / 2 + 0.2, w / 2 + 0.15
    foot = _box_corners(v.loc, v.ry, (-margin_x, margin_x), (0.0, 0.0), (-margin_z, margin_z))
    hull = cv2.convexHull(_project(P, foot).astype(np.float32))[:, 0]
    _poly(img, hull, (22, 22, 24))
    # tyres under the body: dark boxes (seen from behind a tyre is a narrow dark block)
    radius = {"Car": 0.33, "Van": 0.36}.get(v.kind, 0.5)
    for sx in (-0.32 * l, 0.32 * l):
        for sz in (-w / 2 + 0.12, w / 2 - 0.12):
            tyre = _box_corners(
                v.loc, v.ry, (sx - radius, sx + radius), (-2 * radius, 0.0), (sz - 0.1, sz + 0.1)
            )
            if tyre[:, 2].min() <= 0.5:
                continue
            for idx, _ in _visible_faces(tyre, v.ry):
                _poly(img, _project(P, tyre[list(idx)]), (18, 18, 20))
    (bx, by, bz), (cx, cy, cz) = v.parts()
    body = _box_corners(v.loc, v.ry, bx, by, bz)
    cabin = _box_corners(v.loc, v.ry, cx, cy, cz)
    steps = [lambda: _draw_body(img, P, v, body, radius, light),
             lambda: _draw_cabin(img, P, v, cabin, light)]  # fmt: skip
    # a cabin sits on its body (drawn last); a truck's cab stands beside its cargo box, so the
    # farther of the two goes first
    if v.kind == "Truck" and np.linalg.norm(cabin.mean(0)) > np.linalg.norm(body.mean(0)):
        steps.reverse()
    for step in steps:
        step()


def _draw_body(img, P, v: _Vehicle, body: np.ndarray, radius: float, light: float) -> None:
    """Shaded body faces, lamps on the front (white) and rear (red), wheels on the flanks."""
    _h, w, l = v.dims  # noqa: E741
    visible = list(_visible_faces(body, v.ry))
    for idx, normal in visible:
        shade = {(0, -1, 0): 1.12, (1, 0, 0): 0.88, (-1, 0, 0): 0.88}.get(normal, 0.72)
        pts = _project(P, body[list(idx)])
        _poly(img, pts, _shade(v.colour, shade * light))
        if normal[0] != 0:
            _lamps(img, pts, (255, 235, 190) if normal[0] > 0 else (200, 20, 20))
    # wheels on a visible flank: tyre and hub as circles in the flank's plane, in perspective
    rot = _rot_y(v.ry)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for _, normal in visible:
        if normal[2] == 0:
            continue
        side = np.full_like(angles, normal[2] * (w / 2 + 0.01))
        for sx in (-0.32 * l, 0.32 * l):
            for rr, colour in ((radius, (20, 20, 22)), (0.55 * radius, (120, 122, 128))):
                ring = np.stack(
                    [sx + rr * np.cos(angles), -radius + rr * np.sin(angles), side], axis=1
                )
                ring = ring @ rot.T + v.loc
                if ring[:, 2].min() > 0.5:
                    _poly(img, _project(P, ring), _shade(colour, light))


def _draw_cabin(img, P, v: _Vehicle, cabin: np.ndarray, light: float) -> None:
    """Roof in body colour; every other visible face a window: body-colour frame, dark glass."""
    glass = (28, 34, 44)
    for idx, normal in _visible_faces(cabin, v.ry):
        pts = _project(P, cabin[list(idx)])
        if normal[1] != 0:  # roof
            _poly(img, pts, _shade(v.colour, 1.1 * light))
            continue
        _poly(img, pts, _shade(v.colour, 0.8 * light))
        centre = pts.mean(axis=0)
        inner = centre + (pts - centre) * 0.8
        _poly(img, inner, _shade(glass, 0.8 + 0.5 * light))
        if normal[2] != 0:  # split side windows with a pillar (top middle to bottom middle)
            top = [k for k, i in enumerate(idx) if not i & 2]
            bottom = [k for k, i in enumerate(idx) if i & 2]
            seg = np.array([inner[top].mean(axis=0), inner[bottom].mean(axis=0)])
            seg = np.round(seg * (1 << _SHIFT)).astype(np.int32)
            thick = max(1, int(P[0, 0] * 0.08 / max(v.depth, 1.0)))
            pillar = _shade(v.colour, 0.8 * light)
            cv2.line(img, tuple(seg[0]), tuple(seg[1]), pillar, thick, cv2.LINE_AA, _SHIFT)


def _lamps(img: np.ndarray, face: np.ndarray, colour) -> None:
    """Two lamps on the upper corners of a front/rear face given as 4 image points."""
    # face corners in cyclic order; find its image-space top edge and bottom edge
    order = np.argsort(face[:, 1])
    top = face[order[:2]]
    bottom = face[order[2:]]
    top = top[np.argsort(top[:, 0])]
    bottom = bottom[np.argsort(bottom[:, 0])]
    width = top[1, 0] - top[0, 0]
    height = bottom[:, 1].mean() - top[:, 1].mean()
    if width < 6 or height < 3:
        return
    lamp_w, lamp_h = 0.18 * width, 0.22 * height
    for left in (top[0, 0] + 0.04 * width, top[1, 0] - 0.04 * width - lamp_w):
        y = top[:, 1].mean() + 0.12 * height
        quad = np.array([[left, y], [left + lamp_w, y], [left + lamp_w, y + lamp_h],
                         [left, y + lamp_h]])  # fmt: skip
        _poly(img, quad, colour)


# --------------------------------------------------------------------------------------------
# Background


def _draw_background(img, P, rng: np.random.Generator, cam_h: float, road_half: float) -> None:
    height, _width = img.shape[:2]
    fx, cx, cy = P[0, 0], P[0, 2], P[1, 2]
    # sky gradient (clear blue, haze or overcast grey)
    top = rng.uniform([90, 130, 170], [200, 215, 245]) * rng.uniform(0.7, 1.05)
    horizon_c = rng.uniform([180, 185, 185], [240, 240, 235])
    t = np.clip(np.arange(height) / max(cy, 1.0), 0, 1)[:, None]
    img[:] = (top[None] * (1 - t) + horizon_c[None] * t).astype(np.uint8)[:, None, :]
    # ground: pavement/grass beyond the road, road surface, markings
    ground = rng.uniform([70, 80, 60], [150, 140, 120])
    v0 = math.floor(cy)
    img[v0:] = ground.astype(np.uint8)
    z_near, z_far = 1.0, 400.0
    asphalt = rng.uniform(60, 120) * np.array(rng.uniform(0.95, 1.05, size=3))

    def ground_pt(x, z):
        return np.array([cx + fx * x / z, cy + fx * cam_h / z])

    road = np.array([ground_pt(-road_half, z_near), ground_pt(road_half, z_near),
                     ground_pt(road_half, z_far), ground_pt(-road_half, z_far)])  # fmt: skip
    _poly(img, road, tuple(int(c) for c in asphalt))
    # kerb stripes
    kerb = tuple(int(c) for c in rng.uniform(150, 210, size=3))
    for side in (-1, 1):
        x = side * road_half
        strip = np.array([ground_pt(x, z_near), ground_pt(x + side * 0.3, z_near),
                          ground_pt(x + side * 0.3, z_far), ground_pt(x, z_far)])  # fmt: skip
        _poly(img, strip, kerb)
    # lane markings: solid edges, dashed lane separators (3 m dashes every 9 m)
    paint = tuple(int(c) for c in rng.uniform([200, 200, 190], [250, 250, 240]))
    lane_w = rng.uniform(3.2, 3.8)
    for x in (-road_half + 0.3, road_half - 0.3):
        line = np.array([ground_pt(x - 0.07, 2.0), ground_pt(x + 0.07, 2.0),
                         ground_pt(x + 0.07, z_far), ground_pt(x - 0.07, z_far)])  # fmt: skip
        _poly(img, line, paint)
    offset = rng.uniform(0, 9)
    k = -road_half + lane_w
    while k < road_half - 1.0:
        z = 2.0 + offset
        while z < 120:
            dash = np.array([ground_pt(k - 0.07, z), ground_pt(k + 0.07, z),
                             ground_pt(k + 0.07, z + 3), ground_pt(k - 0.07, z + 3)])  # fmt: skip
            _poly(img, dash, paint)
            z += 9.0
        k += lane_w
    # buildings along both sides: facades parallel to the road, with window grids
    for side in (-1, 1):
        z = rng.uniform(3, 12)
        x = side * (road_half + rng.uniform(3, 9))
        while z < 140:
            length = rng.uniform(8, 30)
            if rng.random() < 0.8:
                b_h = rng.uniform(5, 18)
                colour = rng.uniform(60, 210, size=3)
                _facade(img, P, cam_h, x, z, z + length, b_h, colour, rng)
            z += length + rng.uniform(0, 6)
    # trees and poles near the kerbs
    for _ in range(int(rng.integers(2, 9))):
        side = rng.choice((-1, 1))
        x = side * (road_half + rng.uniform(0.6, 3.0))
        z = rng.uniform(4, 80)
        u = cx + fx * x / z
        v_ground = cy + fx * cam_h / z
        if rng.random() < 0.55:  # pole (street light or sign)
            pole_h = rng.uniform(3.5, 8)
            thick = max(1, round(fx * 0.14 / z))
            top_v = cy - fx * (pole_h - cam_h) / z
            cv2.line(img, (int(u), int(v_ground)), (int(u), int(top_v)), (70, 72, 75), thick)
            if rng.random() < 0.5:  # sign plate
                r = max(1, int(fx * 0.35 / z))
                sign = (200, 30, 30) if rng.random() < 0.5 else (30, 70, 170)
                cv2.circle(img, (int(u), int(top_v)), r, sign, -1, cv2.LINE_AA)
        else:  # tree: trunk + crown
            trunk_h = rng.uniform(1.5, 3)
            top_v = cy - fx * (trunk_h - cam_h) / z
            thick = max(1, int(fx * 0.3 / z))
            cv2.line(img, (int(u), int(v_ground)), (int(u), int(top_v)), (60, 45, 30), thick)
            r = max(2, int(fx * rng.uniform(1.2, 2.8) / z))
            green = tuple(int(c) for c in rng.uniform([20, 60, 15], [90, 140, 60]))
            cv2.ellipse(img, (int(u), int(top_v - 0.6 * r)), (r, int(r * 1.15)), 0, 0, 360,
                        green, -1, cv2.LINE_AA)  # fmt: skip
    # distractors on the road side and the road: bins, boxes, barrels, pedestrians, patches
    for _ in range(int(rng.integers(1, 7))):
        x = rng.uniform(-road_half - 3, road_half + 3)
        z = rng.uniform(4, 60)
        s = fx / z
        u, v = cx + fx * x / z, cy + fx * cam_h / z
        kind = rng.integers(0, 4)
        colour = tuple(int(c) for c in rng.uniform(20, 230, size=3))
        if kind == 0:  # box or bin (not car-shaped: no wheels, no windows)
            bw, bh = rng.uniform(0.5, 1.5) * s, rng.uniform(0.6, 1.4) * s
            cv2.rectangle(img, (int(u - bw / 2), int(v - bh)), (int(u + bw / 2), int(v)),
                          colour, -1)  # fmt: skip
        elif kind == 1:  # pedestrian-like: thin tall blob
            pw, ph = 0.5 * s, rng.uniform(1.5, 1.9) * s
            cv2.ellipse(img, (int(u), int(v - ph / 2)), (max(1, int(pw / 2)), max(1, int(ph / 2))),
                        0, 0, 360, colour, -1, cv2.LINE_AA)  # fmt: skip
        elif kind == 2:  # dark patch / puddle / shadow on the ground
            pw = rng.uniform(1, 5) * s
            cv2.ellipse(img, (int(u), int(v)), (max(1, int(pw / 2)), max(1, int(pw / 10))), 0, 0,
                        360, (35, 35, 38), -1, cv2.LINE_AA)  # fmt: skip
        else:  # long low wall / hedge segment
            ww, wh = rng.uniform(2, 6) * s, rng.uniform(0.4, 1.0) * s
            cv2.rectangle(img, (int(u - ww / 2), int(v - wh)), (int(u + ww / 2), int(v)),
                          colour, -1)  # fmt: skip


def _facade(img, P, cam_h, x, z1, z2, b_h, colour, rng) -> None:
    fx, cx, cy = P[0, 0], P[0, 2], P[1, 2]

    def pt(z, y_up):
        return [cx + fx * x / z, cy + fx * (cam_h - y_up) / z]

    quad = np.array([pt(z1, 0), pt(z2, 0), pt(z2, b_h), pt(z1, b_h)])
    _poly(img, quad, tuple(int(c) for c in colour))
    window = tuple(int(c) for c in colour * rng.uniform(0.3, 0.6))
    floors = int(b_h // 3)
    z = z1 + 1.0
    while z + 1.2 < z2 and z < 80:
        for f in range(floors):
            y0 = 1.0 + 3 * f
            win = np.array([pt(z, y0), pt(z + 1.2, y0), pt(z + 1.2, y0 + 1.5), pt(z, y0 + 1.5)])
            _poly(img, win, window)
        z += 2.5


# --------------------------------------------------------------------------------------------
# Scene assembly


def _sample_vehicle(rng: np.random.Generator, road_half: float, lane_w: float) -> _Vehicle:
    pick = rng.random()
    kind = "Van" if pick < 0.12 else "Truck" if pick < 0.16 else "Car"
    if kind == "Car":
        dims = (rng.normal(1.52, 0.09), rng.normal(1.63, 0.08), rng.normal(3.9, 0.35))
    elif kind == "Van":
        dims = (rng.uniform(1.9, 2.4), rng.uniform(1.8, 2.05), rng.uniform(4.4, 5.6))
    else:  # Truck: background for the Car benchmark (a detection on it is a false positive)
        dims = (rng.uniform(2.8, 3.6), rng.uniform(2.3, 2.6), rng.uniform(6.5, 11.0))
    # depth: half uniform 5-62 m, half log-uniform 7-80 m; the labelled cars' depth quartiles
    # come out near KITTI's (~15, 27, 42 m)
    if rng.random() < 0.5:
        z = float(rng.uniform(5.0, 62.0))
    else:
        z = float(np.exp(rng.uniform(np.log(7.0), np.log(80.0))))
    role = rng.random()
    if role < 0.55:  # driving in a lane, seen from behind or ahead
        lane = rng.integers(-2, 2)
        x = (lane + 0.5) * lane_w + rng.normal(0, 0.3)
        ry = (math.pi / 2 if rng.random() < 0.5 else -math.pi / 2) + rng.normal(0, 0.12)
    elif role < 0.85:  # parked along the kerb, often truncated when near
        side = rng.choice((-1, 1))
        x = side * (road_half - 1.1 + rng.normal(0, 0.2))
        if rng.random() < 0.75:
            ry = (math.pi / 2 if rng.random() < 0.5 else -math.pi / 2) + rng.normal(0, 0.08)
        else:  # parked across (side view)
            ry = rng.choice((0.0, math.pi)) + rng.normal(0, 0.1)
            x = side * (road_half + rng.uniform(1.5, 4.0))
    else:  # crossing / turning, any heading
        x = rng.uniform(-road_half, road_half)
        ry = rng.uniform(-math.pi, math.pi)
    colour = CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))]
    colour = tuple(int(np.clip(c * rng.uniform(0.85, 1.15) + rng.normal(0, 6), 0, 255))
                   for c in colour)  # fmt: skip
    # rounded to the label files' two decimals before rendering, so the labels are exact
    ry = round((ry + math.pi) % (2 * math.pi) - math.pi, 2)
    dims = tuple(round(float(d), 2) for d in dims)
    return _Vehicle(kind, dims, np.round(np.array([x, 0.0, z], dtype=np.float64), 2), ry, colour)


def _fits(vehicle: _Vehicle, others: list[_Vehicle]) -> bool:
    for o in others:
        r1 = 0.5 * math.hypot(vehicle.dims[1], vehicle.dims[2])
        r2 = 0.5 * math.hypot(o.dims[1], o.dims[2])
        if math.hypot(*(vehicle.loc[[0, 2]] - o.loc[[0, 2]])) < 0.85 * (r1 + r2):
            return False
    return True


def _place(vehicle: _Vehicle, P: np.ndarray, width: int, height: int) -> bool:
    """Project the vehicle; set its boxes and truncation; False when not (enough) in view."""
    pts = vehicle.outline_points()
    if pts[:, 2].min() < 0.8:
        return False
    uv = _project(P, pts)
    full = np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()])
    box = np.array([np.clip(full[0], 0, width - 1), np.clip(full[1], 0, height - 1),
                    np.clip(full[2], 0, width - 1), np.clip(full[3], 0, height - 1)])  # fmt: skip
    full_area = (full[2] - full[0]) * (full[3] - full[1])
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    if full_area <= 0 or area < 4:
        return False
    vehicle.box = box
    vehicle.truncated = float(np.clip(1.0 - area / full_area, 0.0, 1.0))
    return vehicle.truncated <= MAX_TRUNCATION


def _occlusion(vehicles: list[_Vehicle], width: int, height: int) -> None:
    """Fraction of each clipped box hidden by nearer boxes (painted far to near)."""
    owner = np.full((height, width), -1, dtype=np.int32)
    for i, v in enumerate(vehicles):  # sorted far -> near
        x1, y1, x2, y2 = (round(c) for c in v.box)
        owner[y1:y2, x1:x2] = i
    counts = np.bincount(owner[owner >= 0].ravel(), minlength=len(vehicles))
    for i, v in enumerate(vehicles):
        x1, y1, x2, y2 = (round(c) for c in v.box)
        area = max(1, (x2 - x1) * (y2 - y1))
        v.occluded_fraction = float(np.clip(1.0 - counts[i] / area, 0.0, 1.0))


def render_scene(
    rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, list[KittiObject]]:
    """Draw one RGB frame of ``size`` (width, height) and its KITTI label records."""
    width, height = size
    P = camera_matrix(size)
    cam_h = round(float(rng.uniform(1.55, 1.75)), 2)
    lane_w = float(rng.uniform(3.2, 3.8))
    road_half = lane_w * float(rng.choice((1.5, 2.0, 2.5)))
    img = np.zeros((height, width, 3), dtype=np.uint8)
    _draw_background(img, P, rng, cam_h, road_half)

    vehicles: list[_Vehicle] = []
    tries = 0 if rng.random() < 0.05 else int(rng.integers(2, 12)) * 3  # some empty roads
    for _ in range(tries):
        if len(vehicles) >= 11:
            break
        v = _sample_vehicle(rng, road_half, lane_w)
        v.loc[1] = cam_h
        if _fits(v, vehicles) and _place(v, P, width, height):
            vehicles.append(v)
        if rng.random() < 0.08:
            break
    vehicles.sort(key=lambda v: -v.depth)
    _occlusion(vehicles, width, height)
    vehicles = [v for v in vehicles if v.occluded_fraction <= 1 - MIN_VISIBLE]
    _occlusion(vehicles, width, height)

    objects: list[KittiObject] = []
    # distant clusters of tiny cars -> DontCare, drawn first (they are the farthest)
    for _ in range(int(rng.integers(0, 3))):
        cluster = []
        z0 = rng.uniform(80, 140)
        x0 = rng.uniform(-road_half, road_half)
        for _ in range(int(rng.integers(2, 6))):
            t = _sample_vehicle(rng, road_half, lane_w)
            t.loc = np.round([x0 + rng.normal(0, 2.0), cam_h, z0 + rng.uniform(0, 25)], 2)
            t.ry = float(rng.choice((1.57, -1.57)))
            if _place(t, P, width, height) and t.truncated == 0.0:
                cluster.append(t)
        if not cluster:
            continue
        for t in sorted(cluster, key=lambda v: -v.depth):
            _draw_vehicle(img, P, t, 1.0)
        boxes = np.array([t.box for t in cluster])
        x1, y1 = boxes[:, :2].min(axis=0) - 1
        x2, y2 = boxes[:, 2:].max(axis=0) + 1
        objects.append(KittiObject("DontCare", -1.0, -1, -10.0, (
            float(max(0, x1)), float(max(0, y1)), float(min(width - 1, x2)),
            float(min(height - 1, y2)))))  # fmt: skip

    light = float(rng.uniform(0.75, 1.15))
    for v in vehicles:
        _draw_vehicle(img, P, v, light)
    objects.extend(v.to_object() for v in sorted(vehicles, key=lambda v: v.depth))
    return _photometric(img, rng), objects


@dataclass
class _Mover:
    vehicle: _Vehicle
    start: np.ndarray  # bottom centre at t = 0
    velocity: np.ndarray  # m/s in camera coordinates (x, 0, z)
    track_id: int


def _sequence_world(seed: int, size: tuple[int, int]) -> tuple[dict, list[_Mover]]:
    """The road of a sequence and its cars with their motion (deterministic per seed)."""
    rng = np.random.default_rng((seed, 1_000_003))
    cam_h = round(float(rng.uniform(1.55, 1.75)), 2)
    lane_w = float(rng.uniform(3.2, 3.8))
    road_half = lane_w * float(rng.choice((1.5, 2.0, 2.5)))
    lanes = range(-int(road_half // lane_w), int(road_half // lane_w))
    # one speed per lane, so cars of a lane never run into each other; left lanes come towards
    # the camera (right-hand traffic), right lanes drive away
    lane_speed = {lane: float(rng.uniform(4.0, 12.0)) * (1 if lane >= 0 else -1) for lane in lanes}
    movers: list[_Mover] = []
    placed: list[_Vehicle] = []
    tries = 0
    while len(movers) < int(rng.integers(5, 10)) and tries < 200:
        tries += 1
        v = _sample_vehicle(rng, road_half, lane_w)
        v.loc[1] = cam_h
        v.loc[2] = float(rng.uniform(6.0, 45.0))  # near enough to be seen most of the clip
        role = rng.random()
        if role < 0.65:  # driving in its lane
            lane = int(rng.choice(list(lanes)))
            v.loc[0] = round((lane + 0.5) * lane_w, 2)
            speed = lane_speed[lane]
            v.ry = round(-math.pi / 2 if speed > 0 else math.pi / 2, 2)
            velocity = np.array([0.0, 0.0, speed])
        elif role < 0.85:  # parked at the kerb
            side = float(rng.choice((-1, 1)))
            v.loc[0] = round(side * (road_half - 1.1), 2)
            v.ry = round(math.pi / 2, 2)
            velocity = np.zeros(3)
        else:  # crossing the road
            direction = float(rng.choice((-1, 1)))
            v.loc[0] = round(-direction * road_half * float(rng.uniform(0.6, 1.2)), 2)
            v.ry = 0.0 if direction > 0 else round(math.pi, 2)
            velocity = np.array([direction * float(rng.uniform(3.0, 7.0)), 0.0, 0.0])
        if not _fits(v, placed):
            continue
        placed.append(v)
        movers.append(_Mover(v, v.loc.copy(), velocity, len(movers) + 1))
    world = {"cam_h": cam_h, "road_half": road_half, "light": float(rng.uniform(0.8, 1.1))}
    return world, movers


def render_sequence_frame(
    seed: int, index: int, size: tuple[int, int], fps: float = 10.0
) -> tuple[np.ndarray, list[KittiObject], list[int]]:
    """Frame ``index`` of the sequence ``seed``: RGB, KITTI labels, each label's track id."""
    width, height = size
    P = camera_matrix(size)
    world, movers = _sequence_world(seed, size)
    img = np.zeros((height, width, 3), dtype=np.uint8)
    _draw_background(img, P, np.random.default_rng((seed, 1_000_033)), world["cam_h"],
                     world["road_half"])  # fmt: skip
    t = index / fps
    visible: list[tuple[_Vehicle, int]] = []
    for mover in movers:
        v = mover.vehicle
        v.loc = np.round(mover.start + mover.velocity * t, 2)
        if v.loc[2] > 1.0 and _place(v, P, width, height):
            visible.append((v, mover.track_id))
    visible.sort(key=lambda item: -item[0].depth)
    vehicles = [v for v, _ in visible]
    _occlusion(vehicles, width, height)
    visible = [(v, i) for v, i in visible if v.occluded_fraction <= 1 - MIN_VISIBLE]
    vehicles = [v for v, _ in visible]
    _occlusion(vehicles, width, height)
    for v in vehicles:
        _draw_vehicle(img, P, v, world["light"])
    nearest_first = sorted(visible, key=lambda item: item[0].depth)
    objects = [v.to_object() for v, _ in nearest_first]
    rng = np.random.default_rng((seed, 1_000_037, index))
    return _photometric(img, rng), objects, [i for _, i in nearest_first]


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting (gain, tint, a horizontal light gradient), blur and sensor noise."""
    out = img.astype(np.float32)
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    ramp = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0), img.shape[1],
                       dtype=np.float32)  # fmt: skip
    out *= gain[None, None, :].astype(np.float32)
    out *= ramp[None, :, None]
    kind = rng.random()
    if kind < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.6, 1.6))
    elif kind < 0.35:  # horizontal motion blur
        k = int(rng.integers(3, 8))
        out = cv2.blur(out, (k, 1))
    sigma = rng.uniform(2.0, 8.0)
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(out, 0, 255).astype(np.uint8)


def generate_kitti_scenes(
    root: str | os.PathLike[str],
    num_frames: int,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = KITTI_SIZES,
    *,
    val_fraction: float = 0.25,
    overwrite: bool = False,
    sequence: bool = False,
    fps: float = 10.0,
) -> Path:
    """Write ``num_frames`` generated frames as a KITTI object folder under ``root``.

    ``root/scenes.json`` records the generator version, seed, frame count and sizes.

    Frame ``i`` has size ``sizes[i % len(sizes)]`` ((width, height) pairs) and is drawn from
    ``np.random.default_rng((seed, i))``. ``ImageSets/train.txt``/``val.txt`` hold a seeded
    random split with ``val_fraction`` of the frames in ``val`` (``0`` puts everything in
    ``train``); ``trainval.txt`` lists all. The folder is built beside ``root`` and renamed
    into place when complete. Returns ``root``.

    ``sequence``: the frames are one clip of ``fps`` frames per second at ``sizes[0]`` (see the
    module doc), with the per-frame track ids in ``scenes.json``.
    """
    final = Path(root)
    if num_frames < 1:
        raise UsageError(f"num_frames must be >= 1, got {num_frames}")
    if not sizes:
        raise UsageError("sizes must name at least one (width, height)")
    for w, h in sizes:
        if w < 64 or h < 32:
            raise UsageError(f"image size {w}x{h} is too small (at least 64x32)")
    if final.exists() and not overwrite and (final.is_file() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not empty (pass overwrite=True)")
    ids = [f"{i:06d}" for i in range(num_frames)]
    if fps <= 0:
        raise UsageError(f"fps must be positive, got {fps}")
    track_ids: dict[str, list[int]] = {}
    with atomic_path(final) as tmp:
        training = tmp / "training"
        for sub in ("image_2", "label_2", "calib"):
            (training / sub).mkdir(parents=True)
        for i, frame_id in enumerate(ids):
            size = tuple(int(v) for v in sizes[0 if sequence else i % len(sizes)])
            if sequence:
                image, objects, track_ids[frame_id] = render_sequence_frame(seed, i, size, fps)
            else:
                image, objects = render_scene(np.random.default_rng((seed, i)), size)
            path = training / "image_2" / f"{frame_id}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_PNG_COMPRESSION, 1]):  # fmt: skip
                raise OSError(f"cannot write {path}")
            write_label_file(training / "label_2" / f"{frame_id}.txt", objects)
            (training / "calib" / f"{frame_id}.txt").write_text(calib_text(size))
        sets = tmp / "ImageSets"
        sets.mkdir()
        if val_fraction > 0 and num_frames > 1:
            train, val = random_split(ids, val_fraction, seed)
        else:
            train, val = list(ids), []
        write_split(sets / "train.txt", train)
        write_split(sets / "val.txt", val)
        write_split(sets / "trainval.txt", ids)
        write_json(
            tmp / "scenes.json",
            {
                "generator": "dds_perception.data.scenes",
                "generator_version": GENERATOR_VERSION,
                "num_frames": num_frames,
                "seed": seed,
                "sizes": [list(size) for size in sizes],
                "val_fraction": val_fraction,
                "splits": {"train": len(train), "val": len(val)},
                **({"sequence": {"fps": fps, "track_ids": track_ids}} if sequence else {}),
            },
        )
    return final


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_root", metavar="OUT_ROOT", help="folder to create (KITTI layout)")
    parser.add_argument("--frames", type=int, default=50, help="number of frames (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="fraction of frames listed in ImageSets/val.txt (default 0.25; 0 = none)",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        action="append",
        metavar=("W", "H"),
        help="image size, repeatable, cycled per frame (default: the four KITTI sizes); other "
        "sizes use KITTI's camera scaled to the width, i.e. a resized KITTI frame",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_ROOT if present")
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="one 10 Hz clip of moving cars with track ids in scenes.json (for track-eval)",
    )


def run(args: argparse.Namespace) -> int:
    root = generate_kitti_scenes(
        args.out_root,
        args.frames,
        seed=args.seed,
        sizes=tuple(tuple(size) for size in args.size) if args.size else KITTI_SIZES,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        sequence=args.sequence,
    )
    kind = "a 10 Hz sequence of " if args.sequence else ""
    print(f"wrote {kind}{args.frames} frames to {root}/training (seed {args.seed})")
    return 0
