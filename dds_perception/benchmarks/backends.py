"""Backends: how a network is prepared and run. The bench measures every section per backend.

A backend turns ``(module, example input, device, half, settings)`` into a :class:`Prepared`
network: a zero-argument callable that runs the network once on the prepared input, plus what
preparing it cost. ``torch`` applies :func:`dds_perception.detection.optimize.
optimize_for_inference` under the given :class:`Settings`; ``onnxruntime`` and ``tensorrt``
(:mod:`.deploy_backends`, issue 10) export the network as ``dds-perception export`` does and run
it as the pipeline's backends do. Another backend is added with :func:`register_backend` and
then appears under ``--backend``.
"""

from __future__ import annotations

import abc
import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from dds_perception.benchmarks.timing import num_threads
from dds_perception.detection.optimize import (
    CUDAGraphModule,
    InferenceOptions,
    optimize_for_inference,
    to_input_layout,
)
from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.runtime import reuse_freed_memory


class BenchError(DdsPerceptionError, ValueError):
    """A benchmark cannot run as asked (unknown backend, fp16 on CPU, missing package)."""


@dataclass(frozen=True)
class Settings:
    """One point of the speed-up study: the inference options plus run-time switches.

    ``options`` are what the pipeline applies (:class:`InferenceOptions`); the rest are process
    settings a user controls: autograd off (``inference_mode``), oneDNN on (``mkldnn``), the
    intra-op thread count (``threads``; None = the run's count), glibc keeping freed memory
    for reuse (``reuse_memory``, :func:`~dds_perception.utils.runtime.reuse_freed_memory`, which
    the pipeline turns on for CPU inference) and the precision (``half``; None = the run's
    ``--half``).
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
    """A network ready to run: ``run()`` does one forward pass on the prepared input."""

    run: Callable[[], Any]
    prepare_s: float
    first_call_s: float
    notes: list[str] = field(default_factory=list)


class Backend(Protocol):
    """What the bench needs from a backend."""

    name: str

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        """Why this backend cannot run here (None when it can)."""

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


@contextlib.contextmanager
def _run_context(settings: Settings, cudnn_benchmark: bool | None = None) -> Iterator[None]:
    # process-wide and set on every call, so interleaved variants each run with their own;
    # ``cudnn_benchmark`` (None on the CPU) decides cuDNN's algorithms at build / capture time
    reuse_freed_memory(settings.reuse_memory)
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    with contextlib.ExitStack() as stack:
        stack.enter_context(num_threads(settings.threads))
        if not settings.mkldnn:
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        stack.enter_context(torch.inference_mode() if settings.inference_mode else _grad())
        yield


@contextlib.contextmanager
def _grad() -> Iterator[None]:
    with torch.enable_grad():
        yield


def _timed_first_call(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class TimedBackend(abc.ABC):
    """A :class:`Backend` whose ``prepare`` times :meth:`build` and the first call.

    Subclasses say how a network is made ready (:meth:`build`); the timing is written once here
    so that every backend's ``prepare_s`` and ``first_call_s`` mean the same thing.
    """

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
    ) -> tuple[Callable[[], Any], list[str]]:
        """Make ``module`` ready for ``example``; return (one forward pass, notes)."""

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
        run, notes = self.build(module, example, device=device, half=half, settings=settings)
        prepare_s = time.perf_counter() - start
        # the first call compiles (torch.compile), creates oneDNN primitives or runtime buffers
        return Prepared(
            run=run, prepare_s=prepare_s, first_call_s=_timed_first_call(run), notes=notes
        )


class TorchBackend(TimedBackend):
    """Eager PyTorch (optionally ``torch.compile``) with the settings' speed-ups."""

    name = "torch"

    def unavailable(self, device: torch.device, half: bool) -> str | None:
        if half and device.type != "cuda":
            return "fp16 needs CUDA"
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
        options = settings.options.resolved(device, half, module)  # e.g. NHWC for this network
        cudnn = options.cudnn_benchmark if device.type == "cuda" else None
        with _run_context(settings, cudnn), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = optimize_for_inference(module, device, half, example=example, options=options)
            x = to_input_layout(example, options, device, half)
        notes = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
        if isinstance(model, CUDAGraphModule):
            notes.append("replayed as one CUDA graph")

        def run() -> Any:
            with _run_context(settings, cudnn):
                return model(x)

        return run, notes


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


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable with ``--backend NAME``."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; unknown names raise :class:`BenchError`."""
    try:
        return BACKENDS[name]
    except KeyError as error:
        raise BenchError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from error


register_backend(TorchBackend())

# the deployment backends (issue 10): the export and runtime settings of the pipeline's backends
from dds_perception.benchmarks.deploy_backends import OnnxRuntimeBench, TensorRTBench  # noqa: E402

register_backend(OnnxRuntimeBench())
register_backend(TensorRTBench())
