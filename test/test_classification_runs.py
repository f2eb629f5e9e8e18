"""Classifier runs on the device pipeline: four models side by side, checkpoints in parts,
a deadline that stops at a checkpoint, exact resumes, and the shared training loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds_perception import cli
from dds_perception.engine import checkpoint_parts
from dds_perception.engine import classification as engine
from dds_perception.engine import loop as loop_module
from dds_perception.engine.common import DistributedContext, TrainingError, read_metrics
from dds_perception.engine.compare_backbones import PAPER_MODELS
from dds_perception.utils.checkpoint import CheckpointError, load_weights

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of noisy colour JPEGs of a few sizes (16 each), one folder per class."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(COLORS):
        for i in range(16):
            h, w = 28 + (i % 3) * 6, 30 + (i % 4) * 5
            pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 40, (h, w, 3)), 0, 255)
            path = root / f"class{label}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return root


def _argv(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "folder", "--data-root", str(data), "--out", str(out),
        "--width-mult", "0.25", "--input-size", "32", "--eval-resize", "36",
        "--test-size", "0.25", "--batch-size", "12", "--lr", "0.05", "--lr-milestones", "1",
        "--workers", "0", "--device", "cpu", "--no-progress", "--pipeline", "device",
        "--cache-dir", str(cache), "--eval-every-steps", "2", "--log-every-steps", "1", *extra,
    ]  # fmt: skip


def _same_weights(a: Path, b: Path) -> None:
    first, _ = load_weights(a)
    second, _ = load_weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_four_models_side_by_side_train_as_four_separate_runs(colours, tmp_path) -> None:
    """One batch stream, four models, four optimizers: each ends with the weights (and the
    test accuracies) of the same model trained alone with the same seed."""
    cache = tmp_path / "cache"
    together = tmp_path / "together"
    epochs = ("--epochs", "2", "--max-steps-per-epoch", "2")
    args = engine.parse_args(_argv(colours, together / "unused", cache, *epochs))
    runs = {name: together / name for name in PAPER_MODELS}
    summaries = engine.train_models(
        args, DistributedContext(), runs, split_path=together / "split.json"
    )
    assert set(summaries) == set(PAPER_MODELS)
    for name in PAPER_MODELS:
        alone = tmp_path / "alone" / name
        split = ("--split-file", str(together / "split.json"), "--model", name)
        summary = engine.main(engine.parse_args(_argv(colours, alone, cache, *epochs, *split)))
        assert summary["steps"] == summaries[name]["steps"] == 4
        _same_weights(together / name / engine.WEIGHTS, alone / engine.WEIGHTS)
        evals = [r for r in read_metrics(alone / engine.METRICS) if r["type"] == "eval"]
        side = [r for r in read_metrics(together / name / engine.METRICS) if r["type"] == "eval"]
        assert [(r["step"], r["top1"]) for r in evals] == [(r["step"], r["top1"]) for r in side]
        assert (together / name / "args.yaml").read_text().count(f"model: {name}") == 1


def test_compare_backbones_side_by_side_table_and_model_list(colours, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare-backbones", "--side-by-side", *_argv(colours, out, tmp_path / "cache")]
    argv += ["--epochs", "1", "--max-steps-per-epoch", "2", "--table-steps", "2"]
    assert cli.main([*argv, "--models", "mobilenet_v2", "shufflenet_v1"]) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert [row["model"] for row in table["rows"]] == ["mobilenet_v2", "shufflenet_v1"]
    assert all(row["finished"] and row["top1_at_step"]["2"] is not None for row in table["rows"])
    assert json.loads((out / "models.json").read_text())["models"] == [
        "mobilenet_v2",
        "shufflenet_v1",
    ]
    capsys.readouterr()
    assert cli.main([*argv, "--models", "mobilenet_v2", "mobilenet_v1"]) == 1
    err = capsys.readouterr().err
    assert "trains the models ['mobilenet_v2', 'shufflenet_v1'] side by side" in err


def test_resume_from_checkpoint_parts_is_exact(colours, tmp_path, monkeypatch) -> None:
    """Checkpoints cut into 40 KiB parts (every part file within the limit); a run killed in
    its third epoch resumes from the parts to the weights of an uninterrupted run."""
    cache = tmp_path / "cache"
    common = ("--epochs", "3", "--max-steps-per-epoch", "2", "--checkpoint-part-mb", "0.0390625")
    straight = engine.main(
        engine.parse_args(_argv(colours, tmp_path / "straight", cache, *common))
    )

    real_begin = engine.ClassifierLoop.begin_epoch

    def killed_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # the process dies after the epoch-1 checkpoint
        return real_begin(self, epoch)

    killed = tmp_path / "killed"
    monkeypatch.setattr(engine.ClassifierLoop, "begin_epoch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.main(engine.parse_args(_argv(colours, killed, cache, *common)))
    monkeypatch.setattr(engine.ClassifierLoop, "begin_epoch", real_begin)
    manifest = checkpoint_parts.read_manifest(killed / engine.CHECKPOINT)
    assert manifest["latest"]["epoch"] == 2 and manifest["previous"]["epoch"] == 1
    parts = manifest["latest"]["parts"]
    assert len(parts) > 1
    on_disk = sorted(p.name for p in killed.glob("checkpoint-*.part*"))
    listed = [p["file"] for e in (manifest["latest"], manifest["previous"]) for p in e["parts"]]
    assert on_disk == sorted(listed)
    assert all((killed / name).stat().st_size <= 40 * 1024 for name in on_disk)
    assert not (killed / engine.WEIGHTS).exists()

    resumed = engine.main(engine.parse_args(_argv(colours, killed, cache, *common, "--resume")))
    assert resumed["steps"] == straight["steps"] == 6
    _same_weights(tmp_path / "straight" / engine.WEIGHTS, killed / engine.WEIGHTS)
    steps = [r["step"] for r in read_metrics(killed / engine.METRICS) if r["type"] == "epoch"]
    assert steps == [2, 4, 6]  # no repeated or missing epoch

    # resuming with another model, pipeline or seed is refused with the key named
    for option, value in (("--model", "mobilenet_v1"), ("--pipeline", "loader"), ("--seed", "1")):
        copy = tmp_path / f"copy{option}"
        shutil.copytree(killed, copy)
        argv = _argv(colours, copy, cache, *common, "--epochs", "4", "--resume", option, value)
        with pytest.raises(TrainingError, match=f"{option[2:]}="):
            engine.main(engine.parse_args(argv))


def test_checkpoint_parts_are_verified_and_recompressed(tmp_path) -> None:
    manifest = tmp_path / "checkpoint.json"
    state = {"weights": torch.randn(40_000), "step": 7, "nested": {"m": torch.arange(5)}}
    checkpoint_parts.save_parts(manifest, state, epoch=3, step=7, part_bytes=50_000)
    loaded = checkpoint_parts.load_parts(manifest)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["step"] == 7
    size = checkpoint_parts.recompress(manifest)
    assert size < 0.95 * 40_000 * 4  # float32 bytes shrink losslessly
    again = checkpoint_parts.load_parts(manifest)
    assert torch.equal(again["weights"], state["weights"])
    assert torch.equal(again["nested"]["m"], state["nested"]["m"])
    entry = checkpoint_parts.read_manifest(manifest)["latest"]
    assert entry["encoding"] == "shuffle4-zlib" and entry["epoch"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.part*")) == sorted(
        p["file"] for p in entry["parts"]
    )
    victim = tmp_path / entry["parts"][-1]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"part {victim}.* truncated or altered"):
        checkpoint_parts.load_parts(manifest)
    victim.unlink()
    with pytest.raises(CheckpointError, match="part missing"):
        checkpoint_parts.load_parts(manifest)
    with pytest.raises(CheckpointError, match="no checkpoint after epoch 9"):
        checkpoint_parts.load_parts(manifest, epoch=9)


class _FakeTime:
    """A clock that moves only when told (``advance``): deadlines without wall-clock time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


