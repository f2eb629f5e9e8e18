"""Frame statistics and diagnostics content of the detector node, independent of message classes.

:class:`FrameStats` keeps the counters (received, processed, dropped, failed) and the rolling
per-stage latency windows of one stream of frames; :meth:`FrameStats.summary` freezes them into a
:class:`FrameSummary` whose key/values and level (:func:`assess`) make the node's diagnostics.
:class:`DiagnosticReport` is the content of one diagnostic_msgs/DiagnosticStatus, turned into a
message of any class bundle by :func:`diagnostic_array_msg`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

DIAGNOSTIC_TASK = "detector"  # diagnostic_updater publishes it as "dds_detector: detector"
CAMERA_TASK = "camera"  # several cameras: "dds_detector: camera /cam_front/image_raw" each
# "planning": the tracker and the distance estimate (what planners need from /detections)
STAGES = ("decode", "preprocess", "inference", "postprocess", "planning", "end_to_end")
STATS = ("mean", "p50", "p95", "max")
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
RATE_HORIZON = 10.0  # seconds of recent events a rate is computed over


@dataclass(frozen=True)
class Summary:
    """Mean/p50/p95/max of a window of samples (ms)."""

    mean: float
    p50: float
    p95: float
    max: float
    count: int


class RollingStats:
    """The last ``window`` samples of one quantity, summarised on demand."""

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self._values.append(float(value))

    def summary(self) -> Summary | None:
        """None while empty."""
        if not self._values:
            return None
        values = np.fromiter(self._values, dtype=np.float64)
        p50, p95 = np.percentile(values, [50, 95])
        return Summary(
            float(values.mean()), float(p50), float(p95), float(values.max()), int(values.size)
        )

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class Counters:
    """Frames received by the runtime, processed, dropped (replaced unprocessed) and failed."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    failed: int = 0


@dataclass(frozen=True)
class DiagnosticReport:
    """The content of one diagnostic_msgs/DiagnosticStatus, independent of message classes."""

    name: str
    level: int
    message: str
    hardware_id: str
    values: list[tuple[str, str]]

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)


def rate(times: Sequence[float], now: float, horizon: float = RATE_HORIZON) -> float:
    """Events per second over the recent ``horizon`` (0 with fewer than two)."""
    recent = [t for t in times if now - t <= horizon]
    if len(recent) < 2:
        return 0.0
    span = max(now, recent[-1]) - recent[0]
    return (len(recent) - 1) / span if span > 0 else 0.0


@dataclass(frozen=True)
class FrameSummary:
    """A frozen view of :class:`FrameStats` (what one diagnostics update reports)."""

    counters: Counters
    stages: dict[str, Summary | None]  # STAGES and "age"
    failed_recent: int  # failed frames in the outcome window
    window: int  # frames in the outcome window
    rate_hz: float  # processed
    input_rate_hz: float  # received
    last_error: str

    def values(self) -> list[tuple[str, str]]:
        """Rates, per-stage latency statistics (ms), counters and the window's failures."""
        values = [
            ("rate_hz", f"{self.rate_hz:.2f}"),
            ("input_rate_hz", f"{self.input_rate_hz:.2f}"),
        ]
        for name in (*STAGES, "age"):
            summary = self.stages[name]
            for stat in STATS:
                text = f"{getattr(summary, stat):.2f}" if summary else "nan"
                values.append((f"{name}_ms_{stat}", text))
        c = self.counters
        return [
            *values,
            ("frames_received", str(c.received)),
            ("frames_processed", str(c.processed)),
            ("frames_dropped", str(c.dropped)),
            ("frames_failed", str(c.failed)),
            ("failed_in_window", f"{self.failed_recent}/{self.window}"),
        ]


