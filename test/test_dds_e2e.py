"""The node, player and recorder over real Cyclone DDS on loopback, as separate processes.

One node process (``dds-perception node`` with the shipped weights on CPU) serves every test of
this module; this test process talks to it through the same runtime (publishing images,
subscribing detections, diagnostics and label info). The DDS domain is isolated: a domain id
drawn per test session in 100..200 and ``CYCLONEDDS_URI`` restricted to the loopback interface,
so parallel runs and the network are left alone. Every wait has a timeout: a hang fails a test.

The node subscribes with ``reliability:=reliable`` here: a best-effort 1.4 MB frame is lost as a
whole when one UDP fragment is (the socket buffer overflows on a loaded 2-core machine), which
would make answers to single frames a matter of luck. Keep-last-1 still holds: the newest frame
wins, older ones are dropped, as the burst test checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from dds_env import DOMAIN, loopback_domain

pytest.importorskip("cyclonedds", reason="the DDS runtime needs cyclonedds (pip install '.[dds]')")

from dds_perception import pipeline
from dds_perception.ros import messages
from dds_perception.ros.diagnostics import STAGES

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0  # model load + warm-up on a busy 2-core machine
ANSWER_TIMEOUT = 30.0
LATENCY_KEYS = [
    f"{stage}_ms_{stat}" for stage in (*STAGES, "age") for stat in ("mean", "p50", "p95")
]


@pytest.fixture(scope="module")
def dds_env() -> dict[str, str]:
    """Isolated domain + loopback only, for this process (set before its first participant)
    and for every child process."""
    with loopback_domain():
        yield {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def weights() -> Path:
    """The shipped weights (a missing file or a broken pipeline import fails, never skips)."""
    return Path(pipeline.default_weights())


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dds_perception.cli", *args]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class NodeProcess:
    """``dds-perception node`` in a subprocess; its log goes to a file the tests can read."""

    def __init__(self, weights: Path, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            cli(
                "node",
                "-p", f"weights:={weights}",
                "-p", "device:=cpu",
                "-p", "image_topic:=image",
                "-p", "score_threshold:=0.05",
                "-p", "reliability:=reliable",
                "--diagnostics-period", "0.2",
            ),
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(
            lambda: "ready:" in self.log() or self.proc.poll() is not None,
            START_TIMEOUT,
            "the node to start",
        )
        assert self.proc.poll() is None, f"node exited early:\n{self.log()}"

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Client:
    """This process's side: an image publisher and the node's outputs, collected."""

    def __init__(self) -> None:
        from dds_perception.ros.dds import runtime as rt

        self.classes = messages.rosbags_classes()
        self.runtime = rt.DdsRuntime(typestore=self.classes.typestore)
        self.lock = threading.Lock()
        self.detections: dict[tuple[int, str], Any] = {}
        self.diagnostics: list[Any] = []
        self.labels: list[Any] = []
        types = messages.MSGTYPES
        self.images = self.runtime.publisher("image", types["Image"], rt.reliable_qos(1))
        self.runtime.subscribe(
            "detections", types["Detection2DArray"], self._on_detections, rt.reliable_qos(10)
        )
        self.runtime.subscribe(
            "/diagnostics", types["DiagnosticArray"], self._keep(self.diagnostics)
        )
        self.runtime.subscribe("label_info", types["LabelInfo"], self._keep(self.labels),
                               rt.latched_qos())  # fmt: skip
        self.runtime.start()

    def _keep(self, store: list) -> Callable[[Any], None]:
        def keep(msg: Any) -> None:
            with self.lock:
                store.append(msg)

        return keep

    def _on_detections(self, msg: Any) -> None:
        with self.lock:
            self.detections[(messages.stamp_ns(msg.header), msg.header.frame_id)] = msg

    def image(self, rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera", **kw: Any) -> Any:
        header = messages.header_msg(stamp_ns, frame_id, self.classes)
        return messages.rgb_to_image_msg(rgb, header, self.classes, **kw)

    def send(self, msg: Any) -> None:
        wait_until(lambda: self.images.subscription_count() > 0, ANSWER_TIMEOUT, "the node")
        self.images.publish(msg)

    def answer(self, stamp_ns: int, frame_id: str = "camera", timeout=ANSWER_TIMEOUT) -> Any:
        return wait_until(
            lambda: self.detections.get((stamp_ns, frame_id)),
            timeout,
            f"detections for stamp {stamp_ns} / {frame_id!r}",
        )

    def latest_diagnostics(self, predicate: Callable[[dict], bool], what: str) -> dict:
        def check() -> dict | None:
            with self.lock:
                msgs = list(self.diagnostics)
            for msg in reversed(msgs):
                values = {kv.key: kv.value for kv in msg.status[0].values}
                values["_level"] = msg.status[0].level
                values["_name"] = msg.status[0].name
                values["_message"] = msg.status[0].message
                if predicate(values):
                    return values
            return None

        return wait_until(check, ANSWER_TIMEOUT, what)

    def close(self) -> None:
        self.runtime.close()


@pytest.fixture(scope="module")
def node(weights: Path, dds_env: dict[str, str], tmp_path_factory) -> NodeProcess:
    process = NodeProcess(weights, dds_env, tmp_path_factory.mktemp("node") / "node.log")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Client:
    c = Client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Three real KITTI frames when the sample is there, else seeded noise at KITTI's size."""
    shared = Path(os.environ.get("DDS_SHARED_DATA", REPO.parent / "shared" / "data"))
    folder = shared / "kitti_sample" / "training" / "image_2"
    paths = sorted(folder.glob("*.png"))[:3]
    if paths:
        return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (375, 1242, 3), dtype=np.uint8) for _ in range(3)]


