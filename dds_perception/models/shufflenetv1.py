"""ShuffleNet v1 (Zhang et al., 2018), the paper's ShuffleNet baseline (torchvision has only v2).

Stage outputs for g groups follow the ShuffleNet paper's Table 1; each unit is 1x1 group conv ->
channel shuffle -> depthwise 3x3 -> 1x1 group conv, with an average-pooled, concatenated shortcut
in the first (stride 2) unit of each stage. The first 1x1 of stage 2 is not grouped (24 inputs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.shufflenetv2 import channel_shuffle

from dds_perception.models.common import Backbone, FeatureInfo, init_weights, make_divisible
from dds_perception.models.registry import register_model
from dds_perception.utils.errors import UsageError

STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                  4: (272, 544, 1088), 8: (384, 768, 1536)}  # fmt: skip
STAGE_REPEATS = (4, 8, 4)


class ShuffleUnit(nn.Module):
    """A ShuffleNet v1 unit; stride 2 concatenates an average-pooled shortcut."""

    def __init__(self, inp: int, out: int, stride: int, groups: int, first_grouped: bool) -> None:
        super().__init__()
        self.stride = stride
        branch_out = out - inp if stride == 2 else out
        mid = out // 4
        g1 = groups if first_grouped else 1
        self.groups = g1
        self.conv1 = nn.Conv2d(inp, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if self.groups > 1:
            y = channel_shuffle(y, self.groups)
        y = self.bn2(self.conv2(y))
        y = self.bn3(self.conv3(y))
        if self.stride == 2:
            return F.relu(torch.cat((F.avg_pool2d(x, 3, stride=2, padding=1), y), dim=1))
        return F.relu(x + y)


class ShuffleNetV1(Backbone):
    """ShuffleNet v1 with ``groups`` in {1, 2, 3, 4, 8}; taps at the ends of stages 3 and 4."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        groups: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise UsageError(f"groups must be one of {sorted(STAGE_CHANNELS)}, got {groups}")
        if width_mult <= 0:
            raise UsageError(f"width_mult must be positive, got {width_mult}")
        # Channels rounded to multiples of 4*g so bottlenecks (out/4) split into g groups.
        unit = 4 * groups
        stem = make_divisible(24 * width_mult, unit) if width_mult != 1.0 else 24
        stem_layer = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = [stem_layer]
        stage_ends, strides, channels = [], [4], [stem]
        inp = stem
        for stage, (c, n) in enumerate(zip(STAGE_CHANNELS[groups], STAGE_REPEATS, strict=True)):
            out = make_divisible(c * width_mult, unit)
            units = [ShuffleUnit(inp, out, 2, groups, first_grouped=stage > 0)]
            units += [ShuffleUnit(out, out, 1, groups, True) for _ in range(n - 1)]
            layers.append(nn.Sequential(*units))
            strides.append(strides[-1] * 2)
            channels.append(out)
            stage_ends.append(len(layers) - 1)
            inp = out
        self.features = nn.Sequential(*layers)
        self.taps = {"layer13": stage_ends[1], "layer17": stage_ends[2]}
        self.feature_info = {n: FeatureInfo(channels[i], strides[i]) for n, i in self.taps.items()}
        self._build_head(inp, num_classes, dropout, None)
        init_weights(self)


@register_model("shufflenet_v1")
def shufflenet_v1(
    *, num_classes: int = 1000, width_mult: float = 1.0, groups: int = 3, **kwargs
) -> ShuffleNetV1:
    """ShuffleNet v1 (g = 3 by default, the configuration the paper compares against)."""
    return ShuffleNetV1(num_classes=num_classes, width_mult=width_mult, groups=groups, **kwargs)
