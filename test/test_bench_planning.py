"""The bench's planning section (tracker + distance per frame): it runs the node's own planning
stage and reports it; the numbers are not asserted (wall-clock times never are)."""

from __future__ import annotations

import json

from dds_perception.benchmarks.planning import measure_planning, scripted_clip
from dds_perception.benchmarks.report import _planning


def test_bench_planning_measures_the_node_stage():
    result = measure_planning(cars=20, frames=8, repeats=1)
    for part in ("planning", "tracker", "distance"):
        assert result[f"{part}_ms_per_frame"] > 0
    assert result["budget_ms"] == 0.5 and isinstance(result["within_budget"], bool)
    text = "\n".join(_planning(result))
    assert "## Tracker and distance (20 cars, 8 frames)" in text


def test_bench_planning_clip_is_on_the_road():
    clip = scripted_clip(20, 3)
    assert len(clip) == 3 and all(d.boxes.shape == (20, 4) for d in clip)
    bottoms = clip[0].boxes[:, 3]
    assert (bottoms > 180).all() and (bottoms < 375).all()  # below KITTI's horizon (row 173)


def test_bench_planning_section_from_the_command(cli, tmp_path):
    cli("bench", "--quick", "--sections", "planning", "--out", str(tmp_path))
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["planning"]["cars"] == 20 and "planning" in data["section_seconds"]
    assert "Tracker and distance" in (tmp_path / "bench.md").read_text()
