"""MobileNetV1 (Howard et al., 2017): a stem conv then 13 depthwise separable layers."""

from __future__ import annotations

from torch import nn
from torchvision.ops import Conv2dNormActivation

from dds_perception.models.common import Backbone, FeatureInfo, init_weights, make_divisible
from dds_perception.models.registry import register_model
from dds_perception.utils.errors import UsageError

# c, s: output channels and stride of each depthwise separable layer (the paper's Table 1).
MOBILENET_V1_LAYERS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),  # 11: last stride-16 layer -> "layer13" tap
    (1024, 2),
    (1024, 1),  # 13: stride 32 -> "layer17" tap
)


def depthwise_separable(inp: int, out: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
    return nn.Sequential(
        Conv2dNormActivation(inp, inp, stride=stride, groups=inp, activation_layer=nn.ReLU),
        Conv2dNormActivation(inp, out, kernel_size=1, activation_layer=nn.ReLU),
    )


class MobileNetV1(Backbone):
    """MobileNetV1 with BatchNorm and ReLU; taps at strides 16 and 32."""

    def __init__(
        self, *, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise UsageError(f"width_mult must be positive, got {width_mult}")
        stem = make_divisible(32 * width_mult, 8)
        layers: list[nn.Module] = [Conv2dNormActivation(3, stem, stride=2)]
        strides, channels, inp = [2], [stem], stem
        for c, s in MOBILENET_V1_LAYERS:
            out = make_divisible(c * width_mult, 8)
            layers.append(depthwise_separable(inp, out, s))
            strides.append(strides[-1] * s)
            channels.append(out)
            inp = out
        self.features = nn.Sequential(*layers)
        self.taps = {"layer13": 11, "layer17": 13}
        self.feature_info = {n: FeatureInfo(channels[i], strides[i]) for n, i in self.taps.items()}
        self._build_head(inp, num_classes, dropout, None)
        init_weights(self)


@register_model("mobilenet_v1")
def mobilenet_v1(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs) -> MobileNetV1:
    """MobileNetV1, the paper's first baseline."""
    return MobileNetV1(num_classes=num_classes, width_mult=width_mult, **kwargs)
