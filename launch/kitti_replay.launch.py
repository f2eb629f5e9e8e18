"""Play a KITTI bag into the detector node and record its /detections (ROS 2 Humble / Jazzy).

Examples:
  dds-perception kitti2bag KITTI/ kitti_val_bag --split val.txt
  ros2 launch dds_perception kitti_replay.launch.py bag:=kitti_val_bag output:=val_detections
  ros2 launch dds_perception kitti_replay.launch.py bag:=kitti_png_bag use_compressed:=true \
      device:=cuda:0 rate:=0.5
  dds-perception evaluate-bag --ground-truth kitti_val_bag --detections val_detections

Starts ``ros2 bag record`` (``/detections`` and ``/diagnostics``) and the ``detector_node`` of
this package (node ``dds_detector``, its ``image`` remapped to ``/kitti/camera/image_raw`` and
``image/compressed`` to ``/kitti/camera/image_raw/compressed``), then plays the bag after
``play_delay`` seconds (model load and warm-up). When the playback ends the launch shuts down
after ``linger`` seconds, so the recorder writes a complete bag. The node drops frames that
arrive while it is busy: lower ``rate`` when ``evaluate-bag`` reports frames without a
detections message.
"""

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    OpaqueFunction,
    RegisterEventHandler,
    TimerAction,
)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

IMAGE_TOPIC = "/kitti/camera/image_raw"  # as written by `dds-perception kitti2bag`

ARGUMENTS = (
    ("bag", None, "KITTI bag folder written by 'dds-perception kitti2bag'"),
    ("output", "kitti_detections", "folder 'ros2 bag record' creates (must not exist)"),
    (
        "params_file",
        PathJoinSubstitution([FindPackageShare("dds_perception"), "config", "detector.yaml"]),
        "YAML file with the node's 'dds_detector: ros__parameters:' block",
    ),
    ("weights", "", "detector weights (.safetensors); empty = the parameter file's value"),
    ("device", "", "auto, cpu, cuda or cuda:N; empty = the parameter file's value"),
    ("use_compressed", "false", "true for bags written with --compressed (PNG frames)"),
    ("rate", "1.0", "playback rate (KITTI bags are 10 Hz); lower it if frames are dropped"),
    ("play_delay", "5.0", "seconds to wait before playing (node start-up and warm-up)"),
    ("linger", "2.0", "seconds to keep recording after the playback ends"),
    ("storage", "mcap", "storage of the recorded bag: mcap or sqlite3"),
)


def _actions(context, *args, **kwargs):
    """Recorder, node and delayed playback, built once the arguments are known."""
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    flag = value["use_compressed"].strip().lower()
    if flag not in ("true", "false"):
        raise ValueError(f"use_compressed {value['use_compressed']!r}: use true or false")
    overrides = {"use_compressed": flag == "true"}
    for name in ("weights", "device"):
        if value[name]:
            overrides[name] = value[name]

    record = ExecuteProcess(
        cmd=[
            "ros2",
            "bag",
            "record",
            "-o",
            value["output"],
            "-s",
            value["storage"],
            "/detections",
            "/diagnostics",
        ],
        output="screen",
    )
    node = Node(
        package="dds_perception",
        executable="detector_node",
        name="dds_detector",
        parameters=[value["params_file"], overrides],
        remappings=[("image", IMAGE_TOPIC), ("image/compressed", f"{IMAGE_TOPIC}/compressed")],
        output="screen",
        emulate_tty=True,
    )
    play = ExecuteProcess(
        cmd=["ros2", "bag", "play", value["bag"], "--rate", value["rate"]],
        output="screen",
    )
    stop_after_play = RegisterEventHandler(
        OnProcessExit(
            target_action=play,
            on_exit=[
                TimerAction(
                    period=float(value["linger"]),
                    actions=[EmitEvent(event=Shutdown(reason="bag playback finished"))],
                )
            ],
        )
    )
    return [
        record,
        node,
        stop_after_play,
        TimerAction(period=float(value["play_delay"]), actions=[play]),
    ]


def generate_launch_description() -> LaunchDescription:
    """Declared arguments (each with a description), then recorder, node and playback."""
    declared = [
        DeclareLaunchArgument(name, description=description)
        if default is None
        else DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_actions)])
