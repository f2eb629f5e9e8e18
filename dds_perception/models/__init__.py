"""Networks: the paper's pyramid dilated MobileNetV2 and its baselines, built by name.

>>> from dds_perception.models import get_model
>>> net = get_model("dds_mobilenet_v2", num_classes=102)
>>> net.feature_info["layer17"]
FeatureInfo(channels=320, stride=32)
"""

from dds_perception.models import mobilenetv1, mobilenetv2, shufflenetv1  # noqa: F401 (register)
from dds_perception.models.common import FEATURE_NAMES, Backbone, FeatureInfo
from dds_perception.models.mobilenetv2 import DDS_STAGES, StageCfg
from dds_perception.models.registry import get_model, list_models, register_model

__all__ = [
    "DDS_STAGES",
    "FEATURE_NAMES",
    "Backbone",
    "FeatureInfo",
    "StageCfg",
    "get_model",
    "list_models",
    "register_model",
]
