"""The bench's sections: backbones, detectors, pipeline, memory, speed-ups, profile, target.

Each section function takes a :class:`BenchConfig` and returns JSON-ready data;
:func:`run_bench` runs them in order and returns the whole result document. Everything is
measured in this one process, on one device, with one thread count.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dds_perception.benchmarks.backends import BenchError, Prepared, Settings, get_backend
from dds_perception.benchmarks.candidates import (
    BACKBONES,
    KITTI_FRAME,
    OUR_DETECTORS,
    OUR_INPUT,
    REFERENCE,
    SHIPPED,
    TORCHVISION_BACKBONES,
    TORCHVISION_DETECTORS,
    Candidate,
    backbone_candidate,
    detector_candidate,
)
from dds_perception.benchmarks.flops import count_model_macs, count_parameters
from dds_perception.benchmarks.memory import measure_peak_memory
from dds_perception.benchmarks.timing import measure, measure_interleaved
from dds_perception.deploy.runtime import freed_memory_reuse
from dds_perception.detection.optimize import InferenceOptions

SCHEMA = "dds_perception.bench/1"
TARGET_RATIO = 4.0  # the paper: 0.1 s against 0.4 s per image on a Jetson TX2
# the node's default detector (the architecture of its weights file): the one the target is
# about, since it is what runs on the vehicle (the paper's stride-32 detector is dds_rpn_s32)
OURS = SHIPPED


@dataclass
class BenchConfig:
    """What to measure and how (``quick()`` gives the seconds-long test configuration)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    half: bool = False
    backends: tuple[str, ...] = ("torch",)
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None  # None: all logical CPUs
    backbones: tuple[str, ...] = (*BACKBONES, *TORCHVISION_BACKBONES)
    backbone_size: int = 224
    backbone_batch: int = 32
    detectors: tuple[str, ...] = (*OUR_DETECTORS, *TORCHVISION_DETECTORS)
    frame: tuple[int, int] = KITTI_FRAME  # (height, width)
    our_input: tuple[int, int] = OUR_INPUT
    compile: bool = True  # measure torch.compile in the speed-up study (slow to compile)
    weights: Path | None = None  # pipeline weights (None: the shipped weights, else untrained)
    frame_image: Path | None = None  # a real frame for the pipeline (None: generated)
    # network input sizes of torchvision detectors (None: what their transform makes of the
    # frame); --quick shrinks them to the smallest sizes they run at
    torchvision_inputs: dict[str, tuple[int, int]] | None = None
    profile: bool = True
    quick: bool = False
    batch_sizes: tuple[int, ...] = (1, 4, 8)  # the batches section
    precisions: tuple[str, ...] = ("fp32", "fp16")  # the batches section
    compile_variants: tuple[str, ...] | None = None  # the compile section (None: all that apply)
    sections: tuple[str, ...] = (
        "backbones",
        "detectors",
        "pipeline",
        "memory",
        "speedups",
        "profile",
        "planning",
        "batches",
    )
    progress: Callable[[str], None] = field(default=lambda message: None, repr=False)
    # built networks and measurements shared between the sections of one run
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def quick_config(cls, **changes: Any) -> BenchConfig:
        """Tiny sizes and few repeats: the whole bench in seconds (for tests, not for numbers)."""
        values: dict[str, Any] = {
            "warmup": 0,
            "repeats": 1,
            "threads": 1,  # OpenMP barriers stall under load from other processes
            "backbone_size": 64,
            "backbone_batch": 2,
            "frame": (60, 190),
            "our_input": (64, 192),
            "torchvision_inputs": {
                "ssd300_vgg16": (268, 268),  # the smallest its valid-padded extras accept
                "ssdlite320_mobilenet_v3_large": (128, 128),
                "fasterrcnn_mobilenet_v3_large_320_fpn": (64, 192),
            },
            "compile": False,
            "quick": True,
            "batch_sizes": (1, 2),
        }
        values.update(changes)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("progress")
        data.pop("cache")
        data["device"] = str(self.device)
        for key in ("weights", "frame_image"):
            data[key] = None if data[key] is None else str(data[key])
        return data


def _detector(name: str, config: BenchConfig) -> Candidate:
    """The named detector, built once per run (preparing a backend copies it)."""
    key = f"detector:{name}"
    if key in config.cache:
        return config.cache[key]
    candidate = detector_candidate(name, config.frame, config.our_input)
    size = (config.torchvision_inputs or {}).get(name)
    if size is not None:
        candidate.input_size = tuple(size)
        candidate.description += f" (--quick: run at {size[1]}x{size[0]})"
    config.cache[key] = candidate
    return candidate


