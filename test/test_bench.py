"""Benchmarks: the quick bench end to end, BN folding / branch merging equality, the helpers.

No test asserts a time: speed is what ``dds-perception bench`` measures and reports.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dds_perception.benchmarks.flops import count_macs, count_model_macs, count_parameters
from dds_perception.benchmarks.memory import measure_peak_memory
from dds_perception.benchmarks.suites import OURS
from dds_perception.benchmarks.timing import measure, measure_interleaved, summarize
from dds_perception.detection.optimize import (
    SplitPyramidBlock,
    count_batchnorm,
    fold_batchnorm,
    merge_pyramid_branches,
    optimize_for_inference,
    split_pyramid_producers,
)
from dds_perception.models import get_model, list_models

REPO = Path(__file__).resolve().parents[1]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics so that folding has something to get wrong."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in _flat(v)]
    return [t for v in outputs for t in _flat(v)]


# ----------------------------------------------------------------------------- quick bench
@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "dds_perception.cli", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed ratio to ssd300_vgg16" in result.stdout
    return out


def test_bench_quick_json_has_every_section(quick_bench: Path) -> None:
    data = json.loads((quick_bench / "bench.json").read_text())
    assert data["schema"] == "dds_perception.bench/1"
    for key in ("torch", "torchvision", "cpu", "torch_threads", "load_average_1_5_15", "device"):
        assert key in data["environment"], key
    assert data["config"]["quick"] is True

    names = {row["name"] for row in data["backbones"]}
    assert names == {
        "dds_mobilenet_v2",
        "mobilenet_v1",
        "mobilenet_v2",
        "shufflenet_v1",
        "shufflenet_v2_x1_0",
        "mobilenet_v3_large",
    }
    for row in data["backbones"]:
        assert row["params"] > 0 and row["macs"] > 0
        for key in ("latency_ms", "plain_latency_ms", "batch_latency_ms"):
            timing = row[key]
            assert timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert len(timing["samples_ms"]) == timing["repeats"]
        assert row["throughput_img_s"] > 0

    detectors = data["detectors"]
    assert {m["name"] for m in detectors["models"]} == {
        "dds_rpn_s32",
        "dds_rpn_s16",
        "dds_rpn_kitti",
        "ssd300_vgg16",
        "ssdlite320_mobilenet_v3_large",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
    }
    runs = {(r["name"], r["settings"]): r for r in detectors["runs"]}
    assert len(runs) == 12  # 6 models x (plain, optimized)
    assert runs[("ssd300_vgg16", "plain")]["ratio_to_ssd300_vgg16"] == 1.0
    for run in runs.values():
        assert run["ratio_to_ssd300_vgg16"] > 0 and run["network_ms"]["median_ms"] > 0

    pipeline = data["pipeline"]
    for stage in ("decode", "preprocess", "inference", "postprocess", "message"):
        assert stage in pipeline["stages"], stage
    assert 0.0 <= pipeline["outside_network_share"] < 1.0
    assert pipeline["memory"]["peak_rss_mb"] > 0

    assert {r["name"] for r in data["memory"]} == names_of(detectors)
    assert all(r["peak_rss_mb"] >= r["rss_before_mb"] for r in data["memory"])

    variants = [e["variant"] for e in data["speedups"]["table"]]
    assert variants[:2] == ["plain", "default"]
    for switch in (
        "inference_mode",
        "fold_bn",
        "merge_pyramid",
        "split_pyramid",
        "channels_last",
        "mkldnn",
        "threads",
        "reuse_memory",
    ):
        assert f"{switch}=off" in variants
    assert "dense_pyramid=on" in variants  # off by default on the CPU: its row turns it on
    for entry in data["speedups"]["table"]:
        assert entry["ratio"] > 0
    batches = data["batches"]
    assert batches["batch_sizes"] == [1, 2] and batches["precisions"] == ["fp32", "fp16"]
    assert not batches["errors"]
    cells = {(r["name"], r["precision"], r["batch"]): r for r in batches["rows"]}
    assert set(cells) == {
        (name, precision, batch)
        for name in (OURS, "ssd300_vgg16")
        for precision in ("fp32", "fp16")
        for batch in (1, 2)
    }
    for (_, _, batch), row in cells.items():
        median = row["batch_ms"]["median_ms"]
        assert row["ms_per_frame"] == pytest.approx(median / batch, rel=1e-3, abs=1e-3)
        assert row["frames_per_s"] == pytest.approx(1e3 / row["ms_per_frame"], rel=1e-2)
        assert row["ratio_to_ssd300_vgg16"] > 0
    assert set(data["profile"]) == {"plain", "default"}
    assert abs(sum(data["profile"]["plain"]["share"].values()) - 1.0) < 0.01
    target = data["target"]
    assert target["target_ratio"] == 4.0 and isinstance(target["reached"], bool)
    assert target["best"]["ratio"] == max(r["ratio"] for r in target["ratios"])


def names_of(detectors: dict) -> set[str]:
    return {m["name"] for m in detectors["models"]}


def test_bench_quick_markdown_and_plots(quick_bench: Path) -> None:
    text = (quick_bench / "bench.md").read_text()
    for heading in (
        "## Target:",
        "## Detectors on a",
        "## Speed-ups on and off",
        "## Where the time goes",
        "## Pipeline end to end",
        "## Batches",
        "## Backbones",
        "## Memory",
        "## Machine and method",
    ):
        assert heading in text, heading
    assert "--quick run" in text
    data = json.loads((quick_bench / "bench.json").read_text())
    assert len(data["plots"]) == 6
    for name in data["plots"]:
        assert (quick_bench / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_options(tmp_path: Path, capsys) -> None:
    from dds_perception.cli import main

    assert main(["bench", "--half", "--quick", "--out", str(tmp_path)]) == 1
    assert "--half needs --device cuda" in capsys.readouterr().err
    assert main(["bench", "--quick", "--backend", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--repeats", "0", "--out", str(tmp_path)]) == 1
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--quick", "--input-size", "350", "1152", "--out", str(tmp_path)]) == 1
    assert "--input-size 350 1152: need positive multiples of 32" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_times_the_shipped_network() -> None:
    """The target's detector is the node's default weights file's network: same tensors, same
    shapes, same second stage (the bench reads the file's description, so it follows it)."""
    from dds_perception.benchmarks.candidates import SHIPPED, our_detector
    from dds_perception.detection.weights import load_detector
    from dds_perception.pipeline import default_weights

    assert OURS == SHIPPED
    candidate = our_detector(SHIPPED, (128, 416))
    shipped = load_detector(default_weights())
    timed = {k: v.shape for k, v in candidate.network.state_dict().items()}
    assert timed == {k: v.shape for k, v in shipped.state_dict().items()}
    assert candidate.input_size == (128, 416)
    assert "second stage" in candidate.description


def test_bench_times_our_detector_at_the_weights_input_size(tmp_path: Path) -> None:
    """Without --input-size the bench runs our detector at the size of the weights it was
    given (the shipped model's by default), so its ratio is the deployed model's."""
    import argparse

    from dds_perception.benchmarks import command
    from dds_perception.detection import DetectorConfig, build_detector
    from dds_perception.detection.weights import save_detector

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    weights = save_detector(
        tmp_path / "w.safetensors", build_detector(DetectorConfig(input_size=(320, 1024)))
    )
    config = command.config_from_args(parser.parse_args(["--weights", str(weights)]))
    assert config.our_input == (320, 1024)
    args = ["--weights", str(weights), "--input-size", "352", "1152"]
    assert command.config_from_args(parser.parse_args(args)).our_input == (352, 1152)


def test_bench_compare_puts_runs_side_by_side(quick_bench: Path, tmp_path: Path, capsys) -> None:
    from dds_perception.cli import main

    data = json.loads((quick_bench / "bench.json").read_text())
    gpu = tmp_path / "gpu"  # the same run, relabelled as a fp16 GPU run
    gpu.mkdir()
    data["environment"]["gpu"], data["config"]["half"] = "Some GPU", True
    (gpu / "bench.json").write_text(json.dumps(data))
    out = tmp_path / "cmp"
    assert main(["bench", "--compare", str(quick_bench), str(gpu), "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "| CPU, 1 thread(s) | Some GPU fp16 |" in text
    rows = {r["what"]: r["values"] for r in json.loads((out / "compare.json").read_text())["rows"]}
    ours = rows[f"{OURS} network ms (default)"]
    ref = rows["ssd300_vgg16 network ms (default)"]
    assert ours[0] == ours[1] > 0
    assert rows["speed ratio (default)"][0] == pytest.approx(ref[0] / ours[0], rel=2e-3)
    assert 0 <= rows["share outside the network"][0] <= 1
    per_frame = rows[f"{OURS} ms per frame, batch 2, fp16"]
    assert per_frame[0] == per_frame[1] > 0
    assert "ms per frame, batch 1, fp32" in text
    assert main(["bench", "--compare", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "nope/bench.json: cannot read a bench result" in capsys.readouterr().err


# ----------------------------------------------------------------------------- folding
@pytest.mark.parametrize("name", list_models())
def test_bench_fold_batchnorm_keeps_outputs(name: str) -> None:
    model = get_model(name, num_classes=10).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        folded = copy.deepcopy(model)
        n = fold_batchnorm(folded, x)
        got = folded(x)
    assert n > 0 and count_batchnorm(folded) == 0, f"{count_batchnorm(folded)} BN left"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_layer13", [False, True])
def test_bench_optimize_detector_keeps_outputs(use_layer13: bool) -> None:
    from dds_perception.detection import DetectorConfig, build_detector

    model = build_detector(DetectorConfig(input_size=(64, 192), use_layer13=use_layer13)).eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, 64, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        fast = optimize_for_inference(model, "cpu", example=x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    assert count_batchnorm(fast) == 0
    # equal dilations merged ({1,1,2,3} -> 3 branches, {1,1,1,2} -> 2), then all 17 pyramid
    # blocks read per-branch producers; layer 1 took over the stem
    assert sum(isinstance(m, SplitPyramidBlock) for m in fast.modules()) == 17
    assert isinstance(fast.backbone.features[0], nn.Identity)
    branches = sorted(
        {len(m.branches) for m in fast.modules() if isinstance(m, SplitPyramidBlock)}
    )
    assert branches == [2, 3, 4]
    assert count_batchnorm(model) > 0  # the original is untouched (inplace=False)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize(
    "name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"]
)
def test_bench_fold_torchvision_detectors(name: str) -> None:
    """BatchNorm2d (SSDlite) and FrozenBatchNorm2d (Faster R-CNN) backbones fold too."""
    import torchvision

    from dds_perception.benchmarks.candidates import torchvision_detector

    del torchvision
    candidate = torchvision_detector(name, frame=(60, 190))
    net = candidate.network
    _randomize_bn(net)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x)
        folded = copy.deepcopy(net)
        fold_batchnorm(folded, x)
        got = folded(x)
    assert count_batchnorm(folded) == 0
    for a, b in zip(_flat(got), _flat(expected), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_bench_split_pyramid_is_exact_after_folding() -> None:
    """Splitting the producers changes no dot product (NHWC vs NCHW kernels: rounding only)."""
    model = get_model("dds_mobilenet_v2", num_classes=0).eval()
    _randomize_bn(model)
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fold_batchnorm(model, x)
        expected = model(x)
        merge_pyramid_branches(model)
        assert split_pyramid_producers(model) == 17
        got = model(x.contiguous(memory_format=torch.channels_last))
    blocks = [m for m in model.modules() if isinstance(m, SplitPyramidBlock)]
    # every block's projection reads the branches one by one: no concatenation is left
    assert all(b.project is not None and b.tail is None for b in blocks)
    assert [len(b.project) for b in blocks] == [len(b.branches) for b in blocks]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)


def test_bench_merge_pyramid_is_exact() -> None:
    model = get_model("dds_mobilenet_v2", num_classes=0).eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(x)
        merged = copy.deepcopy(model)
        # stages with dilations {1,1,2,3} (7 blocks) and {1,1,1,2} (4 blocks) have equal pairs
        assert merge_pyramid_branches(merged) == 11
        got = merged(x)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_bench_fold_skips_a_conv_whose_output_is_reused() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # y is read twice: folding would change the sum

    model = Reuse().eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model, x) == 0
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(Reuse().train(), x)
    # the user-facing backend refuses fp16 on a CPU unless asked (the bench's precision table)
    from dds_perception.deploy.backends import BackendError, TorchBackend

    with pytest.raises(BackendError, match="CUDA"):
        TorchBackend(model, device="cpu", half=True, input_size=(8, 8))
    half = TorchBackend(model, device="cpu", half=True, input_size=(8, 8), cpu_half=True)
    assert half(torch.zeros(1, 3, 8, 8, dtype=torch.float16)).dtype == torch.float16


# ----------------------------------------------------------------------------- helpers
def test_bench_macs_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_model_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 3 * 9 * 10 * 10
    dw = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, stride=2, bias=False)
    assert count_model_macs(dw, torch.zeros(1, 16, 10, 10)) == 16 * 9 * 5 * 5
    linear = nn.Linear(20, 5)
    assert count_macs(lambda: linear(torch.zeros(4, 20))) == 4 * 20 * 5
    assert count_parameters(linear) == 20 * 5 + 5


def test_bench_timing_and_memory_helpers() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    timings = measure_interleaved({"a": bump("a"), "b": bump("b")}, warmup=2, repeats=5)
    assert calls == {"a": 7, "b": 7}
    assert set(timings) == {"a", "b"} and timings["a"].repeats == 5
    before = calls["a"]
    single = measure(bump("a"), warmup=1, repeats=3)  # torch.utils.benchmark.Timer's blocks
    assert single.warmup == 1 and single.repeats == len(single.samples_ms) >= 1
    assert calls["a"] > before + 1 and single.min_ms <= single.median_ms <= single.max_ms
    stats = summarize([3.0, 1.0, 2.0], warmup=0)
    assert (stats.median_ms, stats.min_ms, stats.max_ms) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="repeats"):
        summarize([], warmup=0)

    def allocate() -> None:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block.add_(1)

    peak = measure_peak_memory(allocate)
    assert peak.peak_rss_delta_mb >= 48, peak


