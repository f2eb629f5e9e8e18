"""k-fold cross-validation of a detector recipe on a small labelled set (e.g. 60 real frames).

The frames of ``--data-root`` (``--split``, default every frame) are dealt into ``--folds``
seeded folds; fold ``k`` trains the recipe on the other folds (plus any ``--sources``) and
validates on its own frames. Each fold is an ordinary ``train-detector`` run under
``OUT/fold{k}`` (resumable: a finished fold is kept, a killed one continues from its
checkpoint). The report gives each fold's Car AP, their mean and spread, and the pooled
out-of-fold AP (every frame scored by the one model that never saw it), in ``crossval.json``
and ``crossval.md``. ``--eval-input-sizes`` scores the same fold models at other letterbox
input sizes too (the network is fully convolutional), so that the deployed input size is
chosen by cross-validated AP rather than on the frames it is reported on; ``--eval-nms-ious``
and ``--eval-vote-ious`` do the same for the post-processing's NMS and box-voting IoUs, and
``--eval-refine-top-ks`` for the number of candidates the second stage refines and
``--eval-refine-score-weights`` for the weight of its IoU output in their scores (no retraining
either). ``--eval-with`` scores every sweep with other settings than the models' own, e.g. each
score weight with 64 refined candidates.

examples:
  dds-perception crossval --config config/train/detector_kitti.yaml \\
      --data-root ../shared/data/kitti_sample --split all --folds 5 --out runs/cv_kitti
  dds-perception crossval --config config/train/detector_kitti.yaml \\
      --data-root ../shared/data/kitti_sample --split all --folds 5 --out runs/cv_kitti \\
      --only-fold 2                                   # one fold (e.g. one per machine)
  dds-perception crossval --config config/train/detector_kitti.yaml \\
      --data-root ../shared/data/kitti_sample --split all --folds 3 --out runs/cv_kitti \\
      --eval-input-sizes 384x1248 352x1152 320x1024  # AP of the same models at each size
  dds-perception crossval ... --eval-nms-ious 0.4 0.6 0.7  # and with each NMS IoU
  dds-perception crossval ... --eval-vote-ious 0 0.6 0.7    # and each box voting IoU (0: off)
  dds-perception crossval ... --eval-refine-top-ks 32 64    # and each second-stage top-k
  dds-perception crossval ... --eval-refine-score-weights 0 1  # and its IoU output's weight
  dds-perception crossval ... --eval-with refine_top_k=64 --eval-refine-score-weights 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dds_perception.data.detection_dataset import KittiDetectionDataset
from dds_perception.data.kitti import KittiLayout, kfold_splits, write_split
from dds_perception.data.transforms import DetectionEvalTransform
from dds_perception.detection.weights import load_detector
from dds_perception.engine.common import RecipeOptions, parse_recipe_args
from dds_perception.engine.detection import (
    CHECKPOINT,
    WEIGHTS,
    _split,
    add_training_arguments,
    predict_dataset,
)
from dds_perception.engine.detection import (
    main as train_main,
)
from dds_perception.evaluation.kitti import evaluate as kitti_evaluate
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_open, write_json

DIFFICULTIES = ("easy", "moderate", "hard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """train-detector's options plus the folds."""
    add_training_arguments(parser)
    group = RecipeOptions(parser).group("cross-validation")
    group.add_argument("--folds", type=int, default=5, help="number of folds (k)")
    group.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    group.add_argument(
        "--only-fold", type=int, default=None, help="train this fold only (0-based), no report"
    )
    group.add_argument(
        "--eval-with",
        type=parse_eval_setting,
        nargs="+",
        default=[],
        metavar="SETTING=VALUE",
        help="score the --eval-... sweeps with these settings instead of the fold models' own "
        "(e.g. refine_top_k=64: each sweep then varies one setting of that configuration)",
    )
    for sweep in SWEEPS:
        group.add_argument(
            sweep.flag,
            type=sweep.parse,
            nargs="+",
            default=[],
            metavar=sweep.metavar,
            help=f"also score the fold models {sweep.help}",
        )


def parse_input_size(text: str) -> tuple[int, int]:
    """``"352x1152"`` -> (352, 1152): an input size, height first."""
    height, sep, width = text.lower().partition("x")
    try:
        size = (int(height), int(width))
    except ValueError:
        size = None
    if not sep or size is None or min(size) <= 0 or size[0] % 32 or size[1] % 32:
        raise argparse.ArgumentTypeError(
            f"input size {text!r}: need HEIGHTxWIDTH, both positive multiples of 32"
        )
    return size


