"""Peak memory of one piece of work: CPU resident set (RSS) and, on CUDA, peak allocated.

CPU: on Linux the kernel's high-water mark of the resident set (``VmHWM``) is reset by writing
``5`` to ``/proc/self/clear_refs``, so the peak of *this* piece of work is read exactly. Where
that is not possible (other systems, restricted /proc), a background thread samples the RSS
with psutil every millisecond instead, and the result says which method gave it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

_MB = 2**20


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory while running a callable, in MiB."""

    rss_before_mb: float
    peak_rss_mb: float
    peak_rss_delta_mb: float  # peak minus the RSS before the work: what the work itself added
    method: str  # "vmhwm" (kernel high-water mark) or "sampled" (psutil polling)
    cuda_peak_allocated_mb: float | None = None
    cuda_peak_reserved_mb: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _read_vmhwm_kb() -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _read_vmhwm_kb() is not None


class _Sampler(threading.Thread):
    def __init__(self, interval_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def measure_peak_memory(
    fn: Callable[[], Any], *, device: torch.device | str = "cpu", calls: int = 1
) -> MemoryPeak:
    """Run ``fn`` ``calls`` times and return the peak CPU RSS (and CUDA memory) it reached."""
    device = torch.device(device)
    process = psutil.Process()
    before = process.memory_info().rss
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if _reset_vmhwm():
        for _ in range(calls):
            fn()
        peak = (_read_vmhwm_kb() or 0) * 1024
        method = "vmhwm"
    else:
        sampler = _Sampler()
        sampler.start()
        try:
            for _ in range(calls):
                fn()
        finally:
            peak = sampler.stop()
        method = "sampled"
    cuda_alloc = cuda_reserved = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        cuda_alloc = torch.cuda.max_memory_allocated(device) / _MB
        cuda_reserved = torch.cuda.max_memory_reserved(device) / _MB
    peak = max(peak, before)
    return MemoryPeak(
        rss_before_mb=before / _MB,
        peak_rss_mb=peak / _MB,
        peak_rss_delta_mb=(peak - before) / _MB,
        method=method,
        cuda_peak_allocated_mb=cuda_alloc,
        cuda_peak_reserved_mb=cuda_reserved,
    )
