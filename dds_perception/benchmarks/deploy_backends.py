"""The bench's ``onnxruntime`` and ``tensorrt`` backends: the deployment path of issue 10.

Every network is exported the way ``dds-perception export`` exports the detector (the same
``torch.onnx`` exporter and opset, after the same graph-level speed-ups: BatchNorm folding and
pyramid-branch merging where the settings ask for them) and run with the same runtime settings
as the pipeline (:func:`dds_perception.deploy.backends.ort_session`: intra-op threads = the run's
torch thread count, no busy-waiting; :class:`~dds_perception.deploy.backends.TensorRTEngine`).
Our detector goes through :func:`~dds_perception.deploy.export.export_detector` itself, so its
ONNX Runtime check (max |onnxruntime - torch| of scores and boxes) lands in the run's notes; the
torchvision detectors (``ssd300_vgg16``, ...) through the generic
:func:`~dds_perception.deploy.export.export_network`.

The bench interleaves the models of one backend; :func:`compare_backends` interleaves every
(model, backend) pair in one loop, so that torch against ONNX Runtime is measured under the same
load too (a shared machine's load drifts between the bench's backend groups)::

  python -m dds_perception.benchmarks.deploy_backends --threads 1 --repeats 15
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dds_perception.benchmarks.backends import Settings, TimedBackend, _TupleOutputs
from dds_perception.deploy.backends import (
    ORT_INSTALL,
    TensorRTEngine,
    ort_session,
    tensorrt_unavailable_reason,
)
from dds_perception.deploy.export import DEFAULT_OPSET, export_detector, export_network
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.optimize import optimize_for_inference


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, half: bool, settings: Settings
) -> tuple[list[str], list[str]]:
    """Export ``module`` for ``example`` to ``path``; return (output names, notes)."""
    # the torch backend's graph rewrites; layout and compilation are the runtime's business
    options = replace(settings.options, channels_last=False, compile=False, inplace_prelu=False)
    if isinstance(module, RPNDetector):
        detector = copy.deepcopy(module).eval()
        report = export_detector(
            detector,
            path,
            input_size=tuple(example.shape[-2:]),
            half=half,
            opset=DEFAULT_OPSET,
            options=options,
        )
        v = report.validation
        note = (
            f"{report.exporter} opset {report.opset}; onnxruntime vs torch max |diff| scores "
            f"{v['scores_max_abs_diff']:.1e}, boxes {v['boxes_max_abs_diff']:.1e} px"
        )
        return ["scores", "boxes"], [note]
    network = _TupleOutputs(
        optimize_for_inference(module, "cpu", example=example, options=options)
    ).eval()
    dtype = torch.float16 if half else torch.float32
    network = network.to(dtype)
    x = example.to(dtype)
    with torch.no_grad():
        count = len(network(x))
    names = [f"output{i}" for i in range(count)]
    exporter = export_network(
        network, x, path, opset=DEFAULT_OPSET, input_names=["input"], output_names=names
    )
    return names, [f"{exporter} opset {DEFAULT_OPSET}"]


@contextlib.contextmanager
def _exported(
    module: nn.Module, example: torch.Tensor, half: bool, settings: Settings, *, prefix: str
) -> Iterator[tuple[Path, list[str]]]:
    """``module`` exported by :func:`_export` into a temporary folder: (ONNX path, notes)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = Path(tmp) / "model.onnx"
        _names, notes = _export(module, example, path, half, settings)
        yield path, notes


class OnnxRuntimeBench(TimedBackend):
    """``torch.onnx`` export + ONNX Runtime (CPU or CUDA provider), as the pipeline runs it."""

    name = "onnxruntime"

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed (pip install 'dds_perception[onnx]')"
        if half and device.type != "cuda":
            return "fp16 with onnxruntime is measured on CUDA only"
        if device.type == "cuda" and (
            "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
        ):
            return f"no CUDAExecutionProvider; {ORT_INSTALL}"
        return None

    def build(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> tuple[Callable[[], Any], list[str]]:
        with _exported(module, example, half, settings, prefix="dds_bench_onnx_") as (
            path,
            notes,
        ):
            session, _, providers = ort_session(path, device, threads=settings.threads)
        dtype = np.float16 if half else np.float32
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(example.numpy(), dtype=dtype)}
        notes.append(f"providers {providers}, threads {settings.threads or 'torch default'}")

        def run() -> Any:
            return session.run(None, feed)

        return run, notes


