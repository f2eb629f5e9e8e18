"""Start the dds_detector node with config/detector.yaml and the camera topic remapped.

Examples:
  ros2 launch dds_perception detector.launch.py image_topic:=/camera/image_raw
  ros2 launch dds_perception detector.launch.py image_topic:=/camera/image_raw \
      use_compressed:=true device:=cuda:0 namespace:=front
  ros2 launch dds_perception detector.launch.py params_file:=/path/to/my_detector.yaml

``weights``, ``device`` and ``use_compressed`` override the parameter file only when given (their
default, empty, keeps the file's value).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = (
    (
        "params_file",
        PathJoinSubstitution([FindPackageShare("dds_perception"), "config", "detector.yaml"]),
        "YAML file with the node's 'dds_detector: ros__parameters:' block",
    ),
    (
        "image_topic",
        "/image_raw",
        "camera sensor_msgs/Image topic, remapped to the node's 'image'",
    ),
    ("weights", "", "detector weights (.safetensors); empty = the parameter file's value"),
    ("device", "", "auto, cpu, cuda or cuda:N; empty = the parameter file's value"),
    (
        "use_compressed",
        "",
        "true: subscribe <image_topic>/compressed (CompressedImage); empty = the file's value",
    ),
    ("namespace", "", "namespace of the node and its topics"),
)


def _node(context, *args, **kwargs):
    """Build the node once the arguments are known, overriding only the given parameters."""
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    overrides = {}
    if value["weights"]:
        overrides["weights"] = value["weights"]
    if value["device"]:
        overrides["device"] = value["device"]
    if value["use_compressed"]:
        flag = value["use_compressed"].strip().lower()
        if flag not in ("true", "false"):
            raise ValueError(f"use_compressed {value['use_compressed']!r}: use true or false")
        overrides["use_compressed"] = flag == "true"
    image_topic = value["image_topic"]
    return [
        Node(
            package="dds_perception",
            executable="detector_node",
            name="dds_detector",
            namespace=value["namespace"],
            parameters=[value["params_file"], overrides],
            remappings=[("image", image_topic), ("image/compressed", f"{image_topic}/compressed")],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    """Declared arguments (with descriptions) and the node."""
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_node)])