# --------------------------------------------------------------------------------------- tests


def test_dds_node_answers_with_the_image_header(client: Client, frames) -> None:
    for index, (rgb, encoding) in enumerate(zip(frames, ("rgb8", "bgr8", "rgba8"), strict=True)):
        stamp = 1_700_000_000_123_456_789 + index * 100_000_000
        frame_id = f"cam_{index}"
        client.send(client.image(rgb, stamp, frame_id, encoding=encoding))
        out = client.answer(stamp, frame_id)
        assert messages.stamp_ns(out.header) == stamp and out.header.frame_id == frame_id
        for det in out.detections:
            assert messages.stamp_ns(det.header) == stamp and det.header.frame_id == frame_id
            assert det.results[0].hypothesis.class_id == "car"
            assert 0.0 <= det.results[0].hypothesis.score <= 1.0
            cx, cy = det.bbox.center.position.x, det.bbox.center.position.y
            assert 0 <= cx <= rgb.shape[1] and 0 <= cy <= rgb.shape[0]
    # label_info is transient local: this late-joining reader got it
    labels = wait_until(lambda: list(client.labels), ANSWER_TIMEOUT, "label_info")
    assert [c.class_name for c in labels[-1].class_map] == ["car"]


def test_dds_node_publishes_latency_diagnostics(client: Client, frames) -> None:
    stamp = 1_700_000_100_000_000_000
    client.send(client.image(frames[0], stamp))
    client.answer(stamp)
    values = client.latest_diagnostics(
        lambda v: int(v.get("frames_processed", 0)) >= 1, "diagnostics after a processed frame"
    )
    missing = [k for k in LATENCY_KEYS if k not in values]
    assert not missing, f"diagnostics lack {missing}"
    assert float(values["end_to_end_ms_p95"]) > 0 and float(values["inference_ms_mean"]) > 0
    assert values["_name"] == "dds_detector: detector" and values["device"] == "cpu"
    for key in ("frames_received", "frames_dropped", "frames_failed", "rate_hz"):
        assert key in values


