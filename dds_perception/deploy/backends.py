"""Network backends: the only part of the pipeline that differs between torch, ORT and TensorRT.

A backend is a callable ``backend(images) -> {"scores": (N, K), "boxes": (N, K, 4)}``: the input
is the pipeline's normalised (N, 3, H, W) tensor, the outputs are per-anchor car probabilities
and decoded boxes in network-input pixels as torch tensors, ready for the shared postprocess.
Every backend also tells the pipeline what it needs: ``input_device`` (where the input tensor
must be), ``input_dtype``, ``channels_last`` (preferred input layout), and what it runs:
``config`` (:class:`DetectorConfig`: input size, normalisation, thresholds), ``class_names``,
``device`` and :meth:`Backend.describe`.

- :class:`TorchBackend`: the detector module (BatchNorm folded, channels_last, fp16 on CUDA)
  under ``torch.inference_mode``.
- :class:`OnnxRuntimeBackend`: an exported ``.onnx`` file (its metadata is the config) on the
  CPU or CUDA execution provider. A requested provider that is not there is an error saying how to
  install it; ``device="auto"`` falls back to the CPU and logs it. ONNX Runtime itself silently
  drops to the CPU when the CUDA provider fails to load; the session's providers are checked so
  that cannot go unnoticed.
- :class:`TensorRTBackend`: a TensorRT engine built from the ``.onnx`` file with the
  ``tensorrt`` Python package (fp16 flag), cached next to the ONNX file as
  ``<name>.<fp16|fp32>.engine`` with a JSON key (ONNX SHA-256, TensorRT version, precision, GPU);
  an engine whose key differs is rebuilt and the reason logged. Works with the TensorRT 8.x
  binding API (JetPack 4.6 on a TX2 ships 8.2) and the 8.5+/10.x named-tensor API.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dds_perception.deploy.onnx_meta import (
    OUTPUT_NAMES,
    OnnxModelInfo,
    file_sha256,
    read_onnx_info,
)
from dds_perception.detection.config import DetectorConfig
from dds_perception.detection.optimize import (
    InferenceOptions,
    cudnn_autotuning,
    optimize_for_inference,
)
from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import atomic_path, write_json
from dds_perception.utils.runtime import resolve_device

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")

ORT_INSTALL = (
    "install ONNX Runtime with CUDA: 'pip uninstall onnxruntime && pip install onnxruntime-gpu' "
    "(x86_64, CUDA 12), or on a Jetson the onnxruntime-gpu wheel for your JetPack from "
    "https://elinux.org/Jetson_Zoo#ONNX_Runtime; or run on the CPU with device=cpu"
)
TRT_INSTALL = (
    "the TensorRT backend needs the 'tensorrt' Python package and an NVIDIA GPU: on a Jetson it "
    "ships with JetPack ('sudo apt install python3-libnvinfer', JetPack 4.6 = TensorRT 8.2, "
    "JetPack 6 = TensorRT 8.6/10); on x86_64 'pip install tensorrt' (CUDA 12); or use "
    "backend=onnxruntime or backend=torch"
)


class BackendError(DdsPerceptionError, ValueError):
    """A backend cannot run here: unknown name, missing package/provider/GPU, bad model file."""


class Backend(abc.ABC):
    """Base class: the attributes every backend sets, and the call signature."""

    name: str = ""
    device: torch.device  # where the network runs (reported in diagnostics)
    input_device: torch.device  # where the pipeline must put the input tensor
    input_dtype: torch.dtype = torch.float32
    channels_last: bool = False
    config: DetectorConfig | None  # None: a bare network (the bench's torchvision models)
    class_names: list[str]
    # batch sizes the network accepts: ``fixed_batch`` N (an export for exactly N images), or up
    # to ``max_batch`` (None: any); the pipeline's ``detect_batch`` splits or pads to fit
    fixed_batch: int | None = None
    max_batch: int | None = None

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network on a normalised NCHW batch: ``{"scores", "boxes"}`` tensors."""

    @property
    def half(self) -> bool:
        """Whether the network computes in fp16."""
        return self.input_dtype == torch.float16

    def describe(self) -> dict[str, Any]:
        """Name, device and precision for logs, diagnostics and the benchmark."""
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": "fp16" if self.half else "fp32",
        }


