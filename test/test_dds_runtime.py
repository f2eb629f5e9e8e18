"""DDS runtime pieces without a network: ROS 2 naming, domain ids, QoS, argument parsing,
the install hint when cyclonedds is absent, and the commands' --help."""

from __future__ import annotations

import sys

import pytest

from dds_perception.ros.dds import DdsError, require

cyclonedds = pytest.importorskip("cyclonedds", reason="needs cyclonedds (pip install '.[dds]')")

from dds_perception.ros.dds import play, record  # noqa: E402
from dds_perception.ros.dds import runtime as rt  # noqa: E402


@pytest.mark.parametrize(
    ("name", "namespace", "expected"),
    [
        ("image", "/", "rt/image"),
        ("/diagnostics", "/robot", "rt/diagnostics"),
        ("detections", "/robot", "rt/robot/detections"),
        ("image/compressed", "robot/", "rt/robot/image/compressed"),
        ("~/debug_image", "/", "rt/dds_detector/debug_image"),
        ("~/debug_image", "/robot", "rt/robot/dds_detector/debug_image"),
    ],
)
def test_dds_topic_names_follow_ros2(name: str, namespace: str, expected: str) -> None:
    assert rt.dds_topic(name, namespace, "dds_detector") == expected
    assert rt.ros_topic(expected) == expected[2:]


@pytest.mark.parametrize("bad", ["", "/", "9lives", "a//b", "a b", "~/x"])
def test_dds_invalid_topic_names_are_refused(bad: str) -> None:
    with pytest.raises(DdsError, match="topic"):
        rt.dds_topic(bad, "/", "")


def test_dds_domain_id_from_argument_env_or_zero(monkeypatch) -> None:
    monkeypatch.delenv("ROS_DOMAIN_ID", raising=False)
    assert rt.domain_id() == 0
    monkeypatch.setenv("ROS_DOMAIN_ID", "42")
    assert rt.domain_id() == 42
    assert rt.domain_id(7) == 7
    monkeypatch.setenv("ROS_DOMAIN_ID", "forty")
    with pytest.raises(DdsError, match="ROS_DOMAIN_ID='forty'"):
        rt.domain_id()
    with pytest.raises(DdsError, match=r"outside 0\.\.232"):
        rt.domain_id(233)


def test_dds_qos_profiles_match_the_node() -> None:
    from cyclonedds.qos import Policy

    sensor = rt.sensor_qos()
    assert sensor[Policy.Reliability] == Policy.Reliability.BestEffort
    assert sensor[Policy.History] == Policy.History.KeepLast(1)
    assert sensor[Policy.Durability] == Policy.Durability.Volatile
    assert isinstance(rt.sensor_qos("reliable")[Policy.Reliability], Policy.Reliability.Reliable)
    latched = rt.latched_qos()
    assert latched[Policy.Durability] == Policy.Durability.TransientLocal
    assert latched[Policy.History] == Policy.History.KeepLast(1)
    assert rt.reliable_qos(10)[Policy.History] == Policy.History.KeepLast(10)
    for qos in (sensor, latched, rt.reliable_qos()):  # XCDR1, as ROS 2 sends
        assert qos[Policy.DataRepresentation].use_cdrv0_representation
    with pytest.raises(DdsError, match="reliability"):
        rt.sensor_qos("sometimes")


def test_dds_record_and_play_arguments() -> None:
    assert record.parse_topic("/detections") == ("/detections", None)
    assert record.parse_topic("/d:vision_msgs/msg/Detection2DArray") == (
        "/d",
        "vision_msgs/msg/Detection2DArray",
    )
    with pytest.raises(ValueError, match="pkg/msg/Type"):
        record.parse_topic("/d:Detection2DArray")
    assert (
        record.msgtype_from_dds("vision_msgs::msg::dds_::Detection2DArray_")
        == "vision_msgs/msg/Detection2DArray"
    )
    with pytest.raises(ValueError, match="not a ROS 2 message type"):
        record.msgtype_from_dds("MyIdlType")
    assert play.parse_remaps(["/a:=/b", "c:=d"]) == {"/a": "/b", "c": "d"}
    with pytest.raises(ValueError, match="FROM:=TO"):
        play.parse_remaps(["/a=/b"])


def test_dds_missing_library_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cyclonedds", None)  # import fails as if not installed
    with pytest.raises(DdsError, match=r"pip install 'dds_perception\[dds\]'"):
        require()


@pytest.mark.parametrize("command", ["node", "play", "record"])
def test_dds_commands_have_help_with_examples(cli, command: str) -> None:
    result = cli(command, "--help", timeout=120)
    assert f"dds-perception {command}" in result.stdout
    assert "examples:" in result.stdout


def test_dds_play_reports_a_missing_bag(cli, tmp_path) -> None:
    result = cli("play", str(tmp_path / "nope"), check=False, timeout=120)
    assert result.returncode == 1
    assert "no such bag" in result.stderr and "Traceback" not in result.stderr


def test_dds_node_bad_configuration_is_one_clear_line(cli, tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    result = cli("node", "-p", f"weights:={missing}", check=False, timeout=120)
    assert result.returncode == 1
    assert f"weights '{missing}': file not found" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("node", "-p", "score_threshold:=2", check=False, timeout=120)
    assert result.returncode == 1 and "score_threshold 2.0: must lie in [0, 1]" in result.stderr


def test_dds_record_without_publisher_fails_and_leaves_no_bag(cli, tmp_path) -> None:
    from dds_env import DOMAIN, LOOPBACK_URI

    env = {"ROS_DOMAIN_ID": str(DOMAIN), "CYCLONEDDS_URI": LOOPBACK_URI}
    out = tmp_path / "rec"
    result = cli(
        "record", "/nobody_publishes_this", "--out", str(out), "--discovery-timeout", "0.5",
        check=False, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no publisher of rt/nobody_publishes_this" in result.stderr
    assert list(tmp_path.iterdir()) == [], "a failed recording left files behind"