class FrameStats:
    """Counters and rolling windows of one stream of frames (the node's, or one camera's).

    Not thread-safe on its own: the core updates and reads it under its lock.
    """

    def __init__(self, window: int) -> None:
        self.counters = Counters()
        self.last_error = ""
        self._stages = {name: RollingStats(window) for name in (*STAGES, "age")}
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = processed, False = failed
        self._done_times: deque[float] = deque(maxlen=window)
        self._arrival_times: deque[float] = deque(maxlen=window)

    def received(self, now: float) -> None:
        self.counters.received += 1
        self._arrival_times.append(now)

    def dropped(self) -> None:
        self.counters.dropped += 1

    def processed(self, timings: Mapping[str, float], age_ms: float, now: float) -> None:
        """A frame went out: its stage times (ms; stages absent from ``timings`` are skipped)."""
        self.counters.processed += 1
        self._outcomes.append(True)
        self._done_times.append(now)
        for stage in STAGES:
            if stage in timings:
                self._stages[stage].add(timings[stage])
        self._stages["age"].add(age_ms)

    def failed(self, text: str) -> None:
        self.counters.failed += 1
        self._outcomes.append(False)
        self.last_error = text

    def summary(self, now: float) -> FrameSummary:
        return FrameSummary(
            counters=replace(self.counters),
            stages={name: stats.summary() for name, stats in self._stages.items()},
            failed_recent=list(self._outcomes).count(False),
            window=len(self._outcomes),
            rate_hz=rate(list(self._done_times), now),
            input_rate_hz=rate(list(self._arrival_times), now),
            last_error=self.last_error,
        )


def assess(summary: FrameSummary, budget_ms: float, problem: str = "") -> tuple[int, str]:
    """Level and message of a stream of frames: ERROR while a frame of the window failed, WARN
    when the window's p95 end-to-end latency exceeds ``budget_ms`` or for ``problem``, else OK."""
    e2e = summary.stages["end_to_end"]
    if summary.failed_recent:
        return ERROR, (
            f"{summary.failed_recent} of the last {summary.window} frames failed: "
            f"{summary.last_error}"
        )
    if e2e is not None and e2e.p95 > budget_ms:
        return WARN, (
            f"p95 end-to-end latency {e2e.p95:.1f} ms exceeds the {budget_ms:.1f} ms budget"
        )
    if problem:
        return WARN, problem
    if e2e is None:
        return OK, "waiting for images"
    return OK, f"{summary.rate_hz:.1f} Hz, p95 end-to-end {e2e.p95:.1f} ms"


class Throttle:
    """Lets one message through per ``period`` seconds and counts the ones it held back."""

    def __init__(self, period: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._monotonic = monotonic
        self._last: float | None = None
        self.suppressed = 0

    def __call__(self) -> tuple[bool, int]:
        """(pass?, number suppressed since the last one that passed)."""
        now = self._monotonic()
        if self._last is None or now - self._last >= self.period:
            self._last, suppressed, self.suppressed = now, self.suppressed, 0
            return True, suppressed
        self.suppressed += 1
        return False, 0

    def force(self) -> int:
        """Let one through now, whatever the period; the number suppressed before it."""
        self._last, suppressed, self.suppressed = self._monotonic(), self.suppressed, 0
        return suppressed


def stamp_seconds(header: Any) -> float:
    """A std_msgs/Header's stamp in seconds."""
    return float(header.stamp.sec) + float(header.stamp.nanosec) * 1e-9


def diagnostic_level(classes: Any, level: int) -> Any:
    """The level constant of ``classes.DiagnosticStatus`` (bytes in rclpy, int in rosbags)."""
    return getattr(classes.DiagnosticStatus, LEVEL_NAMES[level], level)


def diagnostic_array_msg(reports: Sequence[DiagnosticReport], header: Any, classes: Any) -> Any:
    """diagnostic_msgs/DiagnosticArray of ``classes`` holding one status per report."""
    status = [
        classes.DiagnosticStatus(
            level=diagnostic_level(classes, report.level),
            name=report.name,
            message=report.message,
            hardware_id=report.hardware_id,
            values=[classes.KeyValue(key=key, value=value) for key, value in report.values],
        )
        for report in reports
    ]
    return classes.DiagnosticArray(header=header, status=status)
