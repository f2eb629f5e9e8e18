"""Issue 19 end to end over real Cyclone DDS: a ``dds-perception node`` process with the
synthetic-scene weights, fed generated road scenes and their CameraInfo by this process.

Track ids and ground-plane positions travel in the Detection2DArray; ``~/enable`` (std_srvs/
SetBool in rmw_cyclonedds_cpp's layout) pauses the node: its image reader goes away, no frame is
processed while disabled, diagnostics say so, and it answers again once re-enabled. The domain
and loopback isolation are test_dds_e2e.py's (its fixtures and client are reused).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the DDS runtime needs cyclonedds (pip install '.[dds]')")

from test_dds_e2e import (
    ANSWER_TIMEOUT,
    REPO,
    START_TIMEOUT,
    Client,
    cli,
    dds_env,  # noqa: F401  (a fixture)
    wait_until,
)

from dds_perception.ros import messages

SIZE = (1242, 375)  # (width, height)
CAMERA_HEIGHT = 1.65


@pytest.fixture(scope="module")
def synthetic_weights() -> Path:
    from dds_perception.pipeline import SYNTHETIC_WEIGHTS, default_weights

    try:
        return Path(default_weights(SYNTHETIC_WEIGHTS))
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def node(synthetic_weights: Path, dds_env: dict[str, str], tmp_path_factory):  # noqa: F811
    log_path = tmp_path_factory.mktemp("planning_node") / "node.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        cli(
            "node",
            "-p", f"weights:={synthetic_weights}",
            "-p", "device:=cpu",
            "-p", "image_topic:=image",
            "-p", "score_threshold:=0.3",
            "-p", "reliability:=reliable",
            "-p", f"camera_height:={CAMERA_HEIGHT}",
            "--diagnostics-period", "0.2",
        ),
        cwd=REPO, env=dds_env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_until(
        lambda: "ready:" in log_path.read_text() or proc.poll() is not None,
        START_TIMEOUT,
        "the node to start",
    )
    assert proc.poll() is None, f"node exited early:\n{log_path.read_text()}"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def client(node) -> Client:
    c = Client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, list]:
    """One generated road scene (cars on a flat road at known depths), its P2 and labels."""
    from dds_perception.data import scenes

    rng = np.random.default_rng((3, 0))
    rgb, objects = scenes.render_scene(rng, SIZE)
    return rgb, scenes.camera_matrix(SIZE), [o for o in objects if o.type == "Car"]


def _diagnostics(client: Client, predicate, what: str) -> dict:
    return client.latest_diagnostics(predicate, what)


def test_dds_planning_ids_and_positions(client: Client, scene) -> None:
    from dds_perception.ros.dds import runtime as rt

    rgb, p2, cars = scene
    info_pub = client.runtime.publisher(
        "camera_info", messages.MSGTYPES["CameraInfo"], rt.reliable_qos(1)
    )
    wait_until(lambda: info_pub.subscription_count() > 0, ANSWER_TIMEOUT, "camera_info reader")
    header = messages.header_msg(0, "camera", client.classes)
    info = messages.camera_info_msg(p2, SIZE[0], SIZE[1], header, client.classes)
    # our writer may match the node's reader before the reader matches it, and a volatile
    # writer does not resend: publish until the node has it, as a camera driver does per frame
    stop = threading.Event()

    def keep_publishing() -> None:
        while not stop.is_set():
            info_pub.publish(info)
            stop.wait(0.1)

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        wait_until(
            lambda: _diagnostics(
                client, lambda v: v["camera_info"].startswith("ok"), "camera_info"
            ),
            ANSWER_TIMEOUT,
            "the node to take the CameraInfo",
        )
    finally:
        stop.set()
        publisher.join()
    outs = []
    for index in range(3):  # the same scene 0.1 s apart: the same cars, the same ids
        stamp = 1_700_000_500_000_000_000 + index * 100_000_000
        client.send(client.image(rgb, stamp))
        outs.append(client.answer(stamp))
    ids = [[d.id for d in out.detections] for out in outs]
    scores = [d.results[0].hypothesis.score for d in outs[0].detections]
    assert ids[0], "the synthetic detector found no car in the generated scene"
    tracked = [i for i in ids[0] if i]
    assert len(set(tracked)) == len(tracked)
    # boxes scoring >= 0.6 (track_high_threshold 0.5 + 0.1) start tracks; weaker ones do not
    assert all(bool(i) == (s >= 0.6) for i, s in zip(ids[0], scores, strict=True)), (ids, scores)
    assert ids[1] == ids[0] and ids[2] == ids[0]
    # positions: every detection matched to a labelled car has a distance near the label's
    got = messages.msg_to_detections(outs[0])
    from dds_perception.detection.tracking import box_iou, greedy_match

    truth = np.array([c.bbox for c in cars]).reshape(-1, 4)
    pairs = greedy_match(box_iou(truth, got.boxes.astype(np.float64)), 0.5)
    errors = [
        abs(got.positions[d, 2] - cars[t].location[2]) / cars[t].location[2]
        for t, d in pairs
        if got.positions[d, 2] > 0
    ]
    assert errors, (ids, got.positions)
    assert np.median(errors) < 0.25, errors
    cov = np.asarray(outs[0].detections[pairs[0][1]].results[0].pose.covariance)
    assert cov.shape == (36,) and cov[14] > 0  # var(z) went over the wire
    values = _diagnostics(client, lambda v: int(v["distance_estimated"]) > 0, "distances")
    assert values["tracking"] == "on" and int(values["track_ids_issued"]) >= len(tracked) > 0


def test_dds_planning_enable_service_pauses_inference(client: Client, scene) -> None:
    rgb = scene[0]
    enable = client.runtime.service_client("/dds_detector/enable", "std_srvs/srv/SetBool")
    stamp = 1_700_000_600_000_000_000
    client.send(client.image(rgb, stamp))
    client.answer(stamp)
    reply = enable.call(data=False, timeout=ANSWER_TIMEOUT)
    assert reply.success and reply.message.startswith("disabled"), reply
    wait_until(lambda: client.images.subscription_count() == 0, ANSWER_TIMEOUT,
               "the node to delete its image reader")  # fmt: skip
    before = _diagnostics(client, lambda v: v["enabled"] == "false", "disabled diagnostics")
    assert before["_message"].startswith("disabled") and before["_level"] == 0
    paused = [stamp + (i + 1) * 100_000_000 for i in range(3)]
    for pause_stamp in paused:  # a camera that keeps streaming: nobody takes the frames
        client.images.publish(client.image(rgb, pause_stamp))
        time.sleep(0.2)
    time.sleep(0.5)
    after = _diagnostics(client, lambda v: v["enabled"] == "false", "disabled diagnostics")
    assert after["frames_processed"] == before["frames_processed"]
    assert not any((s, "camera") in client.detections for s in paused)

    reply = enable.call(data=True, timeout=ANSWER_TIMEOUT)
    assert reply.success and reply.message.startswith("enabled"), reply
    resumed = stamp + 10 * 100_000_000
    client.send(client.image(rgb, resumed))  # waits for the new reader to match
    client.answer(resumed)
    values = _diagnostics(
        client,
        lambda v: (
            v["enabled"] == "true"
            and int(v["frames_processed"]) == int(before["frames_processed"]) + 1
        ),
        "enabled diagnostics with one more frame",
    )
    assert values["frames_ignored_disabled"] == "0"
