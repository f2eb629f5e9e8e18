"""Train a backbone classifier on Caltech-101/256 or class folders (the paper's recipe).

Defaults are the paper's recipe: batch 512, 300 epochs, lr 0.045 halved at epochs
50,100,130,160,190,220,250,280, SGD with Nesterov momentum 0.9 and weight decay 4e-5 (ESPNetv2's
trainer; the paper names no optimizer), RandomResizedCrop 224 + flip, 2,000 held-out test images.
A YAML recipe (--config) sets the defaults; options given on the command line win.

examples:
  dds-perception train-classifier --model dds_mobilenet_v2 --dataset caltech101 \
      --data-root ~/data/caltech101 --out runs/c101_dds --config config/train/paper_caltech101.yaml
  dds-perception train-classifier --out runs/c101_dds --data-root ~/data/caltech101 \
      --config config/train/paper_caltech101.yaml --resume          # continue a killed run
  torchrun --nproc_per_node 4 -m dds_perception.cli train-classifier --dataset caltech256 \
      --data-root ~/data/caltech256 --out runs/c256_dds --config config/train/paper_caltech256.yaml
  dds-perception train-classifier --config config/train/smoke_cpu.yaml \
      --data-root ../shared/data/caltech256_subset --dataset caltech256 --out /tmp/smoke
"""

from __future__ import annotations

from dds_perception.engine.classification import add_training_arguments, main
from dds_perception.engine.common import training_command

add_arguments, parse_arguments, run = training_command(add_training_arguments, main)
