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
