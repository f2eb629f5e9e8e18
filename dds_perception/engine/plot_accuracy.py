"""Plot test accuracy against training steps for one or several classifier runs.

Reads each run folder's metrics.jsonl (the "eval" records) and draws one line per run, labelled
with the run's model name (from args.yaml) or its folder name.

examples:
  dds-perception plot-accuracy runs/c101_dds runs/c101_mnv2 --out c101_accuracy.png
  dds-perception plot-accuracy runs/c256_* --metric top5 --out c256_top5.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dds_perception.engine.classification import plot_accuracy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--metric", choices=("top1", "top5"), default="top1")
    parser.add_argument("--title", default=None, help="plot title")


def run(args: argparse.Namespace) -> int:
    plot_accuracy(args.runs, args.out, metric=args.metric, title=args.title)
    print(f"wrote {args.out}")
    return 0
