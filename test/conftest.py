"""Shared fixtures: paths to the real sample data, a CLI runner, deterministic seeding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDS_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(
            f"real sample data not found at {path} (set DDS_SHARED_DATA to ../shared/data)"
        )
    return path


@pytest.fixture
def kitti_sample() -> Path:
    """Root of the 60 real KITTI frames (``training/image_2``, ``label_2``, ``calib``)."""
    return _shared("kitti_sample")


@pytest.fixture
def caltech101_root() -> Path:
    """Folder holding ``101_ObjectCategories`` (Caltech-101 at 128 px)."""
    return _shared("caltech101_s128")


@pytest.fixture
def caltech256_root() -> Path:
    """Folder holding ``256_ObjectCategories`` (5 real Caltech-256 classes)."""
    return _shared("caltech256_subset")


def run_cli(
    *args: str, check: bool = True, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``dds-perception ARGS`` in a subprocess from this checkout; return the result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    result = subprocess.run(
        [sys.executable, "-m", "dds_perception.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"dds-perception {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@pytest.fixture
def cli():
    """The ``run_cli`` helper as a fixture."""
    return run_cli


def scenes_car_ap(pipeline, root: Path):
    """KITTI evaluation (Car) of ``pipeline`` on every frame of a generated scene folder."""
    from dds_perception.data.kitti import detection_to_object, read_label_file
    from dds_perception.evaluation.kitti import evaluate

    gt, dt = {}, {}
    for png in sorted((root / "training" / "image_2").glob("*.png")):
        gt[png.stem] = read_label_file(root / "training" / "label_2" / f"{png.stem}.txt")
        found = pipeline(png.read_bytes(), "png")
        dt[png.stem] = [
            detection_to_object(tuple(box), score)
            for box, score in zip(found.boxes.tolist(), found.scores.tolist(), strict=True)
        ]
    return evaluate(gt, dt, classes=("Car",))


@pytest.fixture
def scene_ap():
    """The ``scenes_car_ap`` helper as a fixture: ``scene_ap(pipeline, root)``."""
    return scenes_car_ap
