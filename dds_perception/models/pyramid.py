"""The paper's block: a pyramid of depthwise dilated 3x3 convolutions inside an inverted residual.

The expanded channels are split into K equal groups; group k is filtered by a depthwise 3x3
convolution with dilation ``d_k`` (the MixConv pattern), the K outputs are concatenated and
projected by a linear 1x1 convolution. Weights and MACs equal MobileNetV2's depthwise stage; the
only extra parameters are the PReLU slopes. ``fusion=True`` adds ESPNetv2's hierarchical feature
fusion (branch k-1's output added to branch k before the concatenation).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from dds_perception.utils.errors import UsageError


def prelu(channels: int) -> partial[nn.PReLU]:
    """A per-channel PReLU factory in the shape torchvision's conv blocks expect."""
    return partial(nn.PReLU, num_parameters=channels)


class PyramidDepthwiseConv(nn.Module):
    """K parallel depthwise 3x3 convolutions with one dilation each, on equal channel groups.

    BatchNorm and PReLU follow the concatenation; one BatchNorm over C channels has exactly the
    parameters of K BatchNorms over C/K channels, and normalises each channel the same way.
    """

    def __init__(
        self, channels: int, stride: int, dilations: Sequence[int], fusion: bool = False
    ) -> None:
        super().__init__()
        k = len(dilations)
        if k == 0 or channels % k:
            raise UsageError(f"{channels} channels cannot be split into {k} dilation groups")
        self.split = channels // k
        self.dilations = tuple(int(d) for d in dilations)
        self.fusion = fusion
        self.branches = nn.ModuleList(
            nn.Conv2d(
                self.split,
                self.split,
                kernel_size=3,
                stride=stride,
                padding=d,
                dilation=d,
                groups=self.split,
                bias=False,
            )
            for d in self.dilations
        )
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.branches) == 1:
            y = self.branches[0](x)
        else:
            outputs = []
            for part, conv in zip(torch.split(x, self.split, dim=1), self.branches, strict=True):
                out = conv(part)
                if self.fusion and outputs:
                    out = out + outputs[-1]
                outputs.append(out)
            y = torch.cat(outputs, dim=1)
        return self.act(self.bn(y))


class PyramidInvertedResidual(nn.Module):
    """1x1 expansion (PReLU) -> pyramid depthwise dilated 3x3 (PReLU) -> linear 1x1 projection."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        dilations: Sequence[int],
        fusion: bool = False,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise UsageError(f"stride must be 1 or 2, got {stride}")
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                Conv2dNormActivation(
                    inp, hidden, kernel_size=1, activation_layer=prelu(hidden), inplace=None
                )
            )
        layers += [
            PyramidDepthwiseConv(hidden, stride, dilations, fusion),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def dense_depthwise(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    """The pyramid's depthwise branches (channel groups in order, any dilations) as ONE depthwise
    convolution with a ``(2D+1) x (2D+1)`` kernel, D the largest dilation.

    Branch k computes ``y[c, p] = sum_i w[c, i] * x[c, s*p + d_k * (i - 1)]`` over the 3x3
    taps ``i`` (zero padding ``d_k``); the dense kernel holds ``w[c, i]`` at offset
    ``D + d_k * (i - 1)`` and zeros where the dilation leaves holes, with padding D and the
    same stride, so every output is the same sum of the same products (plus exact zeros):
    identical up to float summation order. It costs ``(2D+1)^2 / 9`` times the multiply-adds
    (9x for dilation 4), so whether it pays is measured per device (``detection.optimize``).
    """
    first = convs[0]
    stride, dtype, device = first.stride, first.weight.dtype, first.weight.device
    for conv in convs:
        if (
            conv.groups != conv.in_channels
            or conv.in_channels != conv.out_channels
            or conv.kernel_size != (3, 3)
            or conv.dilation[0] != conv.dilation[1]
            or conv.padding != conv.dilation
            or conv.stride != stride
            or conv.padding_mode != "zeros"
        ):
            raise UsageError(f"not a pyramid branch (3x3 depthwise, padding = dilation): {conv}")
    reach = max(conv.dilation[0] for conv in convs)
    size = 2 * reach + 1
    channels = sum(conv.out_channels for conv in convs)
    has_bias = any(conv.bias is not None for conv in convs)
    dense = nn.Conv2d(
        channels, channels, size, stride=stride, padding=reach, groups=channels, bias=has_bias
    ).to(device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.zero_()
        if has_bias:
            dense.bias.zero_()
        start = 0
        for conv in convs:
            stop, d = start + conv.out_channels, conv.dilation[0]
            taps = slice(reach - d, reach + d + 1, d)  # offsets D-d, D, D+d
            dense.weight[start:stop, :, taps, taps] = conv.weight
            if conv.bias is not None:
                dense.bias[start:stop] = conv.bias
            start = stop
    return dense
