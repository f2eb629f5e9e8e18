"""dds_perception: a pyramid depthwise-dilated MobileNetV2 vehicle detector for ROS 2.

Layers import downward only (see the README): ``cli``/``ros.node`` -> ``ros`` -> ``pipeline`` ->
``engine``/``evaluation`` -> ``detection`` -> ``models`` -> ``data`` -> ``utils``.
"""

__version__ = "0.1.0"
