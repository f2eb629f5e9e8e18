"""Start the dds_detector node with config/detector.yaml and the camera topic remapped.

Examples:
  ros2 launch dds_perception detector.launch.py image_topic:=/camera/image_raw
  ros2 launch dds_perception detector.launch.py image_topic:=/camera/image_raw \
      use_compressed:=true device:=cuda:0 namespace:=front
  ros2 launch dds_perception detector.launch.py params_file:=/path/to/my_detector.yaml
  ros2 launch dds_perception detector.launch.py image_topic:=/kitti/camera/image_raw \
      camera_height:=1.65     # distances from /kitti/camera/camera_info
  ros2 launch dds_perception detector.launch.py \
      image_topics:=/cam_front/image_raw,/cam_rear/image_raw    # one model, one batch

``weights``, ``device``, ``use_compressed`` and ``camera_height`` override the parameter file only
when given (their default, empty, keeps the file's value). The node's ``camera_info`` is remapped
to ``camera_info_topic``, by default the ``camera_info`` beside ``image_topic``.

``image_topics`` (comma-separated, or a YAML list ``[a, b]``) runs several cameras through the
model as one batch instead of ``image_topic``'s one: each camera's detections go to the topic
``detections`` beside its image topic (``/cam_front/image_raw`` -> ``/cam_front/detections``)
and its camera_info is the one beside it too.
"""

import yaml
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
    (
        "image_topics",
        "",
        "several cameras, one batch: their Image topics, comma-separated "
        "(/cam_front/image_raw,/cam_rear/image_raw); each camera's detections go to "
        "<camera>/detections; empty = the one camera of image_topic",
    ),
    ("weights", "", "detector weights (.safetensors); empty = the parameter file's value"),
    ("device", "", "auto, cpu, cuda or cuda:N; empty = the parameter file's value"),
    (
        "use_compressed",
        "",
        "true: subscribe <image_topic>/compressed (CompressedImage); empty = the file's value",
    ),
    ("namespace", "", "namespace of the node and its topics"),
    (
        "camera_info_topic",
        "",
        "sensor_msgs/CameraInfo topic, remapped to the node's 'camera_info'; empty = "
        "camera_info beside image_topic (/camera/image_raw -> /camera/camera_info)",
    ),
    (
        "camera_height",
        "",
        "camera height above the road in metres (KITTI 1.65) for distances; empty = the file's",
    ),
)


def camera_info_beside(image_topic: str) -> str:
    """image_transport's rule: ``/camera/image_raw`` -> ``/camera/camera_info``."""
    head, sep, _name = image_topic.strip().rstrip("/").rpartition("/")
    return f"{head}/camera_info" if sep else "camera_info"


def parse_topics(text: str) -> list[str]:
    """``/a/image_raw,/b/image_raw`` or ``[/a/image_raw, /b/image_raw]`` -> a list of topics
    (empty entries are kept: the node refuses them with the list in its message)."""
    if text.strip().startswith("["):
        topics = yaml.safe_load(text)
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise ValueError(f"image_topics {text!r}: a list of topic names, e.g. [/a, /b]")
        return [topic.strip() for topic in topics]
    return [topic.strip() for topic in text.split(",")]


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
    if value["camera_height"]:
        try:
            overrides["camera_height"] = float(value["camera_height"])
        except ValueError:
            raise ValueError(
                f"camera_height {value['camera_height']!r}: a number of metres, e.g. 1.65"
            ) from None
    if value["image_topics"].strip():
        overrides["image_topics"] = parse_topics(value["image_topics"])
        if value["camera_info_topic"]:
            raise ValueError(
                f"camera_info_topic {value['camera_info_topic']!r}: with image_topics each "
                "camera's camera_info is the one beside its image topic"
            )
    image_topic = value["image_topic"]
    camera_info = value["camera_info_topic"] or camera_info_beside(image_topic)
    return [
        Node(
            package="dds_perception",
            executable="detector_node",
            name="dds_detector",
            namespace=value["namespace"],
            parameters=[value["params_file"], overrides],
            remappings=[
                ("image", image_topic),
                ("image/compressed", f"{image_topic}/compressed"),
                ("camera_info", camera_info),
            ],
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