def test_bench_reuse_freed_memory_switches_glibc_and_back() -> None:
    """Freed feature maps stay in the heap: the same buffer comes back without a new mmap."""
    import ctypes
    import sys

    from dds_perception.utils.runtime import reuse_freed_memory

    if not sys.platform.startswith("linux"):
        assert reuse_freed_memory() is False
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    size = 48 * 2**20  # a 1 x 96 x 192 x 640 float32 map: served by mmap under glibc defaults

    def is_mmapped(pointer: int) -> bool:
        # glibc's chunk header: bit 1 of the size field marks an mmap'd chunk
        return bool(
            ctypes.c_size_t.from_address(pointer - ctypes.sizeof(ctypes.c_size_t)).value & 2
        )

    try:
        assert reuse_freed_memory(False)
        block = libc.malloc(2**31)  # bigger than any free heap space: glibc's default is mmap
        assert is_mmapped(block)
        libc.free(block)
        assert reuse_freed_memory(True)
        block = libc.malloc(size)
        assert not is_mmapped(block)  # from the heap, and kept there after free
        libc.free(block)
    finally:
        reuse_freed_memory(True)


def test_freed_memory_reuse_restores_what_was_there_before() -> None:
    """A command's opt-in (nested blocks, e.g. the bench's per-call settings inside a node-like
    outer block) ends with the state from before, not with glibc's defaults."""
    import ctypes
    import sys

    from dds_perception.deploy.runtime import freed_memory_reuse, reusing_freed_memory

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def heap_keeps_big_blocks() -> bool:
        block = libc.malloc(2**31)  # mmap'd unless glibc keeps freed memory (mmap_max 0)
        mapped = bool(
            ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2
        )
        libc.free(block)
        return not mapped

    start = reusing_freed_memory()
    with freed_memory_reuse(True):
        assert reusing_freed_memory() and heap_keeps_big_blocks()
        with freed_memory_reuse(False):  # e.g. the bench's "reuse_memory=off" call
            assert not reusing_freed_memory() and not heap_keeps_big_blocks()
        assert reusing_freed_memory() and heap_keeps_big_blocks()  # the outer block's state
        with freed_memory_reuse(True):  # already on: nothing changes, nothing is undone
            pass
        assert heap_keeps_big_blocks()
    assert reusing_freed_memory() == start


def test_bench_compile_section_is_reported() -> None:
    """The compile section's table (its measurements need inductor: the GPU script runs it)."""
    from dds_perception.benchmarks.suites import COMPILE_VARIANTS

    timing = {"median_ms": 2.0, "min_ms": 1.5, "max_ms": 3.0}
    section = {
        "models": ["dds_rpn_s32", "ssd300_vgg16"],
        "rows": [
            {
                "variant": v,
                "model": "dds_rpn_s32",
                "meaning": COMPILE_VARIANTS[v][0],
                "first_call_s": 12.0,
                "latency_ms": timing,
            }
            for v in ("eager", "compile")
        ],
        "errors": [{"variant": "compile", "model": "ssd300_vgg16", "error": "no compiler"}],
    }
    from dds_perception.benchmarks.report import _compile

    text = "\n".join(_compile(section))
    assert "## torch.compile options" in text
    assert "| compile | dds_rpn_s32 | 2.00 (1.50-3.00) | 12.0 |" in text
    assert "not measured: compile of ssd300_vgg16: no compiler" in text
