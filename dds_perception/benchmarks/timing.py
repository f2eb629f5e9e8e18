"""How the benchmarks time things: warm-up, repeats, median/min/max, interleaving, the machine.

Method (the same for every number the bench reports):

* a fixed thread count (``torch.set_num_threads``), recorded with the library versions, the CPU
  and the load average at the start of the run;
* ``warmup`` untimed calls first (oneDNN primitive creation, allocator growth, lazy init);
* then ``repeats`` timed calls with ``time.perf_counter_ns``; on CUDA the device is synchronised
  before the clock starts and after the call, and the device time is also read from CUDA events
  (a single callable is timed by ``torch.utils.benchmark.Timer`` instead, see :func:`measure`);
* the median is the reported value; min and max show the spread (min is the least disturbed
  call on a shared machine, max the worst).

Comparisons whose ratio matters (our detector against ``ssd300_vgg16``) are measured
*interleaved*: every round runs each candidate once, in rotating order, so that a burst of load
from other processes on a shared machine hits all candidates alike.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    samples_ms: tuple[float, ...] = field(repr=False)
    device_median_ms: float | None = None  # CUDA-event time of the device work, when on CUDA

    def to_json(self) -> dict[str, Any]:
        """The JSON form (samples included, rounded to microseconds)."""
        data = asdict(self)
        data["samples_ms"] = [round(s, 3) for s in self.samples_ms]
        for key in ("median_ms", "min_ms", "max_ms", "mean_ms", "device_median_ms"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return data


def summarize(
    samples_ms: list[float], warmup: int, device_ms: list[float] | None = None
) -> Timing:
    """Build a :class:`Timing` from raw samples (milliseconds)."""
    if not samples_ms:
        raise ValueError("no timing samples: repeats must be >= 1")
    return Timing(
        median_ms=statistics.median(samples_ms),
        min_ms=min(samples_ms),
        max_ms=max(samples_ms),
        mean_ms=statistics.fmean(samples_ms),
        repeats=len(samples_ms),
        warmup=warmup,
        samples_ms=tuple(samples_ms),
        device_median_ms=statistics.median(device_ms) if device_ms else None,
    )


class _Clock:
    """Times one call, synchronising CUDA around it when ``device`` is a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float | None]:
        if self.cuda:
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start = time.perf_counter_ns()
            start_event.record()
            fn()
            end_event.record()
            torch.cuda.synchronize(self.device)
            wall = (time.perf_counter_ns() - start) / 1e6
            return wall, start_event.elapsed_time(end_event)
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) / 1e6, None


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> Timing:
    """Time one callable: ``warmup`` untimed calls, then ``torch.utils.benchmark.Timer``'s
    ``blocked_autorange`` for about ``repeats`` calls' worth of time.

    The Timer synchronises an accelerator around its blocks and groups very short calls into
    blocks whose mean is one sample (timer overhead below 0.1 %), so ``samples_ms`` holds one
    value per block: about ``repeats`` of them for calls of a millisecond or more. It runs at
    the thread count in effect (not its default of one thread).
    """
    from torch.utils.benchmark import Timer

    clock = _Clock(torch.device(device))
    estimate = [clock(fn)[0] for _ in range(max(warmup, 1))]  # ms; the warm-up calls
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    min_run_time = max(statistics.median(estimate) * max(repeats, 1) / 1e3, 1e-3)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return summarize([t * 1e3 for t in measurement.times], warmup)


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time several callables round-robin (rotating the order each round); one Timing each.

    Use this when the ratio between the candidates is the result: load from other processes
    then falls on every candidate alike instead of on whichever happened to run during it.
    """
    clock = _Clock(torch.device(device))
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            clock(fns[name])
    walls: dict[str, list[float]] = {n: [] for n in names}
    devs: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, dev = clock(fns[name])
            walls[name].append(wall)
            if dev is not None:
                devs[name].append(dev)
    return {n: summarize(walls[n], warmup, devs[n] or None) for n in names}


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads`` for the block (None: leave it); yield the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_isa() -> list[str]:
    """The vector extensions the CPU reports (they decide which oneDNN kernels run)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def environment_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, machine and settings that a reader needs to judge the numbers."""
    import numpy
    import torchvision

    device = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkldnn_available": bool(torch.backends.mkldnn.is_available()),
        "device": str(device),
    }
    try:
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_average_1_5_15"] = None
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is an install requirement; stay usable without it
        info["memory_total_gb"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
