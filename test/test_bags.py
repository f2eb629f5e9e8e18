"""KITTI -> ROS 2 bag -> read back with rosbags and with independent decoders (bags area)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2._dynamic import generate_dynamic
from mcap_ros2.decoder import DecoderFactory

from dds_perception.data import kitti
from dds_perception.ros import bag, kitti2bag
from dds_perception.ros import messages as m

LIMIT = 5
VARIANTS = [("mcap", False), ("mcap", True), ("sqlite3", False), ("sqlite3", True)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_root() -> Path:
    from conftest import SHARED_DATA

    root = SHARED_DATA / "kitti_sample"
    if not root.is_dir():
        pytest.skip(f"real sample data not found at {root} (set DDS_SHARED_DATA)")
    return root


@pytest.fixture(scope="module")
def bags(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first LIMIT sample frames converted in every storage x image variant."""
    out = tmp_path_factory.mktemp("bags")
    made = {}
    for storage, compressed in VARIANTS:
        path = out / f"{storage}_{'png' if compressed else 'raw'}"
        counts = kitti2bag.convert(
            sample_root, path, limit=LIMIT, compressed=compressed, storage=storage, progress=False
        )
        made[storage, compressed] = (path, counts)
    return made


def _expected(sample_root: Path) -> list[dict]:
    layout = kitti.KittiLayout.find(sample_root)
    frames = []
    for frame_id in layout.frame_ids()[:LIMIT]:
        frames.append(
            {
                "id": frame_id,
                "png": layout.image(frame_id).read_bytes(),
                "rgb": cv2.cvtColor(cv2.imread(str(layout.image(frame_id))), cv2.COLOR_BGR2RGB),
                "labels": layout.label(frame_id).read_text(encoding="utf-8"),
                "objects": kitti.read_label_file(layout.label(frame_id)),
                "p2": kitti.read_calib_p2(layout.calib(frame_id)),
            }
        )
    return frames


def _check_frame(
    expected: dict, index: int, image, camera_info, ground_truth, labels, frame_id, compressed
) -> None:
    """Fields of one frame as decoded by any library (attribute access only)."""
    stamp = bag.frame_stamp_ns(index)
    for msg in (image, camera_info, ground_truth):
        assert m.stamp_ns(msg.header) == stamp
        assert msg.header.frame_id == bag.CAMERA_FRAME
    if compressed:
        assert bytes(image.data) == expected["png"]  # the original PNG, unchanged
        assert "png" in image.format
    else:
        assert (image.encoding, image.height, image.width) == ("rgb8", *expected["rgb"].shape[:2])
        assert image.step == image.width * 3
        pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(expected["rgb"].shape)
        np.testing.assert_array_equal(pixels, expected["rgb"])
    assert labels == expected["labels"]
    assert frame_id == expected["id"]
    np.testing.assert_array_equal(np.asarray(camera_info.p, float).reshape(3, 4), expected["p2"])
    assert (camera_info.height, camera_info.width) == expected["rgb"].shape[:2]
    objects = expected["objects"]
    assert len(ground_truth.detections) == len(objects)
    for det, obj in zip(ground_truth.detections, objects, strict=True):
        hyp = det.results[0].hypothesis
        assert (hyp.class_id, hyp.score) == (obj.type, 1.0)
        cx, cy = det.bbox.center.position.x, det.bbox.center.position.y
        x1, y1, x2, y2 = obj.bbox
        assert (cx, cy) == pytest.approx(((x1 + x2) / 2, (y1 + y2) / 2), abs=1e-9)
        assert (det.bbox.size_x, det.bbox.size_y) == pytest.approx((x2 - x1, y2 - y1), abs=1e-9)