class _CountingLoop(loop_module.TrainingLoop):
    """A loop whose every step takes ten (fake) seconds."""

    def __init__(self, clock: _FakeTime) -> None:
        self.clock, self.saved = clock, []

    def begin_epoch(self, epoch):
        return [0]

    def train_step(self, batch, *, epoch, step):
        self.clock.now += 10.0
        return loop_module.StepResult(images=1, values={"loss": 1.0})

    def learning_rate(self):
        return 0.1

    def save(self, *, epoch, step, last_eval):
        self.saved.append(epoch)


@pytest.mark.parametrize("every,saved", [(1, [1, 2, 3]), (2, [2])])
def test_fit_stops_at_a_checkpoint_before_the_deadline(monkeypatch, every, saved) -> None:
    """Epochs of 10 s, deadline 35 s away: fit stops where the next due checkpoint would come
    too late, and writes one there."""
    clock = _FakeTime()
    monkeypatch.setattr(loop_module, "time", clock)
    loop = _CountingLoop(clock)
    options = loop_module.FitOptions(
        epochs=10, checkpoint_every_epochs=every, deadline=clock.now + 35.0
    )
    state = loop_module.fit(loop, options, DistributedContext())
    assert state.stopped and state.epoch == saved[-1] and loop.saved == saved
    # past the deadline: nothing runs, the last checkpoint stands
    clock.now = options.deadline
    state = loop_module.fit(loop, options, DistributedContext(), state)
    assert state.stopped and state.epoch == saved[-1] and loop.saved == saved


