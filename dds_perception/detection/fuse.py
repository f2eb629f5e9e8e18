"""Fold BatchNorm into the preceding convolution for inference (fewer passes over memory on CPU).

Inside every ``nn.Sequential`` (torchvision's ``Conv2dNormActivation`` is one), a ``Conv2d``
directly followed by a ``BatchNorm2d`` becomes one conv with folded weights and bias, and the
BatchNorm an ``nn.Identity``. Only sequential containers are touched: there the call order is the
registration order, so the folding is exact. The pyramid block's single BatchNorm after its
concatenated dilated branches (``models.pyramid.PyramidDepthwiseConv`` without hierarchical fusion)
is folded slice by slice into the branch convolutions. Used by the pipeline at load time (eval
mode only).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from dds_perception.models.pyramid import PyramidDepthwiseConv


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold BatchNorm into convolutions in place (model must be in eval mode); return the count."""
    if model.training:
        raise ValueError("fuse_conv_bn needs a model in eval mode (BatchNorm uses running stats)")
    fused = 0
    for module in model.modules():
        if isinstance(module, PyramidDepthwiseConv):
            fused += _fuse_pyramid(module)
            continue
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


def _fuse_pyramid(module: PyramidDepthwiseConv) -> int:
    """Fold the BatchNorm after the concatenation into each branch (its channel slice)."""
    norm = module.bn
    if module.fusion or not isinstance(norm, nn.BatchNorm2d) or not norm.track_running_stats:
        return 0  # with hierarchical fusion a branch's output feeds the next: not foldable
    start = 0
    with torch.no_grad():
        for conv in module.branches:
            end = start + conv.out_channels
            part = slice(start, end)
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean[part], norm.running_var[part],
                norm.eps, norm.weight[part], norm.bias[part],
            )  # fmt: skip
            conv.weight, conv.bias = weight, bias
            start = end
    if start != norm.num_features:
        raise ValueError(f"pyramid branches cover {start} of {norm.num_features} channels")
    module.bn = nn.Identity()
    return 1


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm layers left (what :func:`fuse_conv_bn` could not fold)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
