"""Fold BatchNorm into the preceding convolution for inference (fewer passes over memory on CPU).

Inside every ``nn.Sequential`` (torchvision's ``Conv2dNormActivation`` is one), a ``Conv2d``
directly followed by a ``BatchNorm2d`` becomes one conv with folded weights and bias, and the
BatchNorm an ``nn.Identity``. Only sequential containers are touched: there the call order is the
registration order, so the folding is exact. The pyramid block's single BatchNorm after its
concatenated dilated branches (``models.pyramid.PyramidDepthwiseConv`` without hierarchical fusion)
is folded slice by slice into the branch convolutions, and the K dilated 3x3 branches are then
merged into ONE depthwise convolution whose (2D+1)x(2D+1) kernel (D = the largest dilation)
holds each branch's taps at its dilated positions and zeros elsewhere: the output is identical
(same centre, same padding arithmetic, stride 1 or 2) and on CPU one dense depthwise kernel ran
about 4x faster than the four dilated ones plus split/concatenation (measured: 290 ms vs 71 ms
for 144 channels at 96x312 under load). Used by the pipeline at load time (eval mode only).
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
    _merge_branches(module)
    return 1


def _merge_branches(module: PyramidDepthwiseConv) -> None:
    """Replace the dilated depthwise branches by one equivalent dense depthwise convolution."""
    branches = list(module.branches)
    if len(branches) < 2:
        return
    reach = max(conv.dilation[0] for conv in branches)
    size = 2 * reach + 1
    first = branches[0]
    channels = sum(conv.out_channels for conv in branches)
    merged = nn.Conv2d(
        channels, channels, size, stride=first.stride, padding=reach, groups=channels, bias=True
    )
    weight = torch.zeros_like(merged.weight)
    bias = torch.zeros_like(merged.bias)
    start = 0
    with torch.no_grad():
        for conv in branches:
            if conv.kernel_size != (3, 3) or conv.groups != conv.in_channels:
                return  # not a depthwise 3x3 branch: keep the original structure
            d, end = conv.dilation[0], start + conv.out_channels
            for a in range(3):
                for b in range(3):
                    weight[start:end, 0, reach + (a - 1) * d, reach + (b - 1) * d] = conv.weight[
                        :, 0, a, b
                    ]
            if conv.bias is not None:
                bias[start:end] = conv.bias
            start = end
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
    merged = merged.to(device=first.weight.device, dtype=first.weight.dtype)
    module.branches = nn.ModuleList([merged])


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm layers left (what :func:`fuse_conv_bn` could not fold)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
