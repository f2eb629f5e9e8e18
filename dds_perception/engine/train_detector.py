"""Train the car detector (backbone + RPN head) on KITTI-format data; validate with KITTI AP.

A YAML recipe (--config) sets the defaults; options given on the command line win. Any
DetectorConfig field can be overridden with --set KEY=VALUE. The run folder gets args.yaml,
metrics.jsonl (JSON lines), checkpoint.pt after every epoch (--resume continues exactly),
eval.md, and at the end model.safetensors (self-describing weights) and summary.json.

examples:
  dds-perception make-scenes data/scenes --frames 400
  dds-perception train-detector --config config/train/detector_synthetic.yaml \
      --data-root data/scenes --out runs/det_synth
  dds-perception train-detector --config config/train/detector_synthetic.yaml \
      --data-root data/scenes --out runs/det_synth --resume        # continue a killed run
  dds-perception train-detector --data-root ~/data/kitti --split ~/data/kitti/train.txt \
      --val-split ~/data/kitti/val.txt --backbone-weights runs/c101_dds/model.safetensors \
      --out runs/det_kitti --set fg_iou=0.7 --use-layer13
  torchrun --nproc_per_node 4 -m dds_perception.cli train-detector --data-root ~/data/kitti \
      --split ~/data/kitti/train.txt --val-split ~/data/kitti/val.txt --out runs/det_kitti
"""

from __future__ import annotations

from dds_perception.engine.common import training_command
from dds_perception.engine.detection import add_training_arguments, main

add_arguments, parse_arguments, run = training_command(add_training_arguments, main)
