"""Top-1 / top-5 accuracy of a trained classifier on its saved test split.

The weights file describes the network, its classes and its input size; the test split is the
run's split.json (by default the one beside the weights file), so the numbers are the ones the
training run measured on the same images.

examples:
  dds-perception evaluate-classifier --weights runs/c101_dds/model.safetensors \
      --dataset caltech101 --data-root ~/data/caltech101
  dds-perception evaluate-classifier --weights runs/c256/model.safetensors --dataset caltech256 \
      --data-root ~/data/caltech256 --split-file runs/c256/split.json --json c256_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dds_perception.engine.classification import evaluate_weights
from dds_perception.utils.io import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="model.safetensors")
    parser.add_argument(
        "--dataset", choices=("caltech101", "caltech256", "folder"), default="caltech101"
    )
    parser.add_argument("--data-root", type=Path, required=True, help="dataset folder")
    parser.add_argument(
        "--split-file", type=Path, default=None, help="default: split.json beside --weights"
    )
    parser.add_argument(
        "--drop-background",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Caltech-101 without BACKGROUND_Google (default: as the weights were trained)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run(args: argparse.Namespace) -> int:
    result = evaluate_weights(
        args.weights,
        dataset=args.dataset,
        data_root=args.data_root,
        split_file=args.split_file,
        drop_background=args.drop_background,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=args.progress,
    )
    print(json.dumps(result, indent=2))
    if args.json is not None:
        write_json(args.json, result)
    return 0
