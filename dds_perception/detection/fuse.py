"""Fold BatchNorm into the preceding convolution for inference (fewer passes over memory on CPU).

Inside every ``nn.Sequential`` (torchvision's ``Conv2dNormActivation`` is one), a ``Conv2d``
directly followed by a ``BatchNorm2d`` becomes one conv with folded weights and bias, and the
BatchNorm an ``nn.Identity``. Only sequential containers are touched: there the call order is the
registration order, so the folding is exact. Used by the pipeline at load time (eval mode only).
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold BatchNorm into convolutions in place (model must be in eval mode); return the count."""
    if model.training:
        raise ValueError("fuse_conv_bn needs a model in eval mode (BatchNorm uses running stats)")
    fused = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = module._modules[first], module._modules[second]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.track_running_stats
                and conv.out_channels == norm.num_features
            ):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
                fused += 1
    return fused


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm layers left (what :func:`fuse_conv_bn` could not fold)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