# ---------------------------------------------------------------------------------- torch
class TorchBackend(Backend):
    """A network ``nn.Module`` after :func:`~dds_perception.detection.optimize.
    optimize_for_inference` (BatchNorm folded, pyramid branches merged/split, NHWC, fp16 on CUDA).

    The module is copied first: the caller's model keeps its modules, weights, mode and device.
    Any network runs (the bench times torchvision's detectors through this class too); a
    detector brings its ``config`` (input size, normalisation, thresholds) and class names.
    ``options`` (:class:`InferenceOptions`) overrides the per-device defaults, which the keyword
    switches otherwise pick: ``channels_last`` defaults to NHWC on the CPU (measured about 3x
    faster for these depthwise-separable networks; the pipeline's buffer already has that
    layout) and to NCHW on CUDA (cuDNN's NHWC depthwise kernels were slower). On CUDA,
    ``cuda_graphs`` (default on) replays the network as a captured graph, one per input shape
    seen (see :class:`~dds_perception.detection.optimize.CUDAGraphModule`); its outputs are
    overwritten by the next call. cuDNN's algorithm search runs only while this backend
    prepares and calls the network (``torch.backends.cudnn.benchmark`` is restored after).
    ``example`` is the input the network is prepared for (default: one zero frame of
    ``input_size`` or the detector's); ``inference_mode=False`` runs with autograd on (the
    bench's "inference_mode=off"); ``cpu_half=True`` allows fp16 on a CPU (the bench's
    precision table; slower than fp32 on CPUs without fp16 arithmetic).
    """

    name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "auto",
        half: bool = False,
        channels_last: bool | None = None,
        fold_batchnorm: bool = True,
        cuda_graphs: bool | None = None,
        input_size: tuple[int, int] | None = None,
        options: InferenceOptions | None = None,
        example: torch.Tensor | None = None,
        inference_mode: bool = True,
        cpu_half: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if half and self.device.type != "cuda" and not cpu_half:
            raise BackendError(f"half=True needs a CUDA device for torch, got {self.device}")
        self.input_device = self.device
        self.input_dtype = torch.float16 if half else torch.float32
        if options is None:
            options = InferenceOptions(
                fold_bn=fold_batchnorm, channels_last=channels_last, cuda_graphs=cuda_graphs
            )
        self.options = options.resolved(self.device, half, model)
        self.channels_last = bool(self.options.channels_last)
        self.config = getattr(model, "config", None)
        self.class_names = list((getattr(model, "meta", None) or {}).get("class_names", ["car"]))
        if example is None:
            size = input_size or (self.config.input_size if self.config is not None else None)
            if size is None:
                raise BackendError(
                    f"{type(model).__name__} has no detector config: give input_size or example"
                )
            # the size frames arrive at: a CUDA graph is captured for exactly this input
            example = torch.zeros((1, 3, *size))
        self.inference_mode = bool(inference_mode)
        # BN folded (the pyramid's too), equal-dilation branches merged, the pyramid producers
        # split per branch, NHWC, fp16: detection.optimize, each measured by `bench` (speed-ups);
        # on a copy of the caller's module
        self.model = optimize_for_inference(
            model, self.device, half, example=example, options=self.options, inplace=False
        )
        # cuDNN's flag inside each call (None on the CPU: nothing to set)
        self._autotune = self.options.cudnn_benchmark if self.device.type == "cuda" else None

    def __call__(self, images: torch.Tensor) -> Any:
        grad_mode = torch.inference_mode() if self.inference_mode else contextlib.nullcontext()
        with grad_mode, cudnn_autotuning(self._autotune):
            return self.model(images)


# ---------------------------------------------------------------------------------- onnxruntime
def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendError(
            "backend onnxruntime needs the 'onnxruntime' package: pip install onnxruntime "
            "(CPU) or onnxruntime-gpu (CUDA), or pip install 'dds_perception[onnx]'"
        ) from error
    return onnxruntime