@pytest.mark.parametrize(("storage", "compressed"), VARIANTS)
def test_bags_round_trip_with_rosbags(bags, sample_root, storage, compressed) -> None:
    path, counts = bags[storage, compressed]
    image_topic = bag.COMPRESSED_TOPIC if compressed else bag.IMAGE_TOPIC
    assert counts == {
        image_topic: LIMIT,
        bag.CAMERA_INFO_TOPIC: LIMIT,
        bag.GROUND_TRUTH_TOPIC: LIMIT,
        bag.LABELS_TOPIC: LIMIT,
        bag.FRAME_ID_TOPIC: LIMIT,
    }
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert sorted(p.name for p in path.iterdir()) == sorted(["metadata.yaml", path.name + suffix])
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary left behind
    # metadata that Humble's rosbag2 parses too: version 8, QoS profiles as a string
    import yaml

    info = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["version"] == 8 and info["storage_identifier"] == storage
    assert info["message_count"] == 5 * LIMIT
    for topic in info["topics_with_message_count"]:
        assert isinstance(topic["topic_metadata"]["offered_qos_profiles"], str)
    expected = _expected(sample_root)
    with bag.BagReader(path) as reader:
        assert reader.topics[bag.GROUND_TRUTH_TOPIC] == "vision_msgs/msg/Detection2DArray"
        frames = list(bag.read_kitti_frames(reader))
    assert [f.index for f in frames] == list(range(LIMIT))
    for frame, exp in zip(frames, expected, strict=True):
        _check_frame(
            exp,
            frame.index,
            frame.image,
            frame.camera_info,
            frame.ground_truth,
            frame.labels,
            frame.kitti_id,
            compressed,
        )
        assert frame.name == exp["id"] and frame.stamp_ns == bag.frame_stamp_ns(frame.index)
        # the decode path the replay uses gives the same pixels for raw and PNG frames
        np.testing.assert_array_equal(m.image_msg_to_rgb(frame.image), exp["rgb"])
        gt = m.msg_to_detections(frame.ground_truth)
        np.testing.assert_allclose(gt.boxes, [o.bbox for o in exp["objects"]], atol=1e-4)


def _group(items) -> list[dict]:
    """(topic, log_time, decoded) -> one dict per log time, in time order."""
    frames: dict[int, dict] = {}
    for topic, log_time, decoded in items:
        frames.setdefault(log_time, {})[topic] = decoded
    return [frames[t] for t in sorted(frames)]


def _check_independent(frames: list[dict], expected: list[dict], compressed: bool) -> None:
    image_topic = bag.COMPRESSED_TOPIC if compressed else bag.IMAGE_TOPIC
    assert len(frames) == LIMIT
    for index, (parts, exp) in enumerate(zip(frames, expected, strict=True)):
        _check_frame(
            exp,
            index,
            parts[image_topic],
            parts[bag.CAMERA_INFO_TOPIC],
            parts[bag.GROUND_TRUTH_TOPIC],
            parts[bag.LABELS_TOPIC].data,
            parts[bag.FRAME_ID_TOPIC].data,
            compressed,
        )


@pytest.mark.parametrize("compressed", [False, True])
def test_bags_mcap_read_by_independent_mcap_decoder(bags, sample_root, compressed) -> None:
    path, _ = bags["mcap", compressed]
    with open(path / f"{path.name}.mcap", "rb") as handle:
        reader = make_reader(handle, decoder_factories=[DecoderFactory()])
        schemas = {s.name for s in reader.get_summary().schemas.values()}
        assert "vision_msgs/msg/Detection2DArray" in schemas  # definitions embedded
        items = [
            (channel.topic, message.log_time, decoded)
            for _schema, channel, message, decoded in reader.iter_decoded_messages()
        ]
    _check_independent(_group(items), _expected(sample_root), compressed)


@pytest.mark.parametrize("compressed", [False, True])
def test_bags_sqlite3_read_by_sqlite_and_independent_cdr(bags, sample_root, compressed) -> None:
    path, _ = bags["sqlite3", compressed]
    db = sqlite3.connect(path / f"{path.name}.db3")
    try:
        definitions = dict(
            db.execute("SELECT topic_type, encoded_message_definition FROM message_definitions")
        )
        rows = db.execute(
            "SELECT topics.name, topics.type, messages.timestamp, messages.data "
            "FROM messages JOIN topics ON messages.topic_id = topics.id ORDER BY timestamp"
        ).fetchall()
    finally:
        db.close()
    items = []
    for topic, msgtype, log_time, data in rows:
        decoder = generate_dynamic(msgtype, definitions[msgtype])[msgtype]
        items.append((topic, log_time, decoder(data)))
    _check_independent(_group(items), _expected(sample_root), compressed)