def test_dds_node_survives_malformed_frames(client: Client, frames) -> None:
    rgb = frames[1]
    bad_step = client.image(rgb, 1_700_000_200_000_000_000)
    bad_step.step = rgb.shape[1] * 3 - 1  # step smaller than width * channels
    truncated = client.image(rgb, 1_700_000_200_100_000_000)
    truncated.data = truncated.data[: len(truncated.data) // 2]  # data shorter than height*step
    unknown = client.image(rgb, 1_700_000_200_200_000_000)
    unknown.encoding = "yuv422_weird"
    before = client.latest_diagnostics(lambda v: "frames_failed" in v, "diagnostics")
    for msg in (bad_step, truncated, unknown):
        client.send(msg)
        time.sleep(0.3)  # one at a time: the newest-frame slot would otherwise drop them
    good = 1_700_000_200_300_000_000
    client.send(client.image(rgb, good))
    client.answer(good)  # the next frame is processed
    failed_before = int(before["frames_failed"])
    after = client.latest_diagnostics(
        lambda v: int(v.get("frames_failed", 0)) >= failed_before + 3,
        "three failed frames in the diagnostics",
    )
    assert "ImageDecodeError" in after["last_error"] or "Error" in after["last_error"]
    assert not any(s in client.detections for s in [(1_700_000_200_000_000_000, "camera")])


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def test_dds_node_handles_a_burst_latest_wins_memory_flat(client: Client, node, frames) -> None:
    rgb = frames[2]
    first = 1_700_000_300_000_000_000
    rss = []
    for round_ in range(3):
        base = first + round_ * 10_000_000_000
        for i in range(40):  # far faster than CPU inference
            client.send(client.image(rgb, base + i))

        # A camera keeps streaming: best-effort frames lost in the burst are not resent, so
        # new frames follow until one is answered (the node stayed responsive).
        def answered_after_burst(base: int = base) -> bool:
            stamp = base + 1_000 + int(time.monotonic() * 1e3) % 1_000_000
            client.send(client.image(rgb, stamp))
            time.sleep(0.3)
            return any(s >= base + 1_000 for s, _ in client.detections if s < base + 10**9)

        wait_until(answered_after_burst, ANSWER_TIMEOUT, "an answer after the burst")
        rss.append(_rss_mb(node.proc.pid))
    values = client.latest_diagnostics(
        lambda v: int(v.get("frames_dropped", 0)) >= 1, "dropped frames in the diagnostics"
    )
    answered = sum(1 for stamp, _ in client.detections if first <= stamp < first + 10**11)
    assert answered < 3 * 40, "every frame of the bursts was processed: no burst happened"
    assert int(values["frames_received"]) > int(values["frames_processed"])
    # memory flat: later bursts do not grow the node (frames are dropped, never queued)
    assert rss[2] - rss[0] < 64, f"node RSS grew across bursts: {rss} MB"


def test_dds_node_outlives_a_dying_player_and_recorder(
    client: Client, node, dds_env, kitti_sample, tmp_path, frames
) -> None:
    bag = tmp_path / "kitti_bag"
    subprocess.run(
        cli("kitti2bag", str(kitti_sample), str(bag), "--limit", "3", "--quiet"),
        cwd=REPO, env=dds_env, check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    player = subprocess.Popen(
        cli("play", str(bag), "--loop", "--rate", "5",
            "--remap", "/kitti/camera/image_raw:=/image"),
        cwd=REPO, env=dds_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    record_log = tmp_path / "record.log"
    with record_log.open("w") as log_file:
        recorder = subprocess.Popen(
            cli("record", "/detections", "--out", str(tmp_path / "rec")),
            cwd=REPO, env=dds_env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(  # the node answers frames of the player (the bag's stamps start at 1 s)
            lambda: any(stamp < 10**11 for stamp, _ in client.detections),
            ANSWER_TIMEOUT,
            "detections of the played bag",
        )
        wait_until(lambda: "record: recording" in record_log.read_text(), ANSWER_TIMEOUT,
                   "the recorder")  # fmt: skip
        time.sleep(0.5)  # the recorder is writing its bag
    finally:
        player.kill()
        recorder.kill()
        player.wait(10)
        recorder.wait(10)
    assert list(tmp_path.glob(".rec.*.tmp")), "the recorder had not opened its bag yet"
    assert not (tmp_path / "rec").exists(), "a killed recorder left a bag under the final name"
    stamp = 1_700_000_400_000_000_000
    client.send(client.image(frames[0], stamp))
    client.answer(stamp)
    assert node.proc.poll() is None


def test_dds_demo_live_leg(weights, dds_env, tmp_path) -> None:
    """`dds-perception demo`'s live leg: the frames as a bag -> node, recorder and lockstep
    player processes (on a domain of their own) -> evaluate-bag. Every frame is answered with
    its header, and the recorded detections equal the in-process leg's result files."""
    from dds_perception.data.kitti import read_label_file
    from dds_perception.ros.bag import BagReader
    from dds_perception.ros.evaluate_bag import read_ground_truth

    out = tmp_path / "demo"
    env = {**dds_env, "ROS_DOMAIN_ID": str(100 + (DOMAIN - 100 + 1) % 101)}  # not the node's
    env.pop("KITTI_ROOT", None)
    result = subprocess.run(
        cli("demo", "--generated", "--out", str(out), "--frames", "3", "--draw", "2",
            "--device", "cpu", "--no-bag"),
        cwd=REPO, env=env, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 frames played, 3 answered with the image's header, 0 without" in result.stdout
    assert "live AP equals the in-process AP: yes" in result.stdout
    report = json.loads((out / "live" / "report.json").read_text())
    assert report["matched_frames"] == 3 and report["messages_without_frame"] == 0
    assert all(k in report["diagnostics"] for k in LATENCY_KEYS)
    assert report["diagnostics"]["frames_processed"] == "3"
    size = cv2.imread(str(out / "scenes" / "training" / "image_2" / "000000.png")).shape[:2]
    live_frames = sorted((out / "live" / "frames").glob("live_*.png"))
    assert [p.name for p in live_frames] == ["live_000000.png", "live_000001.png"]
    assert cv2.imread(str(live_frames[0])).shape[:2] == size
    debug_frames = sorted((out / "live" / "debug_frames").glob("*.png"))  # the node's own
    assert [p.name for p in debug_frames] == ["000000.png", "000001.png"]
    assert cv2.imread(str(debug_frames[0])).shape[:2] == size

    with BagReader(out / "live" / "kitti_bag") as reader:
        names = {f.stamp_ns: f.name for f in read_ground_truth(reader)}
        images = {
            messages.stamp_ns(m.msg.header): m.msg
            for m in reader.messages(["/kitti/camera/image_raw"])
        }
    with BagReader(out / "live" / "recorded") as reader:
        recorded = [m.msg for m in reader.messages(["/detections"])]
    assert sorted(messages.stamp_ns(m.header) for m in recorded) == sorted(images)
    for msg in recorded:
        stamp = messages.stamp_ns(msg.header)
        assert msg.header.frame_id == images[stamp].header.frame_id
        got = messages.msg_to_detections(msg)
        expected = read_label_file(out / "results" / f"{names[stamp]}.txt")  # in-process leg
        assert len(got) == len(expected)
        np.testing.assert_allclose(got.boxes, [o.bbox for o in expected], atol=0.006)
        np.testing.assert_allclose(got.scores, [o.score for o in expected], atol=0.006)


def test_dds_node_sigterm_exits_cleanly(node: NodeProcess, client: Client) -> None:
    node.proc.send_signal(signal.SIGTERM)
    try:
        code = node.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node did not exit within 1 s of SIGTERM:\n{node.log()[-2000:]}")
    assert code == 0, node.log()
    assert "shut down cleanly" in node.log()
