"""Parameter and multiply-accumulate (MAC) counts.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` while the network runs once
on the given input, so they follow the real shapes (dilation, groups, stride, the detector's
input size). FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matrix
products (conv, mm, addmm, bmm, baddbmm, SDPA) and nothing for element-wise work (BatchNorm,
PReLU, additions, concatenation, pooling, NMS); we report ``MACs = FLOPs / 2``, the convention
of the paper and of torchvision's model tables ("GFLOPS" there are in fact GMACs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(fn: Callable[[], Any]) -> int:
    """MACs of one call of ``fn`` (convolutions and matrix products; FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops() // 2


def count_model_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model(example)``."""
    return count_macs(lambda: model(example))