def ort_session(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    spin: bool = False,
) -> tuple[Any, torch.device, list[str]]:
    """An ONNX Runtime session for any ONNX file: ``(session, device, active providers)``.

    ``device`` ``cpu``, ``cuda[:N]`` (the CUDA provider is required: an error saying how to
    install it when absent) or ``auto`` (CUDA when the provider exists, else the CPU, logged).
    ``threads``: intra-op threads (default: torch's, so both are compared under one setting).
    ``spin``: let idle worker threads busy-wait between operators (ONNX Runtime's own default;
    lower latency on an idle machine, but it burns CPU that the rest of a ROS graph may need).
    Shared by :class:`OnnxRuntimeBackend`, the export check and the benchmark.
    """
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if text == "cpu":  # a warning where a GPU sits unused, a note otherwise
            level = logging.WARNING if torch.cuda.is_available() else logging.INFO
            log.log(
                level,
                "onnxruntime: no CUDAExecutionProvider (available: %s); running on the CPU%s",
                ", ".join(available),
                f" although a GPU is present; {ORT_INSTALL}" if level > logging.INFO else "",
            )
    try:
        resolved = torch.device(text)
    except RuntimeError as error:
        raise BackendError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                f"{', '.join(available)}); {ORT_INSTALL}"
            )
        wanted = "CUDAExecutionProvider"
        providers: list[Any] = [
            (wanted, {"device_id": resolved.index or 0}),
            "CPUExecutionProvider",
        ]
    elif resolved.type == "cpu":
        wanted = "CPUExecutionProvider"
        providers = [wanted]
    else:
        raise BackendError(f"onnxruntime runs on cpu or cuda, not {device!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types
        raise BackendError(f"{path}: onnxruntime cannot load it ({error})") from error
    active = session.get_providers()
    if not active or active[0] != wanted:  # ORT drops to the CPU when CUDA libraries are missing
        raise BackendError(
            f"onnxruntime did not start {wanted} (session providers: {active}); the CUDA "
            f"libraries it needs may be missing; {ORT_INSTALL}"
        )
    return session, resolved, list(active)


class OnnxRuntimeBackend(Backend):
    """An exported detector run by ONNX Runtime (``device``: ``cpu``, ``cuda[:N]`` or ``auto``).

    ``threads`` and ``spin``: see :func:`ort_session`. Inputs go in as host arrays (ONNX Runtime
    copies them to the GPU with the CUDA provider). ``network_only=True`` runs any one-input
    ONNX network without our metadata (the bench's torchvision detectors): no config, every
    graph output returned by name.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        spin: bool = False,
        info: OnnxModelInfo | None = None,
        network_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.info = None if network_only else (info or read_onnx_info(path))
        self.session, self.device, self.providers = ort_session(
            path, device, threads=threads, spin=spin
        )
        self.input_device = torch.device("cpu")
        self.channels_last = False
        graph_input = self.session.get_inputs()[0]
        self._input_name = graph_input.name
        if self.info is None:
            self.config = None
            self.class_names = []
            half = graph_input.type == "tensor(float16)"
            batch = graph_input.shape[0]
            self._outputs = [output.name for output in self.session.get_outputs()]
            self.fixed_batch = batch if isinstance(batch, int) else None
        else:
            self.config = self.info.config
            self.class_names = self.info.class_names
            half = self.info.half
            self._outputs = list(OUTPUT_NAMES)
            self.fixed_batch = None if self.info.dynamic_batch else int(self.info.input_shape[0])
        self.input_dtype = torch.float16 if half else torch.float32
        self._dtype = np.float16 if half else np.float32

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().contiguous().numpy()
        array = np.ascontiguousarray(images, dtype=self._dtype)
        if self.fixed_batch is not None and array.shape[0] != self.fixed_batch:
            raise BackendError(
                f"{self.path} was exported for batch {self.fixed_batch}, got {array.shape[0]} "
                "images; re-export with --dynamic-batch"
            )
        values = self.session.run(self._outputs, {self._input_name: array})
        return {name: torch.from_numpy(v) for name, v in zip(self._outputs, values, strict=True)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers, "onnx": str(self.path)}


# ---------------------------------------------------------------------------------- tensorrt
def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise BackendError(TRT_INSTALL) from error
    return tensorrt


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here (``None`` when it can): for tests and the bench."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the 'tensorrt' Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def engine_path_for(onnx_path: str | os.PathLike[str], half: bool) -> Path:
    """Where the engine for ``onnx_path`` is cached: beside it, named by precision."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.{'fp16' if half else 'fp32'}.engine")


