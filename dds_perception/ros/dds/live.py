"""The live leg of the demo: a KITTI bag through node, player and recorder processes over DDS.

:func:`run_live` converts a KITTI folder into a bag (``kitti2bag``), starts three separate
processes on an isolated DDS domain restricted to loopback (unless ``CYCLONEDDS_URI`` is set):

1. ``dds-perception node`` subscribing the bag's camera topic (reliable, see the README on
   large images over best effort), publishing ``/detections``, ``/diagnostics`` and, because the
   recorder subscribes it, ``/dds_detector/debug_image``;
2. ``dds-perception record`` of those three topics;
3. ``dds-perception play --lockstep /detections`` of the camera topic (each frame once the node
   answered the previous one, so no frame is dropped however slow the CPU);

then stops the recorder (SIGINT: the bag is finalised) and the node (SIGTERM), evaluates the
recorded ``/detections`` against the bag's ground truth by header stamp (``evaluate-bag``), and
reads the node's last diagnostics (latency) and its annotated ``~/debug_image`` frames (every
published detection drawn, into ``debug_frames/``) from the recorded bag. Every
wait has a timeout; the processes are stopped whatever happens.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dds_perception.ros import bag as bagmod
from dds_perception.ros import messages
from dds_perception.ros.dds import DdsError

LOOPBACK_URI = (
    "<CycloneDDS><Domain><General><Interfaces>"
    '<NetworkInterface name="lo"/>'
    "</Interfaces></General></Domain></CycloneDDS>"
)
DEBUG_TOPIC = "/dds_detector/debug_image"
DIAGNOSTICS_TOPIC = "/diagnostics"


@dataclass
class LiveResult:
    """What the live run produced: AP, the node's latency and counters, file locations."""

    evaluation: Any  # evaluation.kitti result (markdown(), to_json(), mean_ap())
    report: dict[str, Any]  # evaluate-bag's report
    diagnostics: dict[str, str]  # the node's last diagnostics key/values
    frames: list[Path] = field(default_factory=list)  # the node's ~/debug_image frames written
    bag: Path | None = None
    recorded: Path | None = None
    domain: int = 0


class _Process:
    """A child ``dds-perception`` command with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        with log.open("w") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dds_perception.cli", *args],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise DdsError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no '{text}' within {timeout:.0f} s:\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self, sig: int, timeout: float) -> int:
        """Send ``sig``, wait up to ``timeout`` s (then kill); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def _environment(domain: int | None) -> tuple[dict[str, str], int]:
    env = dict(os.environ)
    if domain is None:  # a fresh domain, so that nothing else on the machine joins the demo
        domain = random.SystemRandom().randint(100, 200)
    env["ROS_DOMAIN_ID"] = str(domain)
    env.setdefault("CYCLONEDDS_URI", LOOPBACK_URI)
    package_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env, domain


def run_live(
    kitti_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    backend: str = "torch",
    half: bool = False,
    score_threshold: float = 0.05,
    limit: int | None = None,
    draw: int = 4,
    domain: int | None = None,
    start_timeout: float = 300.0,
    frame_timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> LiveResult:
    """Run the live flow on the frames of ``kitti_root``, outputs under ``out`` (module doc)."""
    import cv2

    from dds_perception.ros import kitti2bag
    from dds_perception.ros.dds import require
    from dds_perception.ros.evaluate_bag import evaluate_bags, read_ground_truth

    require()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bag, recorded = out / "kitti_bag", out / "recorded"
    for stale in (bag, recorded):
        if stale.exists():
            shutil.rmtree(stale)
    kitti2bag.convert(kitti_root, bag, limit=limit, progress=False)
    with bagmod.BagReader(bag) as reader:
        camera = reader.first_topic(bagmod.IMAGE_TOPIC, bagmod.COMPRESSED_TOPIC)
        frames_in_bag = reader.message_count(camera)
        names = {frame.stamp_ns: frame.name for frame in read_ground_truth(reader)}
    env, domain = _environment(domain)
    log(f"live: {frames_in_bag} frames in {bag}; DDS domain {domain}, node/player/recorder")
    node_args = [
        "node",
        "-p", f"image_topic:={camera}",
        "-p", f"device:={device}",
        "-p", f"backend:={backend}",
        "-p", f"half:={str(half).lower()}",
        "-p", f"score_threshold:={score_threshold}",
        "-p", "reliability:=reliable",
        "-p", "publish_debug_image:=true",
        "--diagnostics-period", "0.5",
    ]  # fmt: skip
    if weights is not None:
        node_args += ["-p", f"weights:={weights}"]
    node = _Process("node", node_args, env, out / "node.log")
    recorder = player = None
    try:
        node.wait_for("ready:", start_timeout)
        recorder = _Process(
            "record",
            ["record", bagmod.DETECTIONS_TOPIC, DIAGNOSTICS_TOPIC, DEBUG_TOPIC, "--out",
             str(recorded)],
            env,
            out / "record.log",
        )  # fmt: skip
        recorder.wait_for("record: recording", 60.0)
        player = _Process(
            "play",
            ["play", str(bag), "--topics", camera, "--wait-for", camera,
             "--lockstep", bagmod.DETECTIONS_TOPIC, "--lockstep-timeout", str(frame_timeout)],
            env,
            out / "play.log",
        )  # fmt: skip
        deadline = frames_in_bag * frame_timeout + 60.0
        try:
            player.proc.wait(deadline)
        except subprocess.TimeoutExpired as error:
            raise TimeoutError(f"play did not finish within {deadline:.0f} s") from error
        if player.proc.returncode != 0:
            raise DdsError(f"play failed ({player.proc.returncode}):\n{player.log()}")
        time.sleep(1.0)  # the last debug image and diagnostics reach the recorder
    finally:
        for process, sig in ((player, signal.SIGINT), (recorder, signal.SIGINT)):
            if process is not None:
                process.stop(sig, 30.0)
        node_code = node.stop(signal.SIGTERM, 10.0)
    if recorder.proc.returncode != 0:
        raise DdsError(f"record failed ({recorder.proc.returncode}):\n{recorder.log()}")
    if node_code != 0:
        raise DdsError(f"node exited {node_code}:\n{node.log()}")
    evaluation, report, _ = evaluate_bags(bag, recorded)
    diagnostics: dict[str, str] = {}
    written: list[Path] = []
    frames_dir = out / "debug_frames"
    frames_dir.mkdir(exist_ok=True)
    with bagmod.BagReader(recorded) as reader:
        if DIAGNOSTICS_TOPIC in reader.topics:
            for item in reader.messages([DIAGNOSTICS_TOPIC]):
                diagnostics = {kv.key: kv.value for kv in item.msg.status[0].values}
        if DEBUG_TOPIC in reader.topics:
            for item in reader.messages([DEBUG_TOPIC]):
                if len(written) >= draw:
                    break
                rgb = messages.image_msg_to_rgb(item.msg)
                stamp = messages.stamp_ns(item.msg.header)
                path = frames_dir / f"{names.get(stamp, stamp)}.png"
                cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                written.append(path)
    return LiveResult(evaluation, report, diagnostics, written, bag, recorded, domain)