class TensorRTBench(TimedBackend):
    """``torch.onnx`` export + a TensorRT engine (fp16 builder flag with ``--half``)."""

    name = "tensorrt"

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        reason = tensorrt_unavailable_reason()
        if reason is None and device.type != "cuda":
            reason = "TensorRT runs on CUDA devices only (use --device cuda)"
        return reason

    def build(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> tuple[Callable[[], Any], list[str]]:
        # fp16 is the engine's builder flag, so the export stays float32
        with _exported(module, example, False, settings, prefix="dds_bench_trt_") as (
            path,
            notes,
        ):
            engine = TensorRTEngine(
                path, device=device, fp16=half, engine_path=path.with_suffix(".engine")
            )
        x = example.to(engine.device, engine.input_dtype).contiguous()
        notes.append(f"tensorrt {engine.trt.__version__}, {'fp16' if half else 'fp32'} engine")

        def run() -> Any:
            return engine(x)

        return run, notes


def compare_backends(
    models: Sequence[str] = ("dds_rpn_s32", "ssd300_vgg16"),
    backends: Sequence[str] = ("torch", "onnxruntime"),
    *,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 15,
) -> dict[str, Any]:
    """Network latency of every (model, backend) pair on a KITTI frame, all interleaved.

    Returns the timings (ms), each backend's speed ratio of ``ssd300_vgg16`` to ``dds_rpn_s32``
    and each model's torch / other-backend speed-up.
    """
    from dds_perception.benchmarks.backends import get_backend
    from dds_perception.benchmarks.candidates import detector_candidate
    from dds_perception.benchmarks.timing import measure_interleaved, num_threads

    settings, cpu = Settings(threads=threads), torch.device("cpu")
    runs = {}
    with num_threads(threads):
        for name in models:
            candidate = detector_candidate(name)
            for backend in backends:
                prepared = get_backend(backend).prepare(
                    candidate.network, candidate.example(1), device=cpu, half=False,
                    settings=settings,
                )  # fmt: skip
                runs[(name, backend)] = prepared.run
        timings = measure_interleaved(
            {f"{n} / {b}": fn for (n, b), fn in runs.items()}, warmup=warmup, repeats=repeats
        )
    median = {key: timings[f"{key[0]} / {key[1]}"].median_ms for key in runs}
    result: dict[str, Any] = {
        "threads": threads,
        "repeats": repeats,
        "timings": {k: v.to_json() for k, v in timings.items()},
        "ratio_to_ssd300_vgg16": {},
        "speedup_over_torch": {},
    }
    if "ssd300_vgg16" in models and "dds_rpn_s32" in models:
        for b in backends:
            ratio = median[("ssd300_vgg16", b)] / median[("dds_rpn_s32", b)]
            result["ratio_to_ssd300_vgg16"][b] = round(ratio, 3)
    if "torch" in backends:
        for n in models:
            for b in backends:
                if b != "torch":
                    speedup = median[(n, "torch")] / median[(n, b)]
                    result["speedup_over_torch"][f"{n} / {b}"] = round(speedup, 3)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dds_perception.benchmarks.deploy_backends``: print :func:`compare_backends`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=compare_backends.__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", default="torch,onnxruntime")
    args = parser.parse_args(argv)
    result = compare_backends(
        backends=tuple(args.backends.split(",")), threads=args.threads, repeats=args.repeats
    )
    for key, timing in result["timings"].items():
        print(f"{key}: median {timing['median_ms']:.1f} ms "
              f"(min {timing['min_ms']:.1f}, max {timing['max_ms']:.1f})")  # fmt: skip
    print(json.dumps({k: result[k] for k in ("ratio_to_ssd300_vgg16", "speedup_over_torch")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