def test_bags_kitti2bag_cli_split_and_help(cli, sample_root, tmp_path) -> None:
    split = tmp_path / "split.txt"
    kitti.write_split(split, ["000004", "000002", "000003"])
    out = tmp_path / "val_bag"
    result = cli("kitti2bag", str(sample_root), str(out), "--split", str(split), "--limit", "2")
    assert "2 frames" in result.stdout
    with bag.BagReader(out) as reader:
        assert [f.kitti_id for f in bag.read_kitti_frames(reader)] == ["000004", "000002"]
    assert (out / "val_bag.mcap").is_file()
    again = cli("kitti2bag", str(sample_root), str(out), check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    help_text = cli("kitti2bag", "--help").stdout
    assert "examples:" in help_text and "--compressed" in help_text


def test_bags_errors_name_bag_and_topic(bags, tmp_path) -> None:
    path, _ = bags["mcap", False]
    with pytest.raises(bag.BagError, match="no such bag"):
        bag.BagReader(tmp_path / "nope").__enter__()
    with pytest.raises(bag.BagError, match=f"{tmp_path}: not a ROS 2 bag"):
        bag.BagReader(tmp_path).__enter__()
    with bag.BagReader(path) as reader:
        with pytest.raises(bag.BagError, match=rf"{path}: no topic /detections in this bag"):
            list(reader.messages([bag.DETECTIONS_TOPIC]))
        assert reader.message_count(bag.IMAGE_TOPIC) == LIMIT
    # a truncated mcap: the bag and the topic are named, nothing else escapes
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    (cut / f"{path.name}.mcap").rename(cut / "data.mcap")
    yaml = (cut / "metadata.yaml").read_text().replace(f"{path.name}.mcap", "data.mcap")
    (cut / "metadata.yaml").write_text(yaml)
    storage = cut / "data.mcap"
    storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 2])
    with pytest.raises(bag.BagError, match=str(cut)), bag.BagReader(cut) as reader:
        list(reader.messages([bag.IMAGE_TOPIC]))
    # garbage where the storage file should be
    junk = tmp_path / "junk"
    shutil.copytree(bags["sqlite3", False][0], junk)
    db3 = next(junk.glob("*.db3"))
    db3.write_bytes(b"not a database" * 100)
    with pytest.raises(bag.BagError, match=str(junk)), bag.BagReader(junk) as reader:
        list(reader.messages([bag.IMAGE_TOPIC]))
    with pytest.raises(bag.BagError, match="unknown storage 'zip'"):
        bag.BagWriter(tmp_path / "x", storage="zip")