def _settings_default(config: BenchConfig) -> Settings:
    """The pipeline's defaults (what a user gets), at the run's thread count."""
    return Settings(options=InferenceOptions(), threads=config.threads)


def _prepare(
    candidate: Candidate,
    backend_name: str,
    settings: Settings,
    config: BenchConfig,
    batch: int = 1,
) -> Prepared:
    backend = get_backend(backend_name)
    half = config.half if settings.half is None else settings.half
    reason = backend.unavailable(config.device, half)
    if reason:
        raise BenchError(f"backend {backend_name}: {reason}")
    if not candidate.static_shapes:  # a CUDA graph cannot hold data-dependent shapes
        settings = settings.with_(cuda_graphs=False)
    try:
        return backend.prepare(
            candidate.network,
            candidate.example(batch),
            device=config.device,
            half=half,
            settings=settings,
        )
    except BenchError:
        raise
    except Exception as error:  # one variant that cannot be built must not end the run
        message = f"{candidate.name} on {backend_name}: {type(error).__name__}: {error}"
        raise BenchError(message) from error


def _free(*objects: Any) -> None:
    """Drop prepared networks (the caller's names go out of scope) and CUDA's cached blocks."""
    del objects
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- backbones
def bench_backbones(config: BenchConfig) -> list[dict[str, Any]]:
    """Params, MACs, batch-1 latency and batch-N throughput of each classifier."""
    rows = []
    size = config.backbone_size
    for name in config.backbones:
        config.progress(f"backbones: {name}")
        candidate = backbone_candidate(name, size)
        params = count_parameters(candidate.network)
        macs = count_model_macs(candidate.network, candidate.example(1))
        for backend in config.backends:
            row: dict[str, Any] = {
                "name": name,
                "source": candidate.source,
                "backend": backend,
                "input": [size, size],
                "params": params,
                "macs": macs,
            }
            try:
                settings = _settings_default(config)
                one = _prepare(candidate, backend, settings, config, batch=1)
                row["latency_ms"] = measure(
                    one.run, warmup=config.warmup, repeats=config.repeats, device=config.device
                ).to_json()
                if backend == "torch":
                    plain = _prepare(candidate, backend, Settings.plain(), config, batch=1)
                    row["plain_latency_ms"] = measure(
                        plain.run,
                        warmup=config.warmup,
                        repeats=config.repeats,
                        device=config.device,
                    ).to_json()
                    _free(plain)
                batch = _prepare(candidate, backend, settings, config, batch=config.backbone_batch)
                timing = measure(
                    batch.run,
                    warmup=max(1, config.warmup // 2),
                    repeats=max(2, config.repeats // 2),
                    device=config.device,
                )
                row["throughput_batch"] = config.backbone_batch
                row["throughput_img_s"] = round(
                    config.backbone_batch / (timing.median_ms / 1e3), 2
                )
                row["batch_latency_ms"] = timing.to_json()
                _free(one, batch)
            except BenchError as error:
                row["error"] = str(error)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- detectors
def _detector_candidates(config: BenchConfig) -> dict[str, Candidate]:
    names = list(config.detectors)
    if REFERENCE not in names:
        names.append(REFERENCE)  # the ratios need it
    return {n: _detector(n, config) for n in names}


def _ratio_rows(
    timings: dict[str, Any], candidates: dict[str, Candidate], **common: Any
) -> list[dict[str, Any]]:
    reference = timings.get(REFERENCE)
    rows = []
    for name, timing in timings.items():
        row = {"name": name, **common, "network_ms": timing.to_json()}
        if reference is not None:
            row["ratio_to_ssd300_vgg16"] = round(reference.median_ms / timing.median_ms, 3)
            row["ratio_to_ssd300_vgg16_min"] = round(reference.min_ms / timing.min_ms, 3)
        rows.append(row)
    return rows


def bench_detectors(config: BenchConfig) -> dict[str, Any]:
    """Network latency of every detector on a KITTI frame, interleaved, with ratios to SSD300."""
    candidates = _detector_candidates(config)
    info = {}
    for name, candidate in candidates.items():
        config.progress(f"detectors: counting {name}")
        info[name] = {
            "name": name,
            "source": candidate.source,
            "description": candidate.description,
            "input": list(candidate.input_size),
            "params": count_parameters(candidate.network),
            "macs": count_model_macs(candidate.network, candidate.example(1)),
        }
    runs: list[dict[str, Any]] = []
    for backend in config.backends:
        variants = [("optimized", _settings_default(config))]
        if backend == "torch":
            variants.insert(0, ("plain", Settings.plain().with_(threads=config.threads)))
        for label, settings in variants:
            config.progress(f"detectors: {backend} {label}")
            prepared: dict[str, Prepared] = {}
            errors: dict[str, str] = {}
            for name, candidate in candidates.items():
                if backend != "torch" and not candidate.exportable:
                    errors[name] = f"not exported for {backend} (two-stage, data-dependent)"
                    continue
                try:
                    prepared[name] = _prepare(candidate, backend, settings, config)
                except BenchError as error:
                    errors[name] = str(error)
            timings = (
                measure_interleaved(
                    {n: p.run for n, p in prepared.items()},
                    warmup=config.warmup,
                    repeats=config.repeats,
                    device=config.device,
                )
                if prepared  # a backend unavailable here (e.g. tensorrt without a GPU)
                else {}
            )
            rows = _ratio_rows(
                timings,
                candidates,
                backend=backend,
                settings=label,
                settings_detail=settings.to_json(),
            )
            for row in rows:
                row["prepare_s"] = round(prepared[row["name"]].prepare_s, 3)
                row["notes"] = prepared[row["name"]].notes
            cpu = config.device.type == "cpu"  # on CUDA each network is measured alone
            if backend == "torch" and label == "optimized" and "memory" in config.sections and cpu:
                config.cache["memory"] = [
                    _memory_row(name, p, config) for name, p in prepared.items()
                ]
            rows += [
                {"name": n, "backend": backend, "settings": label, "error": e}
                for n, e in errors.items()
            ]
            runs.extend(rows)
            _free(prepared)
    return {"frame": list(config.frame), "models": list(info.values()), "runs": runs}


# ----------------------------------------------------------------------------- memory
def _memory_row(name: str, prepared: Prepared, config: BenchConfig) -> dict[str, Any]:
    config.progress(f"memory: {name}")
    gc.collect()
    peak = measure_peak_memory(prepared.run, device=config.device)
    return {"name": name, "what": "network, batch 1, default settings", **peak.to_json()}


def bench_memory(config: BenchConfig) -> list[dict[str, Any]]:
    """Peak RSS (and on CUDA the network's footprint) of one batch-1 inference per detector.

    CPU: measured on the networks the detectors section prepared (torch backend, default
    settings) when that section ran; prepared here otherwise. CUDA: each network is prepared
    alone, and its footprint is the peak of allocated device memory over what was allocated
    before it was prepared (weights, the CUDA graph's pool of activations, the input).
    """
    if "memory" in config.cache:
        return config.cache["memory"]
    rows = []
    settings = _settings_default(config)
    cuda = config.device.type == "cuda"
    for name, candidate in _detector_candidates(config).items():
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            base_mb = torch.cuda.memory_allocated(config.device) / 2**20
        prepared = _prepare(candidate, "torch", settings, config)
        row = _memory_row(name, prepared, config)
        if cuda:
            row["cuda_footprint_mb"] = round(row["cuda_peak_allocated_mb"] - base_mb, 1)
        rows.append(row)
        del prepared
        _free()
    return rows


# ----------------------------------------------------------------------------- pipeline
def _frame_rgb(config: BenchConfig) -> tuple[np.ndarray, str]:
    """The pipeline's input frame: a real image when given, else a generated road-like one."""
    height, width = config.frame
    if config.frame_image is not None:
        import cv2

        bgr = cv2.imread(str(config.frame_image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BenchError(f"cannot read frame image {config.frame_image}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if rgb.shape[:2] != (height, width):
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb), str(config.frame_image)
    rng = np.random.default_rng(0)
    rows = np.linspace(40, 200, height, dtype=np.float32)[:, None, None]
    rgb = np.clip(rows + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    return rgb, "generated"


def _build_pipeline(config: BenchConfig) -> tuple[Any, str]:
    from dds_perception.pipeline import Pipeline, default_weights

    weights = config.weights
    if weights is None and not config.quick:
        try:
            weights = default_weights()
        except FileNotFoundError:
            weights = None
    if weights is not None:
        pipeline = Pipeline.from_weights(
            weights, device=config.device, half=config.half, input_size=config.our_input
        )
        return pipeline, str(weights)
    candidate = _detector(OURS, config)
    pipeline = Pipeline(candidate.network, device=config.device, half=config.half)
    return pipeline, "untrained (no weights file)"


def _message_builder() -> tuple[Callable[[Any], Any] | None, str]:
    """detections -> vision_msgs/Detection2DArray with rosbags classes, when available."""
    try:
        from dds_perception.ros.messages import (
            detections_to_msg,
            header_msg,
            rosbags_classes,
        )

        classes = rosbags_classes()  # imports rosbags
    except ImportError as error:
        return None, f"unavailable ({error})"
    header = header_msg(1_700_000_000_000_000_000, "camera", classes)
    return (lambda d: detections_to_msg(d, header, classes)), "rosbags typestore classes"


def bench_pipeline(config: BenchConfig) -> dict[str, Any]:
    """A raw rgb8 frame buffer through the whole pipeline, per stage, plus message building.

    Run with the process settings of the default speed-ups (glibc keeping freed memory), which
    a node opts into the same way (the pipeline itself changes no process-wide setting).
    """
    with freed_memory_reuse(_settings_default(config).reuse_memory):
        return _bench_pipeline(config)


def _bench_pipeline(config: BenchConfig) -> dict[str, Any]:
    config.progress("pipeline")
    pipeline, weights = _build_pipeline(config)
    rgb, frame_source = _frame_rgb(config)
    height, width = rgb.shape[:2]
    buffer = rgb.tobytes()  # what a sensor_msgs/Image carries
    build_msg, msg_source = _message_builder()
    stages: dict[str, list[float]] = {}
    totals: list[float] = []
    detections_count = 0

    def once() -> None:
        nonlocal detections_count
        start = time.perf_counter()
        detections = pipeline(buffer, "rgb8", height=height, width=width, step=width * 3)
        timings = dict(detections.timings)
        if build_msg is not None:
            t_msg = time.perf_counter()
            build_msg(detections)
            timings["message"] = (time.perf_counter() - t_msg) * 1e3
        totals.append((time.perf_counter() - start) * 1e3)
        for stage, value in timings.items():
            stages.setdefault(stage, []).append(value)
        detections_count = len(detections)

    for _ in range(config.warmup):
        once()
    stages.clear()
    totals.clear()
    for _ in range(config.repeats):
        once()
    per_stage = {
        stage: {
            "median_ms": round(statistics.median(values), 3),
            "min_ms": round(min(values), 3),
            "max_ms": round(max(values), 3),
        }
        for stage, values in stages.items()
    }
    outside = [
        1.0 - stages["inference"][i] / totals[i] for i in range(len(totals)) if totals[i] > 0
    ]
    peak = measure_peak_memory(once, device=config.device)
    return {
        "frame": [height, width],
        "frame_source": frame_source,
        "encoding": "rgb8",
        "weights": weights,
        "input_size": list(pipeline.input_size),
        "device": str(pipeline.device),
        "precision": "fp16" if pipeline.half else "fp32",
        "pre_and_post_on_device": bool(pipeline.on_device),
        "detections": detections_count,
        "message_building": msg_source,
        "stages": per_stage,
        "total_ms": {
            "median_ms": round(statistics.median(totals), 3),
            "min_ms": round(min(totals), 3),
            "max_ms": round(max(totals), 3),
        },
        "outside_network_share": round(statistics.median(outside), 4),
        "target_outside_share": 0.10,
        "memory": peak.to_json(),
    }


# ----------------------------------------------------------------------------- speed-ups
# (switch, what "off" means, applies to the reference SSD300-VGG16?)
SWITCHES: tuple[tuple[str, str, bool], ...] = (
    ("inference_mode", "autograd on (plain call)", True),
    ("fold_bn", "BatchNorm kept as separate layers", False),
    ("merge_pyramid", "one depthwise conv per branch (4 per pyramid stage)", False),
    (
        "dense_pyramid",
        "each pyramid stage's dilated branches as separate depthwise convs, not one dense conv",
        False,
    ),
    ("inplace_prelu", "PyTorch's PReLU, which writes a new tensor", False),
    ("split_pyramid", "torch.split of the expanded map (copies in NHWC)", False),
    ("channels_last", "NCHW layout", True),
    ("mkldnn", "oneDNN off (ATen's own convolutions)", True),
    ("threads", "1 intra-op thread", True),
    (
        "reuse_memory",
        "glibc's defaults as far as mallopt restores them: blocks above the mmap threshold "
        "(which glibc had raised up to 32 MiB and now stops adapting) mmap'd and page-faulted "
        "again on every call; measured as a block, against a block of the default after it",
        True,
    ),
    ("cudnn_benchmark", "cuDNN's heuristic algorithm choice instead of timing them once", True),
    ("cuda_graphs", "eager launches instead of one replayed CUDA graph", True),
    ("half", "fp32 instead of the run's fp16", True),
)
# CPU libraries, the CPU allocator and the CPU kernel
CPU_ONLY = ("mkldnn", "threads", "reuse_memory", "inplace_prelu")
# switches whose default depends on the device: where it is off, the row turns it on
FLIPPABLE = {
    "channels_last": "NHWC layout for both",
    "dense_pyramid": "each pyramid stage as one dense depthwise conv (zeros in the holes)",
    "split_pyramid": "the expansion split per pyramid branch",
}
CUDA_ONLY = ("cudnn_benchmark", "cuda_graphs", "half")

# process-wide switches whose "off" changes state the next "on" call pays for (the allocator's
# "off" trims the heap that "on" then faults in again): measured as an off block, then an on
# block, each with its own warm-up, instead of interleaved with the pool
BLOCK_SWITCHES = ("reuse_memory",)


def _switch_off(
    settings: Settings, switch: str, config: BenchConfig
) -> tuple[Settings, str | None, str]:
    """The settings with ``switch`` flipped from the default, what that means when it depends
    on the run, and the row's label (``switch=off``, or ``switch=on`` where the default is off
    on this device, e.g. channels_last for fp32 on CUDA)."""
    if switch == "threads":
        current = settings.threads or torch.get_num_threads()
        other = 1 if current > 1 else (os.cpu_count() or 2)
        meaning = f"{other} intra-op thread(s) instead of {current}"
        return settings.with_(threads=other), meaning, f"{switch}=off"
    if switch in FLIPPABLE:  # decided per device (and network): flip what our detector gets
        ours = _detector(OURS, config).network
        resolved = settings.options.resolved(config.device, config.half, ours)
        if not getattr(resolved, switch):
            return settings.with_(**{switch: True}), FLIPPABLE[switch], f"{switch}=on"
    return settings.with_(**{switch: False}), None, f"{switch}=off"


def _applies(switch: str, config: BenchConfig) -> bool:
    """Whether the switch means anything on this run's device (and precision)."""
    if config.device.type == "cuda":
        return switch not in CPU_ONLY and (switch != "half" or config.half)
    return switch not in CUDA_ONLY


def bench_speedups(config: BenchConfig) -> dict[str, Any]:
    """Each speed-up on and off, on our detector and SSD300-VGG16, all interleaved in one pool.

    "on" is the pipeline's default (every eager speed-up); each "off" row turns one switch off
    and keeps the rest, so the difference is that switch's own contribution. ``plain`` is
    eager PyTorch with none of them; ``compile`` is torch.compile on top of the default.
    """
    models = {n: _detector(n, config) for n in (OURS, REFERENCE)}
    default = _settings_default(config)
    variants: list[tuple[str, str, Settings]] = [
        ("plain", "none of the speed-ups", Settings.plain().with_(threads=config.threads)),
        ("default", "all eager speed-ups (the pipeline's default)", default),
    ]
    blocks: list[tuple[str, str, Settings]] = []
    for switch, off_meaning, _ in SWITCHES:
        if not _applies(switch, config):
            continue
        off, meaning, label = _switch_off(default, switch, config)
        variants.append((label, meaning or off_meaning, off))
        if switch in BLOCK_SWITCHES:
            on_meaning = "default, measured as a block after the off block"
            blocks += [variants[-1], (f"{switch}=on", on_meaning, default)]
    if config.compile:
        variants.append(("compile", "torch.compile (inductor) on top of default", default))
    prepared: dict[str, Prepared] = {}
    meta: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, str]] = []
    for label, meaning, settings in [*variants, *(b for b in blocks if b not in variants)]:
        for name, candidate in models.items():
            key = f"{label}|{name}"
            config.progress(f"speed-ups: preparing {key}")
            settings_here = settings
            if label == "compile":
                settings_here = settings.with_(compile=True)
            try:
                prepared[key] = _prepare(candidate, "torch", settings_here, config)
            except BenchError as error:  # e.g. torch.compile without a C compiler
                errors.append({"variant": label, "model": name, "error": str(error)})
                continue
            meta[key] = {
                "variant": label,
                "meaning": meaning,
                "model": name,
                "settings": settings_here.to_json(),
                "prepare_s": round(prepared[key].prepare_s, 3),
                "first_call_s": round(prepared[key].first_call_s, 3),
                "notes": prepared[key].notes,
            }

    failed = {e["variant"] for e in errors}  # a ratio needs both models
    variants = [v for v in variants if v[0] not in failed]
    failed_switches = {label.split("=")[0] for label in failed}
    blocks = [b for b in blocks if b[0].split("=")[0] not in failed_switches]

    def measure(labels: list[str]) -> dict[str, Any]:
        keys = [f"{label}|{name}" for label in labels for name in models]
        runs = {key: prepared[key].run for key in keys}
        return measure_interleaved(
            runs, warmup=config.warmup, repeats=config.repeats, device=config.device
        )

    config.progress("speed-ups: measuring (interleaved)")
    block_labels = [label for label, _, _ in blocks]
    timings = measure([label for label, _, _ in variants if label not in block_labels])
    for label in block_labels:
        config.progress(f"speed-ups: measuring {label} as a block")
        timings.update(measure([label]))
    _free(prepared)
    rows = []
    for key, timing in timings.items():
        rows.append({**meta[key], "latency_ms": timing.to_json()})
    by = {(r["variant"], r["model"]): r["latency_ms"]["median_ms"] for r in rows}
    table = []
    for label, meaning, _ in variants:
        ours, ref = by[(label, OURS)], by[(label, REFERENCE)]
        entry = {
            "variant": label,
            "meaning": meaning,
            f"{OURS}_ms": ours,
            f"{REFERENCE}_ms": ref,
            "ratio": round(ref / ours, 3),
        }
        if label.endswith(("=off", "=on")) and ("default", OURS) in by:
            # the switch's speed-up: time without it over time with it (a "=on" row flips a
            # switch that is off by default on this device)
            switch, state = label.split("=")
            applies = {s: a for s, _, a in SWITCHES}[switch]
            base = f"{switch}=on" if switch in BLOCK_SWITCHES else "default"
            for model, ms, applied in ((OURS, ours, True), (REFERENCE, ref, applies)):
                gain = ms / by[(base, model)] if state == "off" else by[(base, model)] / ms
                entry[f"{model}_gain"] = round(gain, 3) if applied else None
        elif label in ("default", "compile") and ("plain", OURS) in by:
            entry[f"{OURS}_gain_vs_plain"] = round(by[("plain", OURS)] / ours, 3)
            entry[f"{REFERENCE}_gain_vs_plain"] = round(by[("plain", REFERENCE)] / ref, 3)
        table.append(entry)
    return {"models": [OURS, REFERENCE], "table": table, "runs": rows, "errors": errors}


# ----------------------------------------------------------------------------- batches
def bench_batches(config: BenchConfig) -> dict[str, Any]:
    """Ours and SSD300-VGG16 at each batch size and precision with the default speed-ups (the
    same for both), interleaved per (precision, batch): latency per frame, frames per second.

    fp16 on a CPU runs too (converted kernels: slower than fp32 without fp16 arithmetic, which
    is what the table shows there); on CUDA each batch size replays its own CUDA graph.
    """
    models = {n: _detector(n, config) for n in (OURS, REFERENCE)}
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for precision in config.precisions:
        half = precision == "fp16"
        settings = _settings_default(config).with_(half=half)
        for batch in config.batch_sizes:
            config.progress(f"batches: {precision} batch {batch}")
            prepared: dict[str, Prepared] = {}
            for name, candidate in models.items():
                try:
                    prepared[name] = _prepare(candidate, "torch", settings, config, batch=batch)
                except BenchError as error:
                    errors.append({"model": name, "precision": precision, "error": str(error)})
            if not prepared:
                continue
            timings = measure_interleaved(
                {n: p.run for n, p in prepared.items()},
                warmup=config.warmup,
                repeats=config.repeats,
                device=config.device,
            )
            per_frame = {n: t.median_ms / batch for n, t in timings.items()}
            for name, timing in timings.items():
                row = {
                    "name": name,
                    "precision": precision,
                    "batch": batch,
                    "batch_ms": timing.to_json(),
                    "ms_per_frame": round(per_frame[name], 4),
                    # 4 significant digits: 2 decimals were a 1 % error below 0.5 frames/s
                    "frames_per_s": float(f"{1e3 / per_frame[name]:.4g}"),
                    "notes": prepared[name].notes,
                }
                if REFERENCE in per_frame:
                    row["ratio_to_ssd300_vgg16"] = round(per_frame[REFERENCE] / per_frame[name], 3)
                rows.append(row)
            _free(prepared)
    return {
        "models": list(models),
        "batch_sizes": list(config.batch_sizes),
        "precisions": list(config.precisions),
        "rows": rows,
        "errors": errors,
    }


# ----------------------------------------------------------------------------- compile
COMPILE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "eager": ("the default speed-ups, no torch.compile", {}),
    "compile": ("torch.compile, inductor freezing (weights constant-folded)", {"compile": True}),
    "compile_no_freezing": (
        "torch.compile without freezing",
        {"compile": True, "compile_freezing": False},
    ),
    "compile_max_autotune": (
        "torch.compile mode max-autotune-no-cudagraphs (CUDA only: the graphs are ours)",
        {"compile": True, "compile_freezing": False, "compile_mode": "max-autotune-no-cudagraphs"},
    ),
}


def bench_compile(config: BenchConfig) -> dict[str, Any]:
    """torch.compile's options against the eager default on both networks, interleaved; on CUDA
    the compiled network is replayed as a CUDA graph (ours, :class:`CUDAGraphModule`)."""
    models = {n: _detector(n, config) for n in (OURS, REFERENCE)}
    wanted = [v for v in COMPILE_VARIANTS if v != "compile_max_autotune"]
    if config.device.type == "cuda":
        wanted.append("compile_max_autotune")
    if config.compile_variants is not None:
        unknown = [v for v in config.compile_variants if v not in COMPILE_VARIANTS]
        if unknown:
            raise BenchError(
                f"unknown compile variant(s) {unknown}; known: {list(COMPILE_VARIANTS)}"
            )
        wanted = list(config.compile_variants)
    prepared: dict[str, Prepared] = {}
    meta: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, str]] = []
    for variant in wanted:
        meaning, changes = COMPILE_VARIANTS[variant]
        for name, candidate in models.items():
            key = f"{variant}|{name}"
            config.progress(f"compile: preparing {key}")
            settings = _settings_default(config).with_(**changes)
            try:
                prepared[key] = _prepare(candidate, "torch", settings, config)
            except BenchError as error:  # e.g. no C compiler for inductor on the CPU
                errors.append({"variant": variant, "model": name, "error": str(error)})
                continue
            meta[key] = {
                "variant": variant,
                "meaning": meaning,
                "model": name,
                "prepare_s": round(prepared[key].prepare_s, 2),
                "first_call_s": round(prepared[key].first_call_s, 2),
                "notes": prepared[key].notes,
            }
    config.progress("compile: measuring (interleaved)")
    timings = measure_interleaved(
        {k: p.run for k, p in prepared.items()},
        warmup=config.warmup,
        repeats=config.repeats,
        device=config.device,
    )
    _free(prepared)
    rows = [{**meta[k], "latency_ms": t.to_json()} for k, t in timings.items()]
    return {"models": list(models), "rows": rows, "errors": errors}