def parse_iou(text: str) -> float:
    """``"0.6"`` -> 0.6: an IoU in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"IoU {text!r}: need a number in [0, 1]")
    return value


def parse_eval_setting(text: str) -> tuple[str, Any]:
    """``"refine_top_k=64"`` -> ("refine_top_k", 64): a setting the ``--eval-...`` sweeps vary,
    parsed as its sweep parses it."""
    name, sep, value = text.partition("=")
    parsers = {sweep.setting: sweep.parse for sweep in SWEEPS}
    if not sep or name not in parsers:
        raise argparse.ArgumentTypeError(
            f"{text!r}: need SETTING=VALUE, SETTING one of {', '.join(parsers)}"
        )
    try:
        return name, parsers[name](value)
    except ValueError as error:  # int() of the top-k
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error


parse_arguments = parse_recipe_args


@dataclass(frozen=True)
class Sweep:
    """One ``--eval-...`` option: the fold models scored again with each of its values for one
    :func:`score_folds` setting (no retraining), reported as one more table."""

    setting: str  # score_folds' keyword, and the key of its value in each scoring
    parse: Callable[[str], Any]
    metavar: str
    help: str  # completes "also score the fold models ..."
    what: str  # completes "The same fold models ..." above the report's table
    column: str
    show: Callable[[Any], str] = "{:g}".format

    @property
    def key(self) -> str:
        """The summary's key for the list of scorings (``input_sizes``)."""
        return f"{self.setting}s"

    @property
    def dest(self) -> str:
        """The option's argparse destination (``eval_input_sizes``)."""
        return f"eval_{self.key}"

    @property
    def flag(self) -> str:
        """The option (``--eval-input-sizes``)."""
        return "--" + self.dest.replace("_", "-")


SWEEPS = (
    Sweep(
        "input_size",
        parse_input_size,
        "HxW",
        "at these letterbox input sizes (multiples of 32)",
        "at other input sizes",
        "input (HxW)",
        lambda size: "x".join(map(str, size)),
    ),
    Sweep(
        "nms_iou",
        parse_iou,
        "IOU",
        "(at their own input size) with these NMS IoUs",
        "with other NMS IoUs",
        "NMS IoU",
    ),
    Sweep(
        "vote_iou",
        parse_iou,
        "IOU",
        "(at their own input size) with these box voting IoUs (0: no voting)",
        "with other box voting IoUs (0: none)",
        "voting IoU",
    ),
    Sweep(
        "refine_top_k",
        int,
        "K",
        "with their second stage refining K candidates per image",
        "with the second stage refining other numbers of candidates",
        "refined per image",
    ),
    Sweep(
        "refine_score_weight",
        parse_iou,
        "W",
        "with the second stage's IoU output at these weights in the refined candidates' "
        "scores (0: the first stage's score alone)",
        "with the second stage's IoU output weighed otherwise in the scores",
        "IoU output's weight",
    ),
)


def _fold_args(args: argparse.Namespace, out: Path, k: int) -> argparse.Namespace:
    fold = copy.copy(args)
    fold.split = str(out / "splits" / f"fold{k}_train.txt")
    fold.val_split = str(out / "splits" / f"fold{k}_val.txt")
    fold.out = out / f"fold{k}"
    fold.resume = "auto" if (fold.out / CHECKPOINT).is_file() else None
    return fold


def _ap_table(result: Any) -> dict[str, float]:
    return {d: result.ap("Car", d, "AP_40") for d in DIFFICULTIES}