def test_bags_bad_label_or_exception_leaves_no_bag(sample_root, tmp_path, monkeypatch) -> None:
    root = tmp_path / "kitti" / "training"
    shutil.copytree(sample_root / "training", root, ignore=shutil.ignore_patterns("00001*"))
    (root / "label_2" / "000003.txt").write_text("Car 0 0 0 1 2 3\n")
    out = tmp_path / "out" / "bad_bag"
    with pytest.raises(kitti.KittiFormatError, match=r"000003.txt:1: expected 15 or 16 fields"):
        kitti2bag.convert(root.parent, out, limit=5, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    original = kitti2bag.write_frame
    monkeypatch.setattr(kitti2bag, "write_frame", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        kitti2bag.convert(sample_root, out, limit=3, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_bags_killed_conversion_leaves_no_complete_looking_bag(sample_root, tmp_path) -> None:
    out = tmp_path / "killed_bag"
    script = textwrap.dedent(
        f"""
        import os, signal
        from dds_perception.ros import kitti2bag
        original = kitti2bag.write_frame
        def dying(writer, layout, frame_id, index, **kw):
            if index == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(writer, layout, frame_id, index, **kw)
        kitti2bag.write_frame = dying
        kitti2bag.convert({str(sample_root)!r}, {str(out)!r}, limit=4, progress=False)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120
    )
    assert result.returncode == -9, result.stderr
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed_bag.*.tmp/killed_bag"))
    assert len(leftovers) == 1  # the partial bag sits only under a hidden temporary name
    assert not (leftovers[0] / "metadata.yaml").exists()
    with pytest.raises(bag.BagError, match="not a ROS 2 bag"):
        bag.BagReader(leftovers[0]).__enter__()


def test_bags_writer_rejects_a_second_type_on_a_topic(tmp_path) -> None:
    classes = m.rosbags_classes()
    path = tmp_path / "two_types"
    writer = bag.BagWriter(path, classes=classes)
    with pytest.raises(bag.BagError, match="holds std_msgs/msg/String"), writer:
        writer.write("/t", m.string_msg("a", classes), 1)
        writer.write("/t", m.header_msg(1, "x", classes), 2)
    assert not path.exists()


def test_bags_replay_launch_file_matches_the_bag_layout() -> None:
    """Static check (no ROS here): the launch file parses, declares described arguments, starts
    this package's detector_node on the kitti2bag image topic and records /detections."""
    import ast

    path = REPO / "launch" / "kitti_replay.launch.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == "IMAGE_TOPIC"
    }
    assert constants["IMAGE_TOPIC"] == bag.IMAGE_TOPIC
    assert bag.COMPRESSED_TOPIC == bag.IMAGE_TOPIC + "/compressed"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert {"detector_node", "dds_perception", "dds_detector", bag.DETECTIONS_TOPIC} <= strings
    assert {"bag", "output", "params_file", "weights", "device", "use_compressed"} <= strings
    arguments = next(
        n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ARGUMENTS"
    )
    for entry in arguments.elts:
        description = entry.elts[2]
        assert isinstance(description, ast.Constant) and description.value.strip()
    compile(tree, str(path), "exec")  # valid Python for the ROS 2 launch loader


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bags_conversion_is_byte_for_byte_deterministic(sample_root, tmp_path, storage) -> None:
    runs = []
    for run in ("a", "b"):
        path = tmp_path / run / "same_name"
        kitti2bag.convert(sample_root, path, limit=2, storage=storage, progress=False)
        runs.append({p.name: p.read_bytes() for p in path.iterdir()})
    assert runs[0] == runs[1]


def test_bags_failure_while_closing_leaves_no_bag(tmp_path, monkeypatch) -> None:
    from rosbags.rosbag2 import Writer

    def broken_close(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(Writer, "close", broken_close)
    classes = m.rosbags_classes()
    path = tmp_path / "full_disk"
    writer = bag.BagWriter(path, classes=classes)
    with pytest.raises(OSError, match="No space left"), writer:
        writer.write("/t", m.string_msg("a", classes), 1)
    assert list(tmp_path.iterdir()) == []


def test_bags_kitti_testing_folder_without_labels(sample_root, tmp_path) -> None:
    testing = tmp_path / "kitti" / "testing"
    for sub in ("image_2", "calib"):
        (testing / sub).mkdir(parents=True)
        for frame_id in ("000000", "000001"):
            ext = ".png" if sub == "image_2" else ".txt"
            shutil.copy(sample_root / "training" / sub / f"{frame_id}{ext}", testing / sub)
    out = tmp_path / "test_bag"
    counts = kitti2bag.convert(testing, out, progress=False)
    assert counts == {bag.IMAGE_TOPIC: 2, bag.CAMERA_INFO_TOPIC: 2, bag.FRAME_ID_TOPIC: 2}
    with bag.BagReader(out) as reader:
        frames = list(bag.read_kitti_frames(reader))
    assert [(f.kitti_id, f.labels, f.ground_truth) for f in frames] == [
        ("000000", None, None),
        ("000001", None, None),
    ]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bags_recorded_with_another_vision_msgs_layout(tmp_path, storage) -> None:
    """A /detections bag recorded with vision_msgs 2.x (Foxy) carries its own definitions: the
    reader decodes it with them (the hashes differ from ours) and the fields are read right."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    from test_ros_messages import FOXY_VISION_MSGS

    store = get_typestore(Stores.ROS2_FOXY)
    for name, text in FOXY_VISION_MSGS.items():
        store.register(get_types_from_msg(text, f"vision_msgs/msg/{name}"))
    foxy = m.classes_from_typestore(store)
    header = m.header_msg(bag.frame_stamp_ns(3), "camera", foxy)
    detections = SimpleNamespace(boxes=[[10, 20, 50, 80]], scores=[0.75], class_names=["car"])
    path = tmp_path / "foxy_detections"
    with bag.BagWriter(path, storage=storage, classes=foxy) as writer:
        writer.write(bag.DETECTIONS_TOPIC, m.detections_to_msg(detections, header, foxy), 7)
    with bag.BagReader(path) as reader:
        (item,) = reader.messages([bag.DETECTIONS_TOPIC])
    assert item.msg.detections[0].results[0].id == "car"  # the 2.x field, not hypothesis
    got = m.msg_to_detections(item.msg)
    np.testing.assert_allclose(got.boxes, [[10, 20, 50, 80]])
    assert (got.class_names, got.stamp_ns) == (["car"], bag.frame_stamp_ns(3))
