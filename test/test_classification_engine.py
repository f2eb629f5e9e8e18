"""Classifier training recipe: config files, LR schedule, learning, exact resume, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds_perception import cli
from dds_perception.engine import classification as engine
from dds_perception.engine.common import ConfigError, TrainingError, read_metrics
from dds_perception.utils.checkpoint import load_weights, read_meta

REPO = Path(__file__).resolve().parents[1]
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread, above all on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of noisy 40x40 colour JPEGs (30 each) in the one-folder-per-class layout."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(COLORS):
        for i in range(30):
            noise = rng.normal(0, 40, (40, 40, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            path = root / f"class{label}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "folder", "--data-root", str(data), "--out", str(out),
        "--width-mult", "0.25", "--input-size", "32", "--eval-resize", "36",
        "--test-size", "0.25", "--batch-size", "15", "--lr", "0.02", "--lr-gamma", "0.1",
        "--workers", "0", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(colour_folders: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "colours"
    extra = ("--epochs", "15", "--lr-milestones", "10", "--eval-every-steps", "20")
    args = engine.parse_args(_argv(colour_folders, out, *extra))
    return out, engine.main(args)


def test_classification_short_run_learns(trained_run) -> None:
    out, summary = trained_run
    assert summary["steps"] == 15 * (90 // 15)
    assert summary["test_images"] == 30 and summary["num_classes"] == 4
    assert summary["top1"] >= 80.0  # chance is 25 %
    records = read_metrics(out / engine.METRICS)
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals][:3] == [6, 12, 18] and 20 in [r["step"] for r in evals]
    assert {r["type"] for r in records} == {"train", "eval", "epoch"}
    names = ("args.yaml", "split.json", "checkpoint.json", "summary.json", "model.safetensors")
    for name in names:
        assert (out / name).is_file(), name


def test_classification_weights_are_self_describing(trained_run) -> None:
    from dds_perception.models import get_model

    out, summary = trained_run
    state_dict, meta = load_weights(out / engine.WEIGHTS)
    assert meta["task"] == "classification"
    assert meta["class_names"] == ["class0", "class1", "class2", "class3"]
    assert meta["input_size"] == [32, 32]
    assert meta["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["recipe"]["optimizer"] == "SGD" and meta["recipe"]["nesterov"] is True
    assert meta["metrics"]["top1"] == summary["top1"]
    model = get_model(**meta["arch"])  # rebuilt from the file alone
    model.load_state_dict(state_dict)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_classification_evaluate_classifier_matches_training(trained_run, colour_folders) -> None:
    out, summary = trained_run
    result = engine.evaluate_weights(
        out / engine.WEIGHTS, dataset="folder", data_root=colour_folders, workers=0, device="cpu"
    )
    assert result["images"] == 30
    assert result["top1"] == pytest.approx(summary["top1"])
    assert result["top5"] == pytest.approx(summary["top5"])


def test_classification_plot_and_cli(trained_run, colour_folders, tmp_path, capsys) -> None:
    out, _ = trained_run
    png = tmp_path / "acc.png"
    assert cli.main(["plot-accuracy", str(out), str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = tmp_path / "eval.json"
    argv = ["evaluate-classifier", "--weights", str(out / engine.WEIGHTS), "--dataset", "folder"]
    argv += ["--data-root", str(colour_folders), "--workers", "0", "--device", "cpu"]
    assert cli.main([*argv, "--no-progress", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["images"] == 30
    # bad input: one clear line and exit status 1
    assert cli.main(["plot-accuracy", str(tmp_path), "--out", str(png)]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_classification_lr_schedule_paper_values() -> None:
    args = engine.parse_args([])  # the paper's defaults
    assert (args.batch_size, args.epochs, args.lr) == (512, 300, 0.045)
    assert (args.momentum, args.weight_decay, args.nesterov) == (0.9, 4e-5, True)
    optimizer, scheduler = engine.build_optimizer(torch.nn.Linear(2, 2), args)
    assert optimizer.param_groups[0]["nesterov"] is True
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # lr used during each epoch: 0.045 halved at 50, 100, 130, 160, 190, 220, 250, 280
    expected = {
        0: 0.045, 49: 0.045, 50: 0.0225, 99: 0.0225, 100: 0.01125, 130: 0.005625,
        160: 0.0028125, 190: 0.00140625, 220: 0.000703125, 250: 0.0003515625,
        279: 0.0003515625, 280: 0.00017578125, 299: 0.00017578125,
    }  # fmt: skip
    for epoch, value in expected.items():
        assert lrs[epoch] == pytest.approx(value, rel=1e-12), epoch
        assert engine.learning_rate_at(args, epoch) == pytest.approx(value, rel=1e-12)


def test_classification_config_file(tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 7\nlr-milestones: [3, 5]\nnesterov: false\nbatch_size: 8\n")
    args = engine.parse_args(["--config", str(config), "--batch-size", "512"])
    assert args.epochs == 7 and args.lr_milestones == [3, 5] and args.nesterov is False
    assert args.batch_size == 512  # the command line wins, even when it equals the default
    assert args.lr == 0.045  # untouched defaults stay
    config.write_text("epochs: 7\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        engine.parse_args(["--config", str(config)])
    config.write_text("epochs: seven\n")
    with pytest.raises(ConfigError, match="bad value for 'epochs'"):
        engine.parse_args(["--config", str(config)])
    for name in ("paper_caltech101", "paper_caltech256", "smoke_cpu"):
        args = engine.parse_args(["--config", str(REPO / "config" / "train" / f"{name}.yaml")])
        assert args.epochs >= 1
    paper = engine.parse_args(["--config", str(REPO / "config/train/paper_caltech101.yaml")])
    assert paper.lr_milestones == list(engine.PAPER_MILESTONES) and paper.lr_gamma == 0.5


@pytest.mark.parametrize("workers", ["0", "1"])
def test_classification_resume_is_exact(
    colour_folders: Path, tmp_path: Path, monkeypatch, workers: str
) -> None:
    common = ("--epochs", "2", "--max-steps-per-epoch", "3", "--lr-milestones", "1")
    common = (*common, "--workers", workers)  # 1: augmentation runs in a seeded worker
    whole = engine.main(engine.parse_args(_argv(colour_folders, tmp_path / "whole", *common)))

    real_begin = engine.ClassifierLoop.begin_epoch

    def killed_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies after the epoch-0 checkpoint
        return real_begin(self, epoch)

    monkeypatch.setattr(engine.ClassifierLoop, "begin_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.main(engine.parse_args(_argv(colour_folders, tmp_path / "killed", *common)))
    assert not (tmp_path / "killed" / engine.WEIGHTS).exists()
    monkeypatch.setattr(engine.ClassifierLoop, "begin_epoch", real_begin)

    # starting again over a run folder without --resume is refused
    with pytest.raises(TrainingError, match="already holds a run"):
        engine.main(engine.parse_args(_argv(colour_folders, tmp_path / "killed", *common)))
    resumed = engine.main(
        engine.parse_args(_argv(colour_folders, tmp_path / "killed", *common, "--resume"))
    )
    assert resumed["steps"] == whole["steps"] == 6
    a, _ = load_weights(tmp_path / "whole" / engine.WEIGHTS)
    b, _ = load_weights(tmp_path / "killed" / engine.WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["top1"] == whole["top1"]


def test_classification_resume_mismatch(trained_run, colour_folders, tmp_path: Path) -> None:
    out, _ = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    argv = _argv(colour_folders, copy, "--epochs", "16", "--resume")
    with pytest.raises(TrainingError, match=r"width_mult=0\.25.*width_mult=0\.5"):
        engine.main(engine.parse_args([*argv, "--width-mult", "0.5"]))
    with pytest.raises(TrainingError, match=r"model='dds_mobilenet_v2'.*model='mobilenet_v2'"):
        engine.main(engine.parse_args([*argv, "--model", "mobilenet_v2"]))
    with pytest.raises(TrainingError, match="no checkpoint"):
        engine.main(engine.parse_args(_argv(colour_folders, tmp_path / "none", "--resume")))


def test_classification_compare_backbones(colour_folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare-backbones", *_argv(colour_folders, out, "--epochs", "1")]
    argv += ["--models", "dds_mobilenet_v2", "mobilenet_v2", "--table-steps", "2", "5"]
    argv += ["--max-steps-per-epoch", "2", "--eval-every-steps", "2"]
    assert cli.main(argv) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert table["steps"] == [2, 5]
    assert [row["model"] for row in table["rows"]] == ["dds_mobilenet_v2", "mobilenet_v2"]
    for row in table["rows"]:
        assert row["top1_at_step"]["2"] is not None  # evaluated at step 2
        assert row["top1_at_step"]["5"] is None  # never reached: shown as '-'
        assert row["parameters"] > 0 and row["finished"]
    markdown = (out / "comparison.md").read_text()
    assert "| dds_mobilenet_v2 |" in markdown and "| - |" in markdown
    assert (out / "comparison.png").stat().st_size > 0
    # both models used the one shared split
    assert not (out / "dds_mobilenet_v2" / "split.json").exists()
    assert read_meta(out / "mobilenet_v2" / engine.WEIGHTS)["arch"]["name"] == "mobilenet_v2"
    # a second call trains nothing and rewrites the same table
    assert cli.main([*argv, "--report-only"]) == 0
    assert json.loads((out / "comparison.json").read_text())["rows"] == table["rows"]


def test_classification_bad_images_do_not_stop_training(colour_folders: Path, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(colour_folders, data)
    for name in ("bad_train.jpg", "bad_test.jpg"):
        (data / "class0" / name).write_bytes((data / "class0" / "000.jpg").read_bytes()[:300])
    train = [f"class{c}/{i:03d}.jpg" for c in range(4) for i in range(7)] + ["class0/007.jpg"]
    test = [f"class{c}/{i:03d}.jpg" for c in range(4) for i in range(20, 22)]
    split = {
        "format": "dds_perception.split/1", "dataset": "folder", "seed": 0,
        "class_names": ["class0", "class1", "class2", "class3"],
        "train": [*train, "class0/bad_train.jpg"], "test": [*test, "class0/bad_test.jpg"],
    }  # fmt: skip
    (tmp_path / "split.json").write_text(json.dumps(split))
    argv = _argv(
        data, tmp_path / "run", "--epochs", "1", "--split-file", str(tmp_path / "split.json")
    )
    with pytest.warns(UserWarning, match="unreadable image"):
        summary = engine.main(engine.parse_args(argv))
    assert summary["steps"] == 2 and summary["test_images"] == 9
    records = read_metrics(tmp_path / "run" / engine.METRICS)
    epoch = next(r for r in records if r["type"] == "epoch")
    final = [r for r in records if r["type"] == "eval"][-1]
    assert epoch["bad_images"] == 1 and epoch["images"] == 30  # replaced, batch stays full
    assert final["bad_images"] == 1 and final["images"] == 8  # dropped from the test batch


def test_classification_non_finite_loss_stops() -> None:
    from dds_perception.engine.common import check_finite

    check_finite(torch.tensor(2.5), epoch=0, step=1)
    with pytest.raises(TrainingError, match="loss is nan at epoch 3, step 7"):
        check_finite(torch.tensor(float("nan")), epoch=3, step=7)


def test_classification_cli_reports_bad_config(tmp_path: Path, capsys) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 3\nbatch: 64\n")
    argv = ["train-classifier", "--config", str(config), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "dds-perception train-classifier: error:" in err and "unknown key 'batch'" in err
    assert cli.main(["train-classifier", "--out", str(tmp_path / "run")]) == 1
    assert "--data-root is required" in capsys.readouterr().err
    argv = ["train-classifier", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    assert cli.main([*argv, "--dataset", "caltech256"]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