# ----------------------------------------------------------------------------- profile
_CATEGORIES = (
    ("conv depthwise", lambda name, shapes: "conv" in name and _is_depthwise(shapes)),
    ("conv (other)", lambda name, shapes: "conv" in name),
    ("cat", lambda name, shapes: name == "aten::cat"),
    ("batch norm", lambda name, shapes: "batch_norm" in name),
    ("prelu", lambda name, shapes: "prelu" in name),
    ("add", lambda name, shapes: name in ("aten::add", "aten::add_")),
    ("copy / layout", lambda name, shapes: name in ("aten::copy_", "aten::contiguous")),
)


def _is_depthwise(shapes: Sequence[Any]) -> bool:
    try:
        return len(shapes[1]) == 4 and shapes[1][1] == 1 and shapes[0][1] > 1
    except (IndexError, TypeError):
        return False


def profile_network(network: nn.Module, prepared: Prepared, repeats: int = 3) -> dict[str, Any]:
    """Self CPU time per operator category and the top operators, over ``repeats`` calls."""
    from torch.profiler import ProfilerActivity, profile

    del network
    prepared.run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            prepared.run()
    totals: dict[str, float] = {}
    grand = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("ProfilerStep") or event.self_cpu_time_total <= 0:
            continue
        us = event.self_cpu_time_total
        grand += us
        category = next(
            (c for c, test in _CATEGORIES if test(event.key, event.input_shapes)), "other"
        )
        totals[category] = totals.get(category, 0.0) + us
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "ms_per_call": round(grand / repeats / 1e3, 3),
        "share": {c: round(v / grand, 4) for c, v in sorted(totals.items(), key=lambda i: -i[1])},
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_call": round(e.self_cpu_time_total / repeats / 1e3, 3),
                "calls_per_forward": e.count // repeats,
            }
            for e in top
        ],
    }


