"""Errors the node survives: a bad frame is one line, a bug keeps its traceback (issue 18.1).

Before, every exception met while processing a frame became one throttled line "Type: message",
so a bug in the pipeline or the message building lost the stack that says where it happened.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_node_core import FakePipeline, Recorder, image_msg

from dds_perception.data.images import ImageDecodeError
from dds_perception.ros import messages
from dds_perception.ros.core import DetectorCore
from dds_perception.ros.error_log import ErrorLog, describe, is_bad_input
from dds_perception.ros.params import DetectorParams


@pytest.fixture(scope="module")
def classes():
    return messages.rosbags_classes()


class Clock:
    """A monotonic clock the test moves by hand (the throttle's time, no wall clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("broken __str__")


class BuggyPipeline(FakePipeline):
    """The fake pipeline with bugs: a frame whose pixels equal a key of ``bugs`` raises that
    exception inside the pipeline call, as a bug in the real one would."""

    def __init__(self, bugs: dict[int, Exception]) -> None:
        super().__init__()
        self.bugs = bugs

    def __call__(self, rgb: np.ndarray, encoding: str = "rgb8", **kw):
        bug = self.bugs.get(int(rgb[0, 0, 0]))
        if bug is not None:
            raise bug
        return super().__call__(rgb, encoding, **kw)


# --------------------------------------------------------------------------- ErrorLog


def test_node_error_log_bad_input_is_one_throttled_line():
    warnings, errors, clock = [], [], Clock()
    log = ErrorLog(warnings.append, errors.append, period=5.0, monotonic=clock)
    bad = ImageDecodeError("unsupported encoding 'yuv422_10'")
    assert is_bad_input(bad) and not is_bad_input(KeyError("x"))
    assert log.report(bad, "frame failed", "frame")
    assert not log.report(bad, "frame failed", "frame")  # within the period: held back
    clock.now = 5.0
    assert log.report(bad, "frame failed", "frame")
    assert warnings == [
        "frame failed: ImageDecodeError: unsupported encoding 'yuv422_10'",
        "frame failed: ImageDecodeError: unsupported encoding 'yuv422_10' "
        "(1 more since the last report)",
    ]
    assert errors == []


def test_node_error_log_bug_traceback_once_per_type_and_place():
    warnings, errors, clock = [], [], Clock()
    log = ErrorLog(warnings.append, errors.append, period=5.0, monotonic=clock)

    def failing(kind: type[Exception]) -> Exception:
        try:
            raise kind("deep inside")
        except Exception as error:  # the exception with its traceback, as the node sees it
            return error

    assert log.report(failing(KeyError), "frame failed", "frame")
    assert not log.report(failing(KeyError), "frame failed", "frame")  # known bug, throttled
    assert log.report(failing(ZeroDivisionError), "frame failed", "frame")  # new type: shown
    assert log.report(failing(KeyError), "debug image", "debug")  # same type, other place
    clock.now = 10.0
    assert log.report(failing(KeyError), "frame failed", "frame")
    assert warnings == []
    first, second, third, fourth = errors
    for text, kind in ((first, "KeyError"), (second, "ZeroDivisionError"), (third, "KeyError")):
        assert "Traceback (most recent call last)" in text and f"{kind}: " in text
        assert "in failing" in text  # the stack names the function that raised
    assert "(1 more since the last report)" in second
    assert fourth == (
        "frame failed: KeyError: 'deep inside' (a bug; traceback logged at its first occurrence)"
    )


def test_node_error_log_survives_broken_errors_and_loggers():
    assert describe(_Unprintable()) == "_Unprintable: <message unavailable: its __str__ failed>"

    def broken_logger(text: str) -> None:
        raise OSError("log disk full")

    log = ErrorLog(broken_logger)
    assert log.report(_Unprintable(), "frame failed", "frame") is False  # no exception


# --------------------------------------------------------------------------- the core


def test_node_core_bug_keeps_traceback_and_the_node_goes_on(classes):
    """A bug inside the pipeline: counted as a failed frame, its traceback logged the first
    time (and for each new exception type), one line later; the next frames are processed."""
    clock, recorder = Clock(), Recorder()
    pipeline = BuggyPipeline({13: KeyError("anchor"), 14: ZeroDivisionError("scale")})
    node = DetectorCore(
        pipeline,
        DetectorParams(device="cpu"),
        classes=classes,
        ports=recorder.ports(),
        clock=lambda: 100.25,
        monotonic=clock,
        logger=recorder,
    )
    node.start()
    try:
        for value, sec in ((13, 1), (1, 2), (13, 3), (14, 4), (2, 5)):
            node.submit(image_msg(classes, value, sec=sec))
            assert node.wait_idle(10)
        clock.now = 10.0  # past the 5 s throttle
        node.submit(image_msg(classes, 13, sec=6))
        assert node.wait_idle(10)
        node.submit(image_msg(classes, 3, sec=7, encoding="yuv422_10"))  # bad input
        assert node.wait_idle(10)
        clock.now = 20.0
        node.submit(image_msg(classes, 3, sec=8, encoding="yuv422_10"))
        assert node.wait_idle(10)
        node.submit(image_msg(classes, 4, sec=9))
        assert node.wait_idle(10)
        assert node._thread is not None and node._thread.is_alive()
    finally:
        node.stop()
    assert [m.header.stamp.sec for m in recorder.detections] == [2, 5, 9]
    assert vars(node.counters) == {"received": 9, "processed": 3, "dropped": 0, "failed": 6}
    key_trace, zero_trace, key_line = recorder.errors
    assert key_trace.startswith("frame stamp 1.000 failed (1 so far): KeyError: 'anchor'\n")
    assert "Traceback (most recent call last)" in key_trace
    assert "test_node_errors.py" in key_trace and "in __call__" in key_trace  # where it was
    assert zero_trace.startswith(
        "frame stamp 4.000 failed (3 so far): ZeroDivisionError: scale "
        "(1 more since the last report)\n"
    )
    assert "Traceback (most recent call last)" in zero_trace
    assert key_line == (
        "frame stamp 6.000 failed (4 so far): KeyError: 'anchor' "
        "(a bug; traceback logged at its first occurrence)"
    )
    (bad_line,) = recorder.warnings  # the bad frames: one line, no traceback
    assert bad_line.startswith("frame stamp 8.000 failed (6 so far): ImageDecodeError: ")
    assert bad_line.endswith("(1 more since the last report)")
    assert node.diagnostics().as_dict()["frames_failed"] == "6"


def test_node_core_worker_survives_an_unprintable_bug(classes):
    """An exception whose message cannot even be printed is still counted; the worker lives."""
    recorder = Recorder()
    node = DetectorCore(
        BuggyPipeline({7: _Unprintable()}),
        DetectorParams(device="cpu"),
        classes=classes,
        ports=recorder.ports(),
        logger=recorder,
    )
    node.start()
    try:
        node.submit(image_msg(classes, 7, sec=1))
        assert node.wait_idle(10)
        node.submit(image_msg(classes, 8, sec=2))
        assert node.wait_idle(10)
    finally:
        node.stop()
    assert [m.header.stamp.sec for m in recorder.detections] == [2]
    assert node.counters.failed == 1 and node.counters.processed == 1
    (trace,) = recorder.errors
    assert "_Unprintable: <message unavailable" in trace and "Traceback" in trace


def test_node_core_bug_in_debug_image_keeps_traceback(classes, monkeypatch):
    """The optional debug image failing for a bug does not fail the frame, but says where."""
    from dds_perception.ros import frames

    def broken_annotate(rgb, detections):
        raise IndexError("box outside the canvas")

    monkeypatch.setattr(frames, "annotate", broken_annotate)
    recorder = Recorder(debug_wanted=True)
    node = DetectorCore(
        FakePipeline(),
        DetectorParams(device="cpu"),
        classes=classes,
        ports=recorder.ports(),
        logger=recorder,
    )
    assert node.process(image_msg(classes, 5)) is not None
    assert node.counters.processed == 1 and recorder.debug == []
    (trace,) = recorder.errors
    assert trace.startswith("debug image not published: IndexError: box outside the canvas")
    assert "in broken_annotate" in trace
