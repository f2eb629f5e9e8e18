"""Train the four backbones with one protocol and write the paper-style accuracy table.

Every model is trained by the train-classifier recipe with the same options, the same seed and
the same train/test split (OUT/split.json), in OUT/<model>/. The table gives test top-1 accuracy
(%) at the chosen step counts (--table-steps; they should be multiples of --eval-every-steps),
plus the final top-1/top-5 and the parameter count, as OUT/comparison.md, .json and .png.
A finished model is not trained again and a killed one resumes, so rerunning the command after
an interruption continues where it stopped; --report-only rebuilds the table from the run folders.

--side-by-side trains the models together in one process on one stream of batches (one data
pipeline, one optimizer per model; with --pipeline device the data is decoded once and augmented
on the GPU): each model still ends with exactly the weights it would get alone, in its own run
folder. The model list is kept in OUT/models.json; resuming with another list is an error.
--max-minutes stops training at a checkpoint in time; rerun the command to continue.

examples:
  dds-perception compare-backbones --dataset caltech101 --data-root ~/data/caltech101 \
      --out runs/compare_c101 --config config/train/paper_caltech101.yaml
  dds-perception compare-backbones --dataset caltech256 \
      --data-root ../shared/data/caltech256_subset \
      --out /tmp/cmp --config config/train/smoke_cpu.yaml --table-steps 4 8
  dds-perception compare-backbones --side-by-side --pipeline device --max-minutes 9 \
      --dataset caltech101 --data-root ~/data/caltech101 --out runs/compare_c101 \
      --config config/train/paper_caltech101.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from dds_perception.engine.classification import (
    CHECKPOINT,
    METRICS,
    SPLIT,
    WEIGHTS,
    add_training_arguments,
    eval_records,
    plot_accuracy,
    train,
    train_models,
)
from dds_perception.engine.common import (
    DistributedContext,
    RecipeOptions,
    TrainingError,
    cleanup_distributed,
    init_distributed,
    parse_recipe_args,
)
from dds_perception.utils.checkpoint import read_meta
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_open, write_json

PAPER_MODELS = ("dds_mobilenet_v2", "mobilenet_v1", "mobilenet_v2", "shufflenet_v1")
MAX_DEFAULT_COLUMNS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, with_model=False)
    group = RecipeOptions(parser).group("comparison")
    group.add_argument(
        "--models", nargs="+", default=list(PAPER_MODELS), help="registry names to compare"
    )
    group.add_argument(
        "--table-steps",
        type=int,
        nargs="*",
        default=None,
        help="step counts of the table's columns (default: the steps every run evaluated at)",
    )
    group.add_argument(
        "--report-only",
        action="store_true",
        help="write the table from existing run folders without training",
    )
    group.add_argument(
        "--side-by-side",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the models together on one stream of batches (one data pipeline)",
    )


parse_arguments = parse_recipe_args


def train_all(
    args: argparse.Namespace, ctx: DistributedContext, *, deadline: float | None = None
) -> dict[str, Path]:
    """Train (or resume, or reuse) every model of ``args.models``; return their run folders."""
    if len(set(args.models)) != len(args.models):
        raise UsageError(f"--models names a model twice: {' '.join(args.models)}")
    out = Path(args.out)
    runs = {name: out / name for name in args.models}
    if args.report_only:
        return runs
    if args.side_by_side:
        _train_side_by_side(args, ctx, runs, deadline)
        return runs
    for name, run_dir in runs.items():
        if (run_dir / WEIGHTS).is_file():
            continue
        model_args = copy.copy(args)
        model_args.model = name
        model_args.out = run_dir
        model_args.split_file = args.split_file or out / SPLIT
        model_args.resume = "auto" if (run_dir / CHECKPOINT).is_file() else None
        if ctx.is_main:
            print(f"=== {name} -> {run_dir}")
        summary = train(model_args, ctx, deadline=deadline)
        if summary.get("stopped"):
            break  # out of time: the next models would stop at once
    return runs


def _check_model_list(out: Path, models: list[str], ctx: DistributedContext) -> None:
    """Record the side-by-side model list in OUT/models.json; refuse another one later."""
    record = out / "models.json"
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8")).get("models")
        if saved != list(models):
            raise TrainingError(
                f"{out} trains the models {saved} side by side; this run names {list(models)} "
                "(use the same --models, or another --out)"
            )
    elif ctx.is_main:
        write_json(record, {"models": list(models), "side_by_side": True})


def _train_side_by_side(
    args: argparse.Namespace,
    ctx: DistributedContext,
    runs: dict[str, Path],
    deadline: float | None,
) -> None:
    out = Path(args.out)
    _check_model_list(out, list(runs), ctx)
    todo = {name: run_dir for name, run_dir in runs.items() if not (run_dir / WEIGHTS).is_file()}
    if not todo:
        return
    resumable = sorted(name for name, run_dir in todo.items() if (run_dir / CHECKPOINT).is_file())
    if resumable and len(resumable) != len(todo):
        fresh = sorted(set(todo) - set(resumable))
        raise TrainingError(
            f"cannot train side by side: {', '.join(resumable)} have checkpoints in {out}, "
            f"{', '.join(fresh)} have none (train them with the others from the start, or "
            "without --side-by-side)"
        )
    group_args = copy.copy(args)
    group_args.split_file = args.split_file or out / SPLIT
    group_args.resume = "auto" if resumable else None
    if ctx.is_main:
        print(f"=== side by side: {', '.join(todo)} -> {out}")
    train_models(group_args, ctx, todo, split_path=Path(group_args.split_file), deadline=deadline)


def _default_steps(records: dict[str, list[dict[str, Any]]]) -> list[int]:
    common = None
    for recs in records.values():
        steps = {int(r["step"]) for r in recs}
        common = steps if common is None else common & steps
    steps = sorted(common or [])
    if len(steps) > MAX_DEFAULT_COLUMNS:  # evenly spaced, always with the last one
        stride = len(steps) / MAX_DEFAULT_COLUMNS
        steps = [steps[round((i + 1) * stride) - 1] for i in range(MAX_DEFAULT_COLUMNS)]
    return steps


def build_table(runs: dict[str, Path], table_steps: list[int] | None) -> dict[str, Any]:
    """Accuracy at each step for each run, plus final accuracy and parameter counts."""
    records = {name: eval_records(run_dir) for name, run_dir in runs.items()}
    steps = sorted(table_steps) if table_steps else _default_steps(records)
    rows = []
    for name, run_dir in runs.items():
        by_step = {int(r["step"]): r for r in records[name]}
        final = records[name][-1] if records[name] else {}
        params = None
        if (run_dir / WEIGHTS).is_file():
            meta = read_meta(run_dir / WEIGHTS)
            params = meta.get("metrics", {}).get("parameters")
        rows.append(
            {
                "model": name,
                "parameters": params,
                "top1_at_step": {
                    str(s): (by_step[s]["top1"] if s in by_step else None) for s in steps
                },
                "final_step": final.get("step"),
                "final_top1": final.get("top1"),
                "final_top5": final.get("top5"),
                "finished": (run_dir / WEIGHTS).is_file(),
            }
        )
    return {"steps": steps, "rows": rows}


def table_markdown(table: dict[str, Any], title: str) -> str:
    """The comparison as a markdown table (accuracy in percent, '-' where not measured)."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    steps = table["steps"]
    head = ["model", "params (M)", *[f"{s} steps" for s in steps], "final top-1", "final top-5"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table["rows"]:
        params = "-" if row["parameters"] is None else f"{row['parameters'] / 1e6:.2f}"
        cells = [
            row["model"] + ("" if row["finished"] else " (unfinished)"),
            params,
            *[pct(row["top1_at_step"][str(s)]) for s in steps],
            pct(row["final_top1"]),
            pct(row["final_top5"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test top-1 accuracy (%) at each step count; final = last evaluation.")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise UsageError("--out is required (the comparison folder)")
    deadline = time.monotonic() + 60.0 * args.max_minutes if args.max_minutes else None
    ctx = init_distributed(args.device)
    try:
        runs = train_all(args, ctx, deadline=deadline)
    finally:
        cleanup_distributed()
    if not ctx.is_main:
        return 0
    missing = [name for name, d in runs.items() if not (d / METRICS).is_file()]
    if missing and not args.max_minutes:
        raise UsageError(f"no run folder with {METRICS} for: {', '.join(missing)}")
    runs = {name: d for name, d in runs.items() if name not in missing}
    if not runs or not all(eval_records(d) for d in runs.values()):
        print("no test accuracy in every run yet: no table (rerun the command to continue)")
        return 0
    out = Path(args.out)
    table = build_table(runs, args.table_steps)
    table.update(dataset=args.dataset, data_root=str(args.data_root), out=str(out))
    title = f"Backbone comparison on {args.dataset} (test top-1 %, one protocol)"
    write_json(out / "comparison.json", table)
    with atomic_open(out / "comparison.md", "w", encoding="utf-8") as handle:
        handle.write(table_markdown(table, title))
    plot_accuracy(list(runs.values()), out / "comparison.png", title=title)
    print(table_markdown(table, title))
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'comparison.png'}")
    return 0
