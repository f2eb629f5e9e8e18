"""KITTI 2D detection AP (AP_11 and AP_40) with the official devkit's semantics.

Result files: one NNNNNN.txt per image, KITTI's 16 fields per line with the score last, an
empty file for an image without detections. The table goes to stdout; --json writes
{"Car": {"easy": {"AP_11": .., "AP_40": ..}, ...}, "mAP_11": .., "mAP_40": ..} (percent; mAP
is the paper's mean of easy, moderate and hard Car AP) and --plots writes PR curves as PNG.

examples:
  dds-perception evaluate --labels kitti/training/label_2 --results out/results
  dds-perception evaluate --labels kitti/training/label_2 --results out/results \\
      --split splits/val.txt --classes Car,Pedestrian,Cyclist --json ap.json --plots plots/
  # a generated KITTI-validation-sized set (3,769 frames) to try it on or to time it:
  python -m dds_perception.evaluation.synthetic /tmp/evalset
  dds-perception evaluate --labels /tmp/evalset/label_2 --results /tmp/evalset/results
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from dds_perception.evaluation.kitti import (
    EVAL_CLASSES,
    KittiEvalWarning,
    evaluate_folders,
    write_json_result,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--labels",
        required=True,
        metavar="DIR",
        help="ground truth: a label_2 folder (or a KITTI root holding one)",
    )
    parser.add_argument(
        "--results",
        required=True,
        metavar="DIR",
        help="detections: one NNNNNN.txt per frame (or the devkit's DIR/data)",
    )
    parser.add_argument(
        "--split",
        metavar="FILE",
        help="frame ids to evaluate, one per line (default: every label file)",
    )
    parser.add_argument(
        "--classes",
        default="Car",
        metavar="LIST",
        help=f"comma-separated, from {','.join(EVAL_CLASSES)} (default: Car)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the APs as JSON (percent)")
    parser.add_argument("--plots", metavar="DIR", help="write precision/recall PNGs here")


def run(args: argparse.Namespace) -> int:
    classes = [c for c in (s.strip() for s in args.classes.split(",")) if c]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KittiEvalWarning)
        result = evaluate_folders(args.labels, args.results, split=args.split, classes=classes)
    for warning in caught:
        print(f"dds-perception evaluate: warning: {warning.message}", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(result.markdown(), end="")
    print(f"evaluated in {seconds:.2f} s (reading files included)")
    if args.json:
        write_json_result(args.json, result)
        print(f"wrote {args.json}")
    if args.plots:
        for path in result.save_plots(args.plots):
            print(f"wrote {path}")
    return 0
