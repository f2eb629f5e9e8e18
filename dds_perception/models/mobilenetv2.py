"""MobileNetV2 and the paper's pyramid depthwise dilated separable MobileNetV2 (Table 3).

Both are built from one table in torchvision's ``# t, c, n, s`` form; the proposed network adds a
dilations column (one dilation per depthwise branch, so its length is K). Layer numbering follows
the paper: layer 0 is the stem, layers 1-17 the inverted residual blocks, layer 18 the 1x1 conv
to 1280 channels (part of the classification head here), layers 19-20 pooling and classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops import Conv2dNormActivation

from dds_perception.models.common import Backbone, FeatureInfo, init_weights, make_divisible
from dds_perception.models.pyramid import PyramidInvertedResidual, prelu
from dds_perception.models.registry import register_model
from dds_perception.utils.errors import UsageError


@dataclass(frozen=True)
class StageCfg:
    """One row of the table: ``repeats`` blocks of expansion ``expand`` to ``channels``."""

    expand: int
    channels: int
    repeats: int
    stride: int
    dilations: tuple[int, ...] = (1,)


# The paper's Table 3. Dilations per stage follow ESPNetv2's rule of limiting the effective
# kernel by the feature-map size (at 224 input): {1,2,3,4} at 112/56/28 px, {1,1,2,3} at 14 px,
# {1,1,1,2} at 7 px. The stage's output resolution decides.
DDS_STAGES: tuple[StageCfg, ...] = (
    # t, c, n, s, dilations                   # paper layers
    StageCfg(1, 16, 1, 1, (1, 2, 3, 4)),  # 1       112x112
    StageCfg(6, 24, 2, 2, (1, 2, 3, 4)),  # 2-3     56x56
    StageCfg(6, 32, 3, 2, (1, 2, 3, 4)),  # 4-6     28x28
    StageCfg(6, 64, 4, 2, (1, 1, 2, 3)),  # 7-10    14x14
    StageCfg(6, 96, 3, 1, (1, 1, 2, 3)),  # 11-13   14x14
    StageCfg(6, 160, 3, 2, (1, 1, 1, 2)),  # 14-16   7x7
    StageCfg(6, 320, 1, 1, (1, 1, 1, 2)),  # 17      7x7
)

# torchvision's inverted_residual_setting, one depthwise branch of dilation 1.
MOBILENET_V2_STAGES: tuple[StageCfg, ...] = tuple(
    StageCfg(s.expand, s.channels, s.repeats, s.stride) for s in DDS_STAGES
)


def parse_stages(stages: Sequence[StageCfg | Sequence]) -> tuple[StageCfg, ...]:
    """Accept ``StageCfg`` rows or ``[t, c, n, s, [dilations]]`` lists (from JSON/YAML)."""
    rows = []
    for i, row in enumerate(stages):
        if isinstance(row, StageCfg):
            rows.append(row)
            continue
        values = list(row)
        if len(values) not in (4, 5):
            raise UsageError(f"stage {i}: expected [t, c, n, s, dilations], got {row!r}")
        dilations = tuple(values[4]) if len(values) == 5 else (1,)
        rows.append(StageCfg(*(int(v) for v in values[:4]), dilations=dilations))
    return tuple(rows)


def validate_stages(
    stages: Sequence[StageCfg],
    stem_channels: int,
    width_mult: float,
    round_to: int,
    branches: int | None = None,
) -> None:
    """Fail up front, naming the stage, for a table that cannot build.

    ``branches`` (K), when given, is the number of dilations every stage must list.
    """
    inp = stem_channels
    for i, s in enumerate(stages):
        if branches is not None and len(s.dilations) != branches:
            raise UsageError(
                f"stage {i} ({s}): {len(s.dilations)} dilations given but K = {branches}"
            )
        if s.stride not in (1, 2):
            raise UsageError(f"stage {i} ({s}): stride must be 1 or 2, got {s.stride}")
        if s.expand < 1 or s.repeats < 1 or s.channels < 1:
            raise UsageError(f"stage {i} ({s}): expansion, channels and repeats must be >= 1")
        if not s.dilations or any(int(d) != d or d < 1 for d in s.dilations):
            raise UsageError(f"stage {i} ({s}): dilations must be positive integers")
        out = make_divisible(s.channels * width_mult, round_to)
        k = len(s.dilations)
        for hidden in {inp * s.expand, out * s.expand} if s.repeats > 1 else {inp * s.expand}:
            if hidden % k:
                raise UsageError(
                    f"stage {i} ({s}): {hidden} expanded channels are not divisible by "
                    f"K={k} dilation branches"
                )
        inp = out


class MobileNetV2(Backbone):
    """MobileNetV2-shaped network from a stage table; ``pyramid=True`` gives the paper's net."""

    def __init__(
        self,
        stages: Sequence[StageCfg | Sequence] = MOBILENET_V2_STAGES,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        pyramid: bool = False,
        fusion: bool = False,
        branches: int | None = None,
        dropout: float = 0.2,
        round_nearest: int = 8,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise UsageError(f"width_mult must be positive, got {width_mult}")
        stages = parse_stages(stages)
        if not pyramid and any(len(s.dilations) != 1 or s.dilations[0] != 1 for s in stages):
            raise UsageError("dilations need pyramid=True (the plain MobileNetV2 has one branch)")
        stem = make_divisible(32 * width_mult, round_nearest)
        last = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        validate_stages(stages, stem, width_mult, round_nearest, branches)

        def act(channels: int) -> partial | type[nn.Module]:
            return prelu(channels) if pyramid else nn.ReLU6

        layers: list[nn.Module] = [
            Conv2dNormActivation(
                3, stem, stride=2, activation_layer=act(stem), inplace=None if pyramid else True
            )
        ]
        strides, channels = [2], [stem]
        inp = stem
        for s in stages:
            out = make_divisible(s.channels * width_mult, round_nearest)
            for r in range(s.repeats):
                stride = s.stride if r == 0 else 1
                if pyramid:
                    block = PyramidInvertedResidual(
                        inp, out, stride, s.expand, s.dilations, fusion
                    )
                else:
                    block = InvertedResidual(inp, out, stride, s.expand)
                layers.append(block)
                strides.append(strides[-1] * stride)
                channels.append(out)
                inp = out
        if len(layers) != 18:
            raise UsageError(
                f"the table must give 17 blocks (paper layers 1-17), got {len(layers) - 1}"
            )
        self.features = nn.Sequential(*layers)
        self.taps = {"layer13": 13, "layer17": 17}
        self.feature_info = {
            name: FeatureInfo(channels[i], strides[i]) for name, i in self.taps.items()
        }
        self.stages = stages
        head_conv = Conv2dNormActivation(
            inp, last, kernel_size=1, activation_layer=act(last), inplace=None if pyramid else True
        )
        self._build_head(last, num_classes, dropout, head_conv)
        init_weights(self)


@register_model("mobilenet_v2")
def mobilenet_v2(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2 with torchvision's block structure (ReLU6, BatchNorm)."""
    return MobileNetV2(
        MOBILENET_V2_STAGES, num_classes=num_classes, width_mult=width_mult, **kwargs
    )


@register_model("dds_mobilenet_v2")
def dds_mobilenet_v2(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stages: Sequence[StageCfg | Sequence] = DDS_STAGES,
    branches: int = 4,
    fusion: bool = False,
    **kwargs,
) -> MobileNetV2:
    """The paper's network: pyramid depthwise dilated separable blocks with PReLU.

    ``stages`` overrides the table (e.g. other dilations for an ablation) as
    ``[[t, c, n, s, [d1, ..., dK]], ...]``; ``branches`` is K, the number of parallel dilated
    depthwise convolutions every stage must list; ``fusion`` enables hierarchical feature fusion.
    """
    return MobileNetV2(
        stages,
        num_classes=num_classes,
        width_mult=width_mult,
        pyramid=True,
        fusion=fusion,
        branches=branches,
        **kwargs,
    )
