"""How the bench makes a network ready on a backend: it times the deploy backends themselves.

Every measurement runs a :class:`dds_perception.deploy.backends.Backend`, the objects the
pipeline runs (there is no second implementation here): ``torch`` is
:class:`~dds_perception.deploy.backends.TorchBackend` (a copy of the network after
:func:`~dds_perception.detection.optimize.optimize_for_inference` under the given
:class:`Settings`); ``onnxruntime`` and ``tensorrt`` export the network as ``dds-perception
export`` does (our detector through :func:`~dds_perception.deploy.export.export_detector`, whose
ONNX Runtime check lands in the notes; torchvision's through
:func:`~dds_perception.deploy.export.export_network`) and run it with
:class:`~dds_perception.deploy.backends.OnnxRuntimeBackend` or
:class:`~dds_perception.deploy.backends.TensorRTBackend`. A :class:`BenchBackend` turns
``(module, example input, device, half, settings)`` into a :class:`Prepared` network: a
zero-argument callable that runs the deploy backend once on the prepared input, plus what
preparing it cost. Another is added with :func:`register_backend` and then appears under
``--backend``. :mod:`.deploy_backends` (the interleaved torch / ONNX Runtime comparison) builds
on this module; nothing here imports it.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dds_perception.benchmarks.timing import num_threads
from dds_perception.deploy.backends import (
    ORT_INSTALL,
    Backend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    tensorrt_unavailable_reason,
)
from dds_perception.deploy.export import DEFAULT_OPSET, export_detector, export_network
from dds_perception.deploy.runtime import freed_memory_reuse
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.optimize import (
    CUDAGraphModule,
    InferenceOptions,
    optimize_for_inference,
    to_input_layout,
)
from dds_perception.utils.errors import DdsPerceptionError


class BenchError(DdsPerceptionError, ValueError):
    """A benchmark cannot run as asked (unknown backend, fp16 on CPU, missing package)."""


@dataclass(frozen=True)
class Settings:
    """One point of the speed-up study: the inference options plus run-time switches.

    ``options`` are what the pipeline applies (:class:`InferenceOptions`); the rest are process
    settings a user controls: autograd off (``inference_mode``), oneDNN on (``mkldnn``), the
    intra-op thread count (``threads``; None = the run's count), glibc keeping freed memory
    for reuse (``reuse_memory``, :func:`~dds_perception.deploy.runtime.freed_memory_reuse`,
    which a command opts into for CPU inference) and the precision (``half``; None = the
    run's ``--half``).
    """

    options: InferenceOptions = field(default_factory=InferenceOptions)
    inference_mode: bool = True
    mkldnn: bool = True
    threads: int | None = None
    reuse_memory: bool = True
    half: bool | None = None

    @classmethod
    def plain(cls) -> Settings:
        """Plain eager PyTorch as a user writes it first: ``model.eval()(x)``, nothing else.

        The process-wide settings (threads, the allocator's ``reuse_memory``) stay the run's:
        they cannot be interleaved per call (see the speed-up study's allocator block).
        """
        return cls(
            options=InferenceOptions(
                fold_bn=False,
                channels_last=False,
                merge_pyramid=False,
                dense_pyramid=False,
                split_pyramid=False,
                cudnn_benchmark=False,
                cuda_graphs=False,
                inplace_prelu=False,
            ),
            inference_mode=False,
        )

    def with_(self, **changes: Any) -> Settings:
        """A copy with fields of this object or of its ``options`` changed."""
        option_fields = set(InferenceOptions.__dataclass_fields__)
        options = {k: v for k, v in changes.items() if k in option_fields}
        own = {k: v for k, v in changes.items() if k not in option_fields}
        return replace(self, options=replace(self.options, **options), **own)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("options"))
        return data


@dataclass
class Prepared:
    """A network ready to run: ``run()`` does one forward pass of ``backend`` on its input."""

    run: Callable[[], Any]
    prepare_s: float
    first_call_s: float
    notes: list[str] = field(default_factory=list)
    backend: Backend | None = None


@contextlib.contextmanager
def _run_context(settings: Settings) -> Iterator[None]:
    # process-wide and set around every call, so interleaved variants each run with their own
    # (the bench command owns its process; everything is restored when the call returns)
    with contextlib.ExitStack() as stack:
        stack.enter_context(freed_memory_reuse(settings.reuse_memory))
        stack.enter_context(num_threads(settings.threads))
        if not settings.mkldnn:
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        yield


class BenchBackend(abc.ABC):
    """How the bench builds one kind of deploy backend; ``prepare`` times it the same way for
    all, so that every backend's ``prepare_s`` and ``first_call_s`` mean the same thing."""

    name: str

    @abc.abstractmethod
    def unavailable(self, device: torch.device, half: bool) -> str | None:
        """Why this backend cannot run here (None when it can)."""

    @abc.abstractmethod
    def build(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> tuple[Backend, Any, list[str]]:
        """A deploy backend for ``module`` and the input it is called with, plus notes."""

    def prepare(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> Prepared:
        """Prepare ``module`` for repeated calls on ``example`` (NCHW float32, on CPU)."""
        start = time.perf_counter()
        with _run_context(settings):
            backend, x, notes = self.build(
                module, example, device=device, half=half, settings=settings
            )
        prepare_s = time.perf_counter() - start

        def run() -> Any:
            with _run_context(settings):
                return backend(x)

        # the first call compiles (torch.compile), creates oneDNN primitives or runtime buffers
        start = time.perf_counter()
        run()
        first_call_s = time.perf_counter() - start
        return Prepared(run, prepare_s, first_call_s, notes, backend)


class TorchBench(BenchBackend):
    """:class:`~dds_perception.deploy.backends.TorchBackend` with the settings' speed-ups."""

    name = "torch"

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        return None  # fp16 on a CPU runs too (slowly): the batches section measures it

    def build(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device,
        half: bool,
        settings: Settings,
    ) -> tuple[Backend, Any, list[str]]:
        options = settings.options.resolved(device, half, module)  # e.g. NHWC for this network
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = TorchBackend(
                module,
                device=device,
                half=half,
                options=options,
                example=example,
                inference_mode=settings.inference_mode,
                cpu_half=True,
            )
            x = to_input_layout(example, options, device, half)
        notes = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
        if isinstance(backend.model, CUDAGraphModule):
            notes.append("replayed as one CUDA graph")
        return backend, x, notes


def _flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat: list[torch.Tensor] = []
    for item in outputs:
        flat.extend(_flatten_outputs(item))
    return flat


class _TupleOutputs(nn.Module):
    """Wraps a network so that it returns a flat tuple of tensors (what ONNX export wants)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flatten_outputs(self.module(x)))


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, half: bool, settings: Settings
) -> list[str]:
    """Export ``module`` for ``example`` to ``path`` as the deploy path does; return notes."""
    # the torch backend's graph rewrites; layout and compilation are the runtime's business
    options = replace(settings.options, channels_last=False, compile=False, inplace_prelu=False)
    if isinstance(module, RPNDetector):
        report = export_detector(
            module,
            path,
            input_size=tuple(example.shape[-2:]),
            half=half,
            opset=DEFAULT_OPSET,
            options=options,
            dynamic_batch=example.shape[0] > 1,
        )
        v = report.validation
        return [
            f"{report.exporter} opset {report.opset}; onnxruntime vs torch max |diff| scores "
            f"{v['scores_max_abs_diff']:.1e}, boxes {v['boxes_max_abs_diff']:.1e} px"
        ]
    network = _TupleOutputs(
        optimize_for_inference(copy.deepcopy(module), "cpu", example=example, options=options)
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
    return [f"{exporter} opset {DEFAULT_OPSET}"]


@contextlib.contextmanager
def _exported(
    module: nn.Module, example: torch.Tensor, half: bool, settings: Settings, *, prefix: str
) -> Iterator[tuple[Path, list[str]]]:
    """``module`` exported by :func:`_export` into a temporary folder: (ONNX path, notes)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = Path(tmp) / "model.onnx"
        yield path, _export(module, example, path, half, settings)


class OnnxRuntimeBench(BenchBackend):
    """``torch.onnx`` export + :class:`~dds_perception.deploy.backends.OnnxRuntimeBackend`
    (CPU or CUDA provider), with the pipeline's runtime settings."""

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
    ) -> tuple[Backend, Any, list[str]]:
        with _exported(module, example, half, settings, prefix="dds_bench_onnx_") as (
            path,
            notes,
        ):
            # the session reads the whole file now; the folder may go afterwards
            backend = OnnxRuntimeBackend(
                path, device=device, threads=settings.threads, network_only=True
            )
        x = example.numpy().astype("float16" if half else "float32")
        notes.append(f"providers {backend.providers}, threads {settings.threads or 'default'}")
        return backend, x, notes


class TensorRTBench(BenchBackend):
    """``torch.onnx`` export + :class:`~dds_perception.deploy.backends.TensorRTBackend` (fp16
    builder flag with ``--half``)."""

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
    ) -> tuple[Backend, Any, list[str]]:
        # fp16 is the engine's builder flag, so the export stays float32
        with _exported(module, example, False, settings, prefix="dds_bench_trt_") as (
            path,
            notes,
        ):
            backend = TensorRTBackend(
                path,
                device=device,
                half=half,
                network_only=True,
                engine_path=path.with_suffix(".engine"),
                max_batch=max(8, example.shape[0]),
            )
        x = example.to(backend.device, backend.input_dtype).contiguous()
        notes.append(
            f"tensorrt {backend.engine.trt.__version__}, {'fp16' if half else 'fp32'} engine"
        )
        return backend, x, notes


BACKENDS: dict[str, BenchBackend] = {}


def register_backend(backend: BenchBackend) -> None:
    """Make ``backend`` selectable with ``--backend NAME``."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> BenchBackend:
    """The backend registered as ``name``; unknown names raise :class:`BenchError`."""
    try:
        return BACKENDS[name]
    except KeyError as error:
        raise BenchError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from error


register_backend(TorchBench())
register_backend(OnnxRuntimeBench())
register_backend(TensorRTBench())