def bench_profile(config: BenchConfig) -> dict[str, Any]:
    """Where our detector's time goes, plain eager against the pipeline's default."""
    candidate = _detector(OURS, config)
    result = {}
    for label, settings in (
        ("plain", Settings.plain().with_(threads=config.threads)),
        ("default", _settings_default(config)),
    ):
        config.progress(f"profile: {label}")
        prepared = _prepare(candidate, "torch", settings, config)
        repeats = 1 if config.quick else 3
        result[label] = profile_network(candidate.network, prepared, repeats=repeats)
        _free(prepared)
    return result


# ----------------------------------------------------------------------------- whole run
def target_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Is our detector >= 4x faster than SSD300-VGG16, and under which settings/backend?"""
    ratios = []
    for row in results.get("detectors", {}).get("runs", []):
        if row["name"] == OURS and "ratio_to_ssd300_vgg16" in row:
            ratios.append(
                {
                    "source": "detectors",
                    "backend": row["backend"],
                    "settings": row["settings"],
                    "ratio": row["ratio_to_ssd300_vgg16"],
                }
            )
    for entry in results.get("speedups", {}).get("table", []):
        if entry["variant"] in ("plain", "default", "compile"):
            ratios.append(
                {
                    "source": "speedups",
                    "backend": "torch",
                    "settings": entry["variant"],
                    "ratio": entry["ratio"],
                }
            )
    best = max(ratios, key=lambda r: r["ratio"], default=None)
    return {
        "target_ratio": TARGET_RATIO,
        "ratios": ratios,
        "best": best,
        "reached": bool(best and best["ratio"] >= TARGET_RATIO),
    }


def bench_planning(config: BenchConfig) -> dict[str, Any]:
    """The tracker and the ground-plane distance per frame with 20 cars (issue 19: <= 0.5 ms
    on the CPU); see :mod:`dds_perception.benchmarks.planning`."""
    from dds_perception.benchmarks.planning import measure_planning

    config.progress("planning: tracker + distance, 20 cars")
    return measure_planning(cars=20, frames=30 if config.quick else 300,
                            repeats=1 if config.quick else 5)  # fmt: skip


SECTIONS: dict[str, Callable[[BenchConfig], Any]] = {
    "batches": bench_batches,
    "compile": bench_compile,
    "backbones": bench_backbones,
    "detectors": bench_detectors,
    "pipeline": bench_pipeline,
    "memory": bench_memory,
    "speedups": bench_speedups,
    "profile": bench_profile,
    "planning": bench_planning,
}


def run_bench(config: BenchConfig, command: Sequence[str] = ()) -> dict[str, Any]:
    """Run the configured sections; return the result document (see the README for keys)."""
    from dds_perception.benchmarks.timing import environment_info, num_threads

    unknown = [s for s in config.sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    if config.half and config.device.type != "cuda":
        raise BenchError("--half needs --device cuda (fp16 convolutions are CUDA-only here)")
    for backend in config.backends:
        get_backend(backend)
    torch.manual_seed(0)
    started = time.perf_counter()
    with num_threads(config.threads):
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "command": list(command),
            "environment": environment_info(config.device),
            "config": config.to_json(),
        }
        for section in config.sections:
            section_start = time.perf_counter()
            results[section] = SECTIONS[section](config)
            results.setdefault("section_seconds", {})[section] = round(
                time.perf_counter() - section_start, 1
            )
        results["target"] = target_summary(results)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    return results