def crossval(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train every fold that is not done, then pool and report (see the module docstring)."""
    if args.out is None or args.data_root is None:
        raise UsageError("--out and --data-root are required")
    out = Path(args.out)
    layout = KittiLayout.find(args.data_root)
    ids = KittiDetectionDataset(args.data_root, _split(args.split)).frame_ids
    folds = kfold_splits(ids, args.folds, args.fold_seed)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    for k, (train_ids, val_ids) in enumerate(folds):
        write_split(out / "splits" / f"fold{k}_train.txt", train_ids)
        write_split(out / "splits" / f"fold{k}_val.txt", val_ids)
    todo = range(args.folds) if args.only_fold is None else [args.only_fold]
    for k in todo:
        if not 0 <= k < args.folds:
            raise UsageError(f"--only-fold {k}: folds are 0..{args.folds - 1}")
        fold = _fold_args(args, out, k)
        if (fold.out / WEIGHTS).is_file() and (fold.out / "summary.json").is_file():
            print(f"fold {k}: done earlier ({fold.out / WEIGHTS})")
            continue
        print(f"fold {k}: {len(folds[k][0])} training frames, {len(folds[k][1])} validation")
        train_main(fold)
    if args.only_fold is not None:
        return None
    return report(args, out, folds, layout)


def score_folds(
    args: argparse.Namespace,
    out: Path,
    folds: list[tuple[list[str], list[str]]],
    input_size: tuple[int, int] | None = None,
    nms_iou: float | None = None,
    vote_iou: float | None = None,
    refine_top_k: int | None = None,
    refine_score_weight: float | None = None,
) -> dict[str, Any]:
    """Each fold model on its own validation frames (at ``input_size``, default the size it was
    saved with; with ``nms_iou``, ``vote_iou``, ``refine_top_k`` and ``refine_score_weight``,
    default its own): per-fold
    AP, their mean, spread and range, and the pooled out-of-fold AP."""
    device = torch.device("cpu")
    detections: dict[str, list] = {}
    ground_truth: dict[str, list] = {}
    per_fold = []
    for k, (_, val_ids) in enumerate(folds):
        model = load_detector(
            out / f"fold{k}" / WEIGHTS,
            input_size=input_size,
            refine_top_k=refine_top_k,
            refine_score_weight=refine_score_weight,
        )
        val = KittiDetectionDataset(
            args.data_root, val_ids, DetectionEvalTransform(model.config.input_size)
        )
        found = predict_dataset(
            model,
            val,
            device=device,
            score_threshold=args.eval_score_threshold,
            nms_iou=nms_iou,
            vote_iou=vote_iou,
        )
        truth = {fid: val.objects(i) for i, fid in enumerate(val.frame_ids)}
        per_fold.append(_ap_table(kitti_evaluate(truth, found, classes=("Car",))))
        detections.update(found)
        ground_truth.update(truth)
    pooled = kitti_evaluate(ground_truth, detections, classes=("Car",))
    return {
        "input_size": list(model.config.input_size),
        "nms_iou": model.config.nms_iou if nms_iou is None else nms_iou,
        "vote_iou": model.config.vote_iou if vote_iou is None else vote_iou,
        "refine_top_k": model.config.refine_top_k,
        "refine_score_weight": model.config.refine_score_weight,
        "frames": len(ground_truth),
        "per_fold": per_fold,
        "mean": {d: statistics.mean(f[d] for f in per_fold) for d in DIFFICULTIES},
        "std": {d: statistics.pstdev(f[d] for f in per_fold) for d in DIFFICULTIES},
        "min": {d: min(f[d] for f in per_fold) for d in DIFFICULTIES},
        "max": {d: max(f[d] for f in per_fold) for d in DIFFICULTIES},
        "pooled": _ap_table(pooled),
    }


def report(
    args: argparse.Namespace, out: Path, folds: list[tuple[list[str], list[str]]], layout
) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold Car AP_40 of the trained folds (also at each value of
    the ``--eval-...`` sweeps, with the ``--eval-with`` settings); writes the report."""
    scores = score_folds(args, out, folds)
    base = dict(args.eval_with)
    summary: dict[str, Any] = {
        "data_root": str(layout.root),
        "folds": args.folds,
        "fold_seed": args.fold_seed,
        **scores,
        # the sweeps' baseline row: the models at the --eval-with settings
        **(
            {"eval_with": base, "eval_with_scores": score_folds(args, out, folds, **base)}
            if base
            else {}
        ),
        **{
            sweep.key: [
                score_folds(args, out, folds, **{**base, sweep.setting: value})
                for value in getattr(args, sweep.dest)
            ]
            for sweep in SWEEPS
        },
        "fold_summaries": [
            json.loads((out / f"fold{k}" / "summary.json").read_text(encoding="utf-8"))
            for k in range(len(folds))
        ],
    }
    write_json(out / "crossval.json", summary)
    with atomic_open(out / "crossval.md", "w", encoding="utf-8") as handle:
        handle.write(markdown(summary) + "\n")
    print(markdown(summary))
    return summary


def _pooled_cells(scores: dict[str, Any]) -> str:
    """Per difficulty "pooled (mean ± std)", as Markdown table cells."""
    return " | ".join(
        f"{scores['pooled'][d]:.1f} ({scores['mean'][d]:.1f} ± {scores['std'][d]:.1f})"
        for d in DIFFICULTIES
    )


def markdown(summary: dict[str, Any]) -> str:
    """The report as a Markdown table (Car AP_40, percent)."""
    lines = [
        f"Car AP_40 (%), {summary['folds']}-fold cross-validation over {summary['frames']} "
        f"frames of {summary['data_root']}",
        "",
        "| | easy | moderate | hard |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, fold in enumerate(summary["per_fold"]):
        lines.append(f"| fold {k} | " + " | ".join(f"{fold[d]:.1f}" for d in DIFFICULTIES) + " |")
    mean, std = summary["mean"], summary["std"]
    spread = " | ".join(f"{mean[d]:.1f} ± {std[d]:.1f}" for d in DIFFICULTIES)
    lines.append(f"| mean ± std | {spread} |")
    lines.append(
        "| pooled out-of-fold | "
        + " | ".join(f"**{summary['pooled'][d]:.1f}**" for d in DIFFICULTIES)
        + " |"
    )
    base = summary.get("eval_with", {})
    show = {sweep.setting: sweep.show for sweep in SWEEPS}
    given = "".join(f", {name} {show[name](value)}" for name, value in base.items())
    for sweep in SWEEPS:
        if summary.get(sweep.key):
            lines += [
                "",
                f"The same fold models {sweep.what} (pooled out-of-fold; mean ± std of folds"
                f"{given}):",
                "",
                f"| {sweep.column} | easy | moderate | hard |",
                "| --- | ---: | ---: | ---: |",
            ]
            for scores in [summary.get("eval_with_scores", summary), *summary[sweep.key]]:
                shown = sweep.show(scores[sweep.setting])
                lines.append(f"| {shown} | {_pooled_cells(scores)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Cross-validate with the resolved arguments (recipe applied by :func:`parse_arguments`)."""
    crossval(args)
    return 0
