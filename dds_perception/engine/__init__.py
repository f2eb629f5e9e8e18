"""Training and evaluation recipes: backbone classification (Caltech) and the detector (KITTI).

``common`` holds what every recipe shares: torchrun setup, YAML recipe files, AMP, RNG states,
atomic checkpoints, JSON-lines metrics.
"""