class TensorRTEngine:
    """A TensorRT engine for any ONNX file with one input, built once and cached on disk.

    ``fp16`` sets TensorRT's FP16 builder flag (the ONNX stays fp32; TensorRT picks fp16 kernels
    where they are faster). A dynamic batch dimension gets an optimisation profile up to
    ``max_batch``. The engine is written to ``engine_path`` with a JSON key beside it (ONNX
    SHA-256, TensorRT version, precision, GPU, profile); an engine whose key differs is stale: it
    is rebuilt and the reason logged. An ``engine_path`` given explicitly without a key beside it
    (e.g. built with ``trtexec --saveEngine``) is used as it is when it deserializes.
    ``engine(x)`` returns ``{output name: tensor}`` on the GPU.
    Runs with the TensorRT 8.2-8.4 binding API (JetPack 4.6 / 5.0) and the 8.5+/10.x named-tensor
    API. Used by :class:`TensorRTBackend` and the benchmark.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cuda",
        fp16: bool = False,
        engine_path: str | os.PathLike[str] | None = None,
        workspace_mb: int = 1024,
        max_batch: int = 8,
    ) -> None:
        self.trt = trt = _import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendError(
                f"backend tensorrt needs a CUDA GPU; torch sees none. {TRT_INSTALL}"
            )
        self.device = resolve_device("cuda" if str(device) == "auto" else device)
        if self.device.type != "cuda":
            raise BackendError(f"backend tensorrt runs on cuda devices, not {device!r}")
        torch.cuda.set_device(self.device)
        self.path = Path(path)
        self.fp16 = bool(fp16)
        self.max_batch = int(max_batch)
        self.workspace_mb = int(workspace_mb)
        self.engine_path = Path(engine_path) if engine_path else engine_path_for(path, self.fp16)
        self._user_engine = engine_path is not None
        self.input_name, self.input_shape, self.output_names = _onnx_io(self.path)
        self.dynamic_batch = not isinstance(self.input_shape[0], int)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.major = int(trt.__version__.split(".")[0])
        self.engine = self._load_or_build()
        self.context = self.engine.create_execution_context()
        self._named_api = hasattr(self.engine, "num_io_tensors")  # TensorRT >= 8.5
        self.input_dtype = self._torch_dtype(self._tensor_dtype(self.input_name))

    # ------------------------------------------------------------------ engine cache
    def cache_key(self) -> dict[str, Any]:
        """What an engine depends on; a cached engine with another key is stale."""
        props = torch.cuda.get_device_properties(self.device)
        return {
            "onnx_sha256": file_sha256(self.path),
            "tensorrt": self.trt.__version__,
            "fp16": self.fp16,
            "gpu": f"{props.name} sm_{props.major}{props.minor}",
            "max_batch": self.max_batch if self.dynamic_batch else None,
        }

    def _load_or_build(self):
        key = self.cache_key()
        key_path = self.engine_path.with_name(self.engine_path.name + ".json")
        if self.engine_path.is_file():
            try:
                cached = json.loads(key_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cached = None
            if cached == key:
                engine = self._deserialize(self.engine_path.read_bytes())
                if engine is not None:
                    log.info("tensorrt: loaded cached engine %s", self.engine_path)
                    return engine
                log.warning(
                    "tensorrt: cached engine %s does not load; rebuilding", self.engine_path
                )
            elif cached is None and self._user_engine:  # e.g. built by trtexec on the device
                engine = self._deserialize(self.engine_path.read_bytes())
                if engine is not None:
                    log.warning(
                        "tensorrt: using %s as given (no cache key beside it: it must have been "
                        "built from %s for this GPU)",
                        self.engine_path,
                        self.path.name,
                    )
                    return engine
                log.warning(
                    "tensorrt: %s does not load with TensorRT %s; rebuilding",
                    self.engine_path,
                    self.trt.__version__,
                )
            else:
                changed = (
                    sorted(k for k in key if cached.get(k) != key[k])
                    if isinstance(cached, dict)
                    else ["no readable cache key"]
                )
                log.warning(
                    "tensorrt: engine %s is stale (%s changed); rebuilding",
                    self.engine_path,
                    ", ".join(changed),
                )
        blob = self._build()
        try:
            with atomic_path(self.engine_path) as tmp:
                tmp.write_bytes(blob)
            write_json(key_path, key)
            log.info("tensorrt: engine cached at %s", self.engine_path)
        except OSError as error:  # e.g. a read-only install share: keep it in memory only
            log.warning("tensorrt: cannot cache the engine at %s (%s)", self.engine_path, error)
        engine = self._deserialize(blob)
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT built an engine it cannot deserialize")
        return engine

    def _deserialize(self, blob: bytes):
        runtime = self.trt.Runtime(self.logger)
        return runtime.deserialize_cuda_engine(blob)

    def _build(self) -> bytes:
        trt = self.trt
        start = time.perf_counter()
        log.warning(
            "tensorrt %s: building a %s engine from %s (minutes on a Jetson)",
            trt.__version__,
            "fp16" if self.fp16 else "fp32",
            self.path,
        )
        builder = trt.Builder(self.logger)
        flags = 0
        if self.major < 10:  # explicit batch is the only mode from TensorRT 10 on
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(
                f"{self.path}: TensorRT {trt.__version__} cannot parse it: {errors}. TensorRT 8.2 "
                "(JetPack 4.6) needs 'dds-perception export --opset 13'"
            )
        config = builder.create_builder_config()
        workspace = self.workspace_mb << 20
        if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        else:
            config.max_workspace_size = workspace
        if self.fp16:
            if not getattr(builder, "platform_has_fast_fp16", True):  # gone in newer TRT
                log.warning(
                    "tensorrt: this GPU has no fast fp16; building with the fp16 flag anyway"
                )
            config.set_flag(trt.BuilderFlag.FP16)
        if self.dynamic_batch:
            profile = builder.create_optimization_profile()
            chw = tuple(int(v) for v in self.input_shape[1:])
            profile.set_shape(self.input_name, (1, *chw), (1, *chw), (self.max_batch, *chw))
            config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendError(
                f"{self.path}: TensorRT {trt.__version__} failed to build an engine"
            )
        log.warning("tensorrt: engine built in %.0f s", time.perf_counter() - start)
        return bytes(blob)

    # ------------------------------------------------------------------ execution
    def _torch_dtype(self, trt_dtype) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=self.trt.nptype(trt_dtype))).dtype

    def _tensor_dtype(self, name: str):
        if hasattr(self.engine, "num_io_tensors"):
            return self.engine.get_tensor_dtype(name)
        return self.engine.get_binding_dtype(self.engine.get_binding_index(name))

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        x = images.to(self.device, self.input_dtype).contiguous()
        n = int(x.shape[0])
        if not self.dynamic_batch and n != int(self.input_shape[0]):
            raise BackendError(
                f"{self.path} was exported for batch {self.input_shape[0]}, got {n}; "
                "re-export with --dynamic-batch"
            )
        if self.dynamic_batch and n > self.max_batch:
            raise BackendError(f"batch {n} exceeds the engine's max_batch {self.max_batch}")
        stream = torch.cuda.current_stream(self.device)
        outputs: dict[str, torch.Tensor] = {}
        if self._named_api:
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self._torch_dtype(self.engine.get_tensor_dtype(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            ok = self.context.execute_async_v3(stream.cuda_stream)
        else:  # TensorRT 8.2-8.4 binding API
            engine = self.engine
            bindings = [0] * engine.num_bindings
            index = engine.get_binding_index(self.input_name)
            if self.dynamic_batch:
                self.context.set_binding_shape(index, tuple(x.shape))
            bindings[index] = x.data_ptr()
            for name in self.output_names:
                i = engine.get_binding_index(name)
                shape = tuple(self.context.get_binding_shape(i))
                dtype = self._torch_dtype(engine.get_binding_dtype(i))
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                bindings[i] = outputs[name].data_ptr()
            ok = self.context.execute_async_v2(bindings, stream.cuda_stream)
        if not ok:
            raise BackendError(f"tensorrt: inference failed on {self.engine_path}")
        return outputs


def _onnx_io(path: Path) -> tuple[str, tuple[int | str, ...], list[str]]:
    """(input name, input shape, output names) of a one-input ONNX file (weights not loaded)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise BackendError(f"{path}: not a readable ONNX model ({error})") from error
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BackendError(f"{path}: {len(inputs)} graph inputs; the engine runner takes one")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    return inputs[0].name, shape, [o.name for o in proto.graph.output]