def test_deadline_stop_then_resume_gives_the_uninterrupted_weights(
    colours, tmp_path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    common = ("--epochs", "4", "--max-steps-per-epoch", "1")
    engine.main(engine.parse_args(_argv(colours, tmp_path / "straight", cache, *common)))
    clock = _FakeTime()
    monkeypatch.setattr(loop_module, "time", clock)
    real_step = engine.ClassifierLoop.train_step

    def slow_step(self, batch, *, epoch, step):
        clock.now += 10.0
        return real_step(self, batch, epoch=epoch, step=step)

    monkeypatch.setattr(engine.ClassifierLoop, "train_step", slow_step)
    out = tmp_path / "limited"
    args = engine.parse_args(_argv(colours, out, cache, *common))
    summary = engine.train(args, DistributedContext(), deadline=clock.now + 25.0)
    assert summary["stopped"] and summary["epochs_done"] == 2
    assert not (out / engine.WEIGHTS).exists()
    assert checkpoint_parts.saved_epochs(out / engine.CHECKPOINT)[0] == 2
    monkeypatch.undo()
    engine.main(engine.parse_args(_argv(colours, out, cache, *common, "--resume")))
    _same_weights(tmp_path / "straight" / engine.WEIGHTS, out / engine.WEIGHTS)


def test_caltech256_subset_device_pipeline_smoke(caltech256_root, tmp_path) -> None:
    """The real Caltech-256 layout (5 classes, full-size JPEGs, greyscale ones too) through the
    decoded cache and the device augmentation: a few steps, finite loss, a table row."""
    argv = [
        "--dataset", "caltech256", "--data-root", str(caltech256_root),
        "--out", str(tmp_path / "run"), "--width-mult", "0.25", "--input-size", "48",
        "--test-size", "0.2", "--batch-size", "32", "--epochs", "1", "--max-steps-per-epoch",
        "3", "--workers", "2", "--device", "cpu", "--no-progress", "--pipeline", "device",
        "--cache-dir", str(tmp_path / "cache"), "--eval-batch-size", "64",
    ]  # fmt: skip
    summary = engine.main(engine.parse_args(argv))
    assert summary["num_classes"] == 5 and summary["steps"] == 3
    assert summary["train_images"] + summary["test_images"] == 533
    assert 0.0 <= summary["top1"] <= 100.0
    records = read_metrics(tmp_path / "run" / engine.METRICS)
    assert all(np.isfinite(r["loss"]) for r in records if r["type"] in ("train", "epoch"))


def test_throughput_tool_measures_every_mode(colours, tmp_path) -> None:
    """The first step of scripts/gpu_caltech.sh, on CPU: every mode runs and is recorded."""
    from dds_perception.engine import throughput

    out = tmp_path / "throughput.json"
    argv = [*_argv(colours, tmp_path / "unused", tmp_path / "cache"), "--json", str(out)]
    argv += ["--models", "mobilenet_v2", "shufflenet_v1", "--steps", "2", "--warmup", "1"]
    assert throughput.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["training"]) == {"mobilenet_v2", "shufflenet_v1", "side_by_side"}
    assert result["training"]["side_by_side"]["models"] == ["mobilenet_v2", "shufflenet_v1"]
    for measured in (result["augment"], result["loader"], *result["training"].values()):
        assert measured["images"] == 2 * 12 and measured["images_per_s"] > 0
