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
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dds_perception.benchmarks.backends import (
    Prepared,
    Settings,
    _timed_first_call,
    _TupleOutputs,
)
from dds_perception.deploy.backends import (
    ORT_INSTALL,
    TensorRTEngine,
    ort_session,
    tensorrt_unavailable_reason,
)
from dds_perception.deploy.export import DEFAULT_OPSET, export_detector, export_network
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.optimize import InferenceOptions, optimize_for_inference


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, half: bool, settings: Settings
) -> tuple[list[str], list[str]]:
    """Export ``module`` for ``example`` to ``path``; return (output names, notes)."""
    options = InferenceOptions(
        fold_bn=settings.options.fold_bn,
        merge_pyramid=settings.options.merge_pyramid,
        channels_last=False,
        compile=False,
    )
    if isinstance(module, RPNDetector):
        detector = copy.deepcopy(module).eval()
        report = export_detector(
            detector, path, input_size=tuple(example.shape[-2:]), half=half, opset=DEFAULT_OPSET
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


class OnnxRuntimeBench:
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

    def prepare(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> Prepared:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dds_bench_onnx_") as tmp:
            path = Path(tmp) / "model.onnx"
            _names, notes = _export(module, example, path, half, settings)
            session, _, providers = ort_session(path, device, threads=settings.threads)
        dtype = np.float16 if half else np.float32
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(example.numpy(), dtype=dtype)}
        prepare_s = time.perf_counter() - start
        notes.append(f"providers {providers}, threads {settings.threads or 'torch default'}")

        def run() -> Any:
            return session.run(None, feed)

        return Prepared(
            run=run, prepare_s=prepare_s, first_call_s=_timed_first_call(run), notes=notes
        )


class TensorRTBench:
    """``torch.onnx`` export + a TensorRT engine (fp16 builder flag with ``--half``)."""

    name = "tensorrt"

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        reason = tensorrt_unavailable_reason()
        if reason is None and device.type != "cuda":
            reason = "TensorRT runs on CUDA devices only (use --device cuda)"
        return reason

    def prepare(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> Prepared:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dds_bench_trt_") as tmp:
            path = Path(tmp) / "model.onnx"
            _names, notes = _export(module, example, path, False, settings)  # fp16: engine flag
            engine = TensorRTEngine(
                path, device=device, fp16=half, engine_path=Path(tmp) / "model.engine"
            )
        x = example.to(engine.device, engine.input_dtype).contiguous()
        prepare_s = time.perf_counter() - start
        notes.append(f"tensorrt {engine.trt.__version__}, {'fp16' if half else 'fp32'} engine")

        def run() -> Any:
            return engine(x)

        return Prepared(
            run=run, prepare_s=prepare_s, first_call_s=_timed_first_call(run), notes=notes
        )