class TensorRTBackend(Backend):
    """An exported detector run by a :class:`TensorRTEngine` (engine cached beside the ONNX).

    ``half`` sets the fp16 builder flag; ``engine_path``, ``workspace_mb`` and ``max_batch`` go
    to the engine. ``network_only=True``: any one-input ONNX network (every output by name).
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cuda",
        half: bool = False,
        info: OnnxModelInfo | None = None,
        network_only: bool = False,
        **engine_options: Any,
    ) -> None:
        _import_tensorrt()  # the install hint before anything else
        self.info = None if network_only else (info or read_onnx_info(path))
        self.path = Path(path)
        self.config = None if self.info is None else self.info.config
        self.class_names = [] if self.info is None else self.info.class_names
        self.fp16 = bool(half or (self.info is not None and self.info.half))
        self.engine = TensorRTEngine(path, device=device, fp16=self.fp16, **engine_options)
        self.device = self.input_device = self.engine.device
        self.input_dtype = self.engine.input_dtype
        self.channels_last = False
        if self.engine.dynamic_batch:
            self.max_batch = self.engine.max_batch
        else:
            self.fixed_batch = int(self.engine.input_shape[0])
        self._outputs = list(OUTPUT_NAMES) if self.info is not None else None

    @property
    def engine_path(self) -> Path:
        return self.engine.engine_path

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        out = self.engine(images)
        if self._outputs is None:
            return out
        return {name: out[name].float() for name in self._outputs}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": "fp16" if self.fp16 else "fp32",
            "tensorrt": self.engine.trt.__version__,
            "engine": str(self.engine_path),
            "onnx": str(self.path),
        }


# ---------------------------------------------------------------------------------- factory
def create_backend(
    name: str,
    model_or_path: torch.nn.Module | str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    half: bool = False,
    **options: Any,
) -> Backend:
    """Build the backend called ``name`` (one of :data:`BACKENDS`) for a module or ONNX file."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "torch":
        if not isinstance(model_or_path, torch.nn.Module):
            raise BackendError(
                f"backend torch needs a detector weights file, got {model_or_path} "
                "(an ONNX file runs with backend onnxruntime or tensorrt)"
            )
        return TorchBackend(model_or_path, device=device, half=half, **options)
    if isinstance(model_or_path, torch.nn.Module):
        raise BackendError(f"backend {name} needs an exported .onnx file, not a module")
    if name == "onnxruntime":
        backend = OnnxRuntimeBackend(model_or_path, device=device, **options)
        if half and not backend.info.half:
            raise BackendError(
                f"{model_or_path} is an fp32 export; for fp16 with onnxruntime export with "
                "--half (or use backend tensorrt, which sets fp16 at engine build)"
            )
        return backend
    return TensorRTBackend(model_or_path, device=device, half=half, **options)
