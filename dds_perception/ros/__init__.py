"""ROS 2 glue that runs without ROS 2: message classes, conversions, bags, replay evaluation.

Nothing in this subpackage imports rclpy; only :mod:`dds_perception.ros.node` does. Message code
is written against a :class:`~dds_perception.ros.messages.MessageClasses` bundle, filled either
from a ``rosbags`` typestore (offline, tests, bags) or from the rclpy-generated modules (node).
"""
