"""Pieces shared by every backbone: feature taps, the classification head, initialisation."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dds_perception.utils.errors import UsageError

# The detector's feature maps, named after the proposed network's Table 3 rows.
FEATURE_NAMES = ("layer13", "layer17")


class FeatureInfo(NamedTuple):
    """Channels and stride of a named feature map, known without running the model."""

    channels: int
    stride: int


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10% (torchvision)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Backbone(nn.Module):
    """A stack of layers ``features`` with named taps, plus an optional classification head.

    Subclasses fill ``self.features`` (an ``nn.Sequential``), ``self.taps`` (feature name ->
    index into ``features``) and ``self.feature_info``, then call ``self._build_head``.
    ``num_classes=0`` builds the backbone only: ``forward`` then returns the feature dict.
    """

    features: nn.Sequential
    taps: dict[str, int]
    feature_info: dict[str, FeatureInfo]
    head: nn.Module | None

    def _build_head(
        self, in_channels: int, num_classes: int, dropout: float, last: nn.Module | None
    ) -> None:
        if num_classes < 0:
            raise UsageError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = None
            return
        layers: list[nn.Module] = [] if last is None else [last]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if dropout > 0:
            layers.append(nn.Dropout(p=dropout))
        layers.append(nn.Linear(in_channels, num_classes))
        self.head = nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the layers up to the last tap; return every tapped map by name."""
        wanted = {index: name for name, index in self.taps.items()}
        last = max(wanted)
        out: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                out[wanted[index]] = x
            if index == last:
                break
        return out

    def forward_head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classify the deepest feature map (layer 18 conv, pooling, classifier)."""
        if self.head is None:
            raise RuntimeError("this backbone was built with num_classes=0: it has no head")
        return self.head(features["layer17"])

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        features = self.forward_features(x)
        if self.head is None:
            return features
        return self.forward_head(features)


def init_weights(module: nn.Module) -> None:
    """Kaiming initialisation as in torchvision's MobileNets (the paper's 'He' initialiser)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
