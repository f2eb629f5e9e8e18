"""Export the detector network to ONNX, carry its metadata, and check it with ONNX Runtime.

What is exported: backbone + RPN head + box decoding, i.e. the eval ``forward`` of
:class:`~dds_perception.detection.detector.RPNDetector`, after the pipeline's graph-level
speed-ups (``detection.optimize``: BatchNorm folded into the convolutions, equal-dilation
pyramid branches merged) and with PReLU written as ``relu(x) - w * relu(-x)``
(:class:`DecomposedPReLU`, 2.3x faster in ONNX Runtime); outputs identical. Input ``images``
(N, 3, H, W): the letterboxed RGB frame normalised as ``(pixel - 255 * mean) / (255 * std)``
(the pipeline's preprocessing, unchanged). Outputs ``scores`` (N, K) car probabilities and
``boxes`` (N, K, 4) x1, y1, x2, y2 in network-input pixels, one row per anchor. Score
threshold, NMS and top-k stay in the shared pipeline postprocess
(``torchvision.ops.batched_nms``), so every backend's detections go through the same code.

Exporters: torch's ``dynamo=True`` exporter needs opset >= 18; the TorchScript exporter serves
opsets 9-20 and is the one that reaches old runtimes (TensorRT 8.2 on a Jetson TX2 parses opset
<= 13). ``exporter="auto"`` picks TorchScript below opset 18 and dynamo from 18 on. Both export
the pyramid block's ``split``/``cat`` (ONNX ``Split``/``Concat``), the dilated depthwise
convolutions (``Conv`` with ``group`` and ``dilations``), PReLU and the decoding (``Exp``,
``Clip``) without custom operators.

Right after export the file is run with ONNX Runtime on the CPU against PyTorch on real-looking
frames (given images, or a generated road scene): the maximum absolute difference of scores and
boxes is reported, written into the file's metadata, and an export whose difference exceeds the
tolerance is refused (the file is not kept).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dds_perception.data.letterbox import letterbox_image
from dds_perception.data.scenes import render_scene
from dds_perception.deploy.backends import ort_session
from dds_perception.deploy.onnx_meta import (
    ARCHITECTURE,
    INPUT_NAME,
    OUTPUT_NAMES,
    TASK,
    OnnxModelError,
    file_sha256,
    read_onnx_info,
    set_metadata,
)
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.optimize import InferenceOptions, optimize_for_inference
from dds_perception.detection.postprocess import PostprocessParams, postprocess
from dds_perception.detection.weights import load_detector
from dds_perception.utils.errors import DdsPerceptionError
from dds_perception.utils.io import atomic_path, cache_dir

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORTERS = ("auto", "dynamo", "torchscript")
# max |onnxruntime - torch| accepted right after export, per precision
# fp16 boxes: 0.5 % of the input's longer side (6 px at 1248): fp16 keeps 11 significant bits,
# and ONNX Runtime and torch accumulate the 17 layers' fp16 rounding differently
TOLERANCE = {"fp32": {"scores": 1e-3, "boxes": 0.05}, "fp16": {"scores": 2e-2, "boxes": 0.005}}
RELATIVE_BOX_TOLERANCE = {"fp32": False, "fp16": True}
PAD_VALUE = 114


class ExportError(DdsPerceptionError, ValueError):
    """The export or its ONNX Runtime validation failed; the output file was not written."""


class DecomposedPReLU(nn.Module):
    """``PReLU`` as ``relu(x) - w * relu(-x)``: the same values, and what ONNX Runtime runs fast.

    ONNX Runtime's CPU ``PRelu`` kernel with a per-channel slope broadcasts element by element
    and breaks its NCHWc layout chains: on the full-size detector (384x1248, 1 thread) it took
    323 of ~500 ms. ``Relu``/``Neg``/``Mul``/``Sub`` run vectorised and the whole network ran
    2.3x faster (measured: 384 -> 166 ms median, same machine, same minute; outputs equal to
    1e-7). Exact: for x >= 0 it is ``x - w * 0``, for x < 0 it is ``0 - w * (-x) = w * x``.
    TensorRT fuses the four point-wise operators into one kernel.
    """

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        weight = prelu.weight.detach().clone()
        self.weight = nn.Parameter(weight.view(1, -1, 1, 1) if weight.numel() > 1 else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - self.weight * torch.relu(-x)


def decompose_prelu(model: nn.Module) -> int:
    """Replace every ``nn.PReLU`` in ``model`` by :class:`DecomposedPReLU`; return the count."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.PReLU):
            setattr(model, name, DecomposedPReLU(child))
            count += 1
        else:
            count += decompose_prelu(child)
    return count


class ExportedNetwork(nn.Module):
    """The detector's eval forward with positional outputs ``(scores, boxes)`` for torch.onnx."""

    def __init__(self, detector: RPNDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector(images)
        return out["scores"], out["boxes"]


@dataclass
class ExportReport:
    """What an export produced and how closely ONNX Runtime reproduced PyTorch."""

    path: str
    opset: int
    exporter: str
    precision: str  # "fp32" or "fp16"
    dynamic_batch: bool
    input_size: tuple[int, int]
    anchors: int
    size_bytes: int
    export_s: float
    validation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        v = self.validation
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, opset {self.opset}, "
            f"{self.exporter} exporter, {self.precision}, input {self.input_size[0]}x"
            f"{self.input_size[1]}, {'dynamic' if self.dynamic_batch else 'batch 1'}, "
            f"{self.anchors} anchors) in {self.export_s:.1f} s",
        ]
        if v:
            lines.append(
                f"onnxruntime {v['runtime']} vs torch on {v['frames']} frame(s) "
                f"({', '.join(v['sources'])}): max |diff| scores {v['scores_max_abs_diff']:.2e}, "
                f"boxes {v['boxes_max_abs_diff']:.2e} px (tolerance {v['tolerance']['scores']:g}"
                f" / {v['tolerance']['boxes']:g}); detections after NMS torch "
                f"{v['detections_torch']} vs onnx {v['detections_onnx']}"
            )
            if "fp16_vs_fp32" in v:
                d = v["fp16_vs_fp32"]
                lines.append(
                    f"fp16 onnx vs fp32 torch: max |diff| scores {d['scores_max_abs_diff']:.2e}, "
                    f"boxes {d['boxes_max_abs_diff']:.2e} px; detections fp32 "
                    f"{d['detections_fp32']} vs fp16 {d['detections_fp16']}"
                )
        return "\n".join(lines)


# ------------------------------------------------------------------------------ inputs
def street_scene(seed: int = 0, size: tuple[int, int] = (1242, 375)) -> np.ndarray:
    """A generated KITTI-sized road scene (``data.scenes``): the default validation frame.

    It has cars, roads, buildings and sensor noise, so the network's activations cover a
    realistic range (a constant frame would not).
    """
    image, _ = render_scene(np.random.default_rng(seed), size)
    return image


def network_input(rgb: np.ndarray, detector: RPNDetector, input_size: tuple[int, int]):
    """Letterbox and normalise one RGB uint8 frame as the pipeline does: (1, 3, H, W) float32."""
    canvas, _ = letterbox_image(rgb, input_size, PAD_VALUE)
    mean = np.asarray(detector.config.mean, np.float32) * 255.0
    std = np.asarray(detector.config.std, np.float32) * 255.0
    chw = ((canvas.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))[None]


def _read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ExportError(f"validation image {path}: cannot be read as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------ export
def _anchor_meta(detector: RPNDetector, input_size: tuple[int, int], count: int) -> dict:
    config = detector.config
    info = detector.backbone.feature_info
    levels = []
    for name, sizes in zip(config.feature_names(), config.level_sizes(), strict=True):
        stride = int(info[name].stride)
        levels.append(
            {
                "feature": name,
                "stride": stride,
                "grid": [input_size[0] // stride, input_size[1] // stride],
                "sizes": list(sizes),
                "per_location": len(sizes) * len(config.aspect_ratios),
            }
        )
    return {
        "count": int(count),
        "sizes": list(config.anchor_sizes),
        "aspect_ratios": list(config.aspect_ratios),
        "order": "feature map, then location (row-major), then anchor (ratio-major, size inner)",
        "levels": levels,
        "centred": "anchor centres at (i + 0.5) * stride",
    }


def export_network(
    network: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    dynamic_batch: bool = False,
    input_names: Sequence[str] = (INPUT_NAME,),
    output_names: Sequence[str] = OUTPUT_NAMES,
) -> str:
    """``torch.onnx`` export of any network with one input; returns the exporter used.

    The detector export and the benchmark (``ssd300_vgg16`` under the same exporter and opset)
    share it. No metadata and no validation here: see :func:`export_detector`.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r}: use one of {EXPORTERS}")
    if exporter == "auto":
        exporter = "dynamo" if opset >= 18 else "torchscript"
    if exporter == "dynamo" and opset < 18:
        raise ExportError(f"the dynamo exporter needs opset >= 18, got {opset} (use torchscript)")
    if not 9 <= opset <= 23:
        raise ExportError(f"opset {opset}: supported range 9-23 (TensorRT 8.2 needs <= 13)")
    with torch.inference_mode(False), torch.no_grad():
        _torch_export(
            network,
            example,
            Path(path),
            opset=opset,
            exporter=exporter,
            dynamic_batch=dynamic_batch,
            input_names=list(input_names),
            output_names=list(output_names),
        )
    return exporter


def _torch_export(
    network: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int,
    exporter: str,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
) -> None:
    names = {"input_names": input_names, "output_names": output_names}
    with warnings.catch_warnings():
        # the anchors are constants of the traced graph, which is what we want
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        if exporter == "torchscript":
            axes = None
            if dynamic_batch:
                axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
            options = {"dynamo": False, "dynamic_axes": axes}
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=256)},) if dynamic_batch else None
            options = {
                "dynamo": True,
                "dynamic_shapes": shapes,
                "external_data": False,
                "verbose": False,
            }
        torch.onnx.export(network, (example,), str(path), opset_version=opset, **options, **names)


def export_detector(
    detector: RPNDetector,
    out: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
    half: bool = False,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    validate: bool = True,
    validation_images: Sequence[str | os.PathLike[str]] = (),
    source: str | os.PathLike[str] | None = None,
    options: InferenceOptions | None = None,
) -> ExportReport:
    """Export ``detector`` to ``out`` (atomically) and validate it; see the module docstring.

    ``input_size`` (height, width) overrides the config's (multiples of 32); ``half`` exports
    fp16 weights and input (outputs stay fp32); ``source`` is the weights file whose SHA-256 goes
    into the metadata; ``options`` the graph speed-ups applied first (default: the pipeline's;
    layout and compilation are always off). ``detector`` itself is left as it is. Raises
    :class:`ExportError` when the export or its validation fails.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r}: use one of {EXPORTERS}")
    if exporter == "auto":
        exporter = "dynamo" if opset >= 18 else "torchscript"
    if exporter == "dynamo" and opset < 18:
        raise ExportError(f"the dynamo exporter needs opset >= 18, got {opset} (use torchscript)")
    config = detector.config
    if input_size is not None:
        try:
            config = config.replace(input_size=tuple(int(v) for v in input_size))
        except ValueError as error:
            raise ExportError(f"input size {tuple(input_size)}: {error}") from error
    size = tuple(config.input_size)
    # a copy: the caller's detector keeps its BatchNorms, PReLUs, mode and device
    detector = copy.deepcopy(detector).eval().cpu()
    detector.config = config
    batch = 2 if dynamic_batch else 1
    # the pipeline's graph-level speed-ups (BN folded, equal-dilation pyramid branches merged);
    # the layout ones (channels_last, compile) are the runtime's business
    optimize_for_inference(
        detector,
        "cpu",
        example=torch.zeros(1, 3, *size),
        options=replace(
            options or InferenceOptions(), channels_last=False, compile=False, inplace_prelu=False
        ),
        inplace=True,
    )
    decompose_prelu(detector)
    dtype = torch.float16 if half else torch.float32
    network = ExportedNetwork(detector).to(dtype).eval()
    example = torch.zeros(batch, 3, *size, dtype=dtype)
    with torch.inference_mode():
        count = int(network(example)[0].shape[1])
    weights_meta = dict(getattr(detector, "meta", {}) or {})
    meta = {
        "task": TASK,
        "architecture": ARCHITECTURE,
        "config": config.to_dict(),
        "class_names": list(weights_meta.get("class_names", ["car"])),
        "input_size": list(size),
        "normalization": {"mean": list(config.mean), "std": list(config.std), "scale": 255.0},
        "anchors": _anchor_meta(detector, size, count),
        "inputs": {
            INPUT_NAME: {
                "shape": ["batch" if dynamic_batch else 1, 3, *size],
                "dtype": "float16" if half else "float32",
                "layout": "NCHW",
                "content": "letterboxed RGB (pad 114), (pixel - 255 * mean) / (255 * std)",
            }
        },
        "outputs": {
            "scores": "(N, K) car probability per anchor",
            "boxes": "(N, K, 4) x1, y1, x2, y2 in network-input pixels per anchor",
        },
        "postprocess": "score threshold, clip, batched NMS, top-k (dds_perception pipeline)",
        "opset": int(opset),
        "exporter": exporter,
        "precision": "fp16" if half else "fp32",
        "dynamic_batch": bool(dynamic_batch),
        "torch_version": torch.__version__,
        "source_weights": (
            {"file": Path(source).name, "sha256": file_sha256(source)} if source else None
        ),
        "recipe": weights_meta.get("recipe", {}),
        "metrics": weights_meta.get("metrics", {}),
    }
    import onnx

    final = Path(out)
    start = time.perf_counter()
    with atomic_path(final) as tmp:
        try:
            export_network(
                network, example, tmp, opset=opset, exporter=exporter, dynamic_batch=dynamic_batch
            )
        except ExportError:
            raise
        except Exception as error:  # exporter errors come in many types
            raise ExportError(f"torch.onnx ({exporter}, opset {opset}) failed: {error}") from error
        export_s = time.perf_counter() - start
        proto = onnx.load(str(tmp))
        set_metadata(proto, meta)
        onnx.save(proto, str(tmp))
        read_onnx_info(tmp)  # the file we wrote must pass our own load checks
        validation: dict[str, Any] = {}
        if validate:
            validation = validate_export(network, tmp, half=half, images=validation_images)
            set_metadata(proto, {**meta, "validation": validation})
            onnx.save(proto, str(tmp))
    report = ExportReport(
        path=str(final),
        opset=int(opset),
        exporter=exporter,
        precision=meta["precision"],
        dynamic_batch=bool(dynamic_batch),
        input_size=size,
        anchors=count,
        size_bytes=final.stat().st_size,
        export_s=round(export_s, 2),
        validation=validation,
    )
    log.debug("%s", report.summary())
    return report


def export_onnx(
    weights: str | os.PathLike[str], out: str | os.PathLike[str], **options: Any
) -> ExportReport:
    """Load a detector weights file and :func:`export_detector` it (options passed through)."""
    return export_detector(load_detector(weights, device="cpu"), out, source=weights, **options)


def cached_onnx(
    weights: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
    half: bool = False,
    opset: int = DEFAULT_OPSET,
    directory: str | os.PathLike[str] | None = None,
) -> Path:
    """The ONNX export of ``weights``, made (and validated) once and reused while it matches.

    Named by the weights' SHA-256, input size, precision and opset, under :func:`cache_dir`; a
    cached file whose metadata names other source weights is exported again. The TensorRT engine
    built from it is cached beside it.
    """
    from dds_perception.utils.checkpoint import read_meta

    digest = file_sha256(weights)
    size = tuple(input_size) if input_size else tuple(read_meta(weights)["input_size"])
    name = (
        f"{Path(weights).stem}-{digest[:12]}-{size[0]}x{size[1]}-"
        f"{'fp16' if half else 'fp32'}-opset{opset}.onnx"
    )
    path = Path(directory) if directory else cache_dir()
    path = path / name
    if path.is_file():
        try:
            info = read_onnx_info(path)
            if (info.meta.get("source_weights") or {}).get("sha256") == digest:
                log.info("using cached ONNX export %s", path)
                return path
            log.warning("cached ONNX %s was exported from other weights; exporting again", path)
        except OnnxModelError as error:
            log.warning("cached ONNX %s is unusable (%s); exporting again", path, error)
    log.warning("exporting %s to ONNX (once) at %s", weights, path)
    export_onnx(weights, path, input_size=input_size, half=half, opset=opset)
    return path


# ------------------------------------------------------------------------------ validation
def _compare(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    return {
        "scores_max_abs_diff": float(np.abs(a[0].astype(np.float32) - b[0]).max()),
        "boxes_max_abs_diff": float(np.abs(a[1].astype(np.float32) - b[1]).max()),
    }


def _count_detections(config, scores: np.ndarray, boxes: np.ndarray) -> list[int]:
    params = PostprocessParams.from_config(config)
    results = postprocess(
        torch.from_numpy(scores).float(),
        torch.from_numpy(boxes).float(),
        params,
        tuple(config.input_size),
    )
    return [int(r[1].numel()) for r in results]


def validate_export(
    network: ExportedNetwork,
    path: str | os.PathLike[str],
    *,
    half: bool = False,
    images: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Run ``path`` with ONNX Runtime (CPU) and ``network`` with torch on the same frames.

    Returns the max absolute differences and detection counts; raises :class:`ExportError` when a
    difference exceeds :data:`TOLERANCE`.
    """
    import onnxruntime as ort

    detector = network.detector
    size = tuple(detector.config.input_size)
    frames = [_read_rgb(p) for p in images] or [street_scene(seed=0), street_scene(seed=1)]
    sources = [Path(p).name for p in images] or ["generated road scenes"]
    batch = torch.cat([network_input(f, detector, size) for f in frames])
    info = read_onnx_info(path)
    if not info.dynamic_batch:
        batches = [batch[i : i + 1] for i in range(batch.shape[0])]
    else:
        batches = [batch]
    session = ort_session(path, "cpu")[0]
    dtype = torch.float16 if half else torch.float32
    onnx_out, torch_out, fp32_out = [], [], []
    with torch.inference_mode():
        for x in batches:
            scores, boxes = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.to(dtype).numpy()})
            onnx_out.append((scores, boxes))
            s, b = network(x.to(dtype))
            torch_out.append((s.float().numpy(), b.float().numpy()))
            if half:
                s, b = network.float()(x)
                fp32_out.append((s.numpy(), b.numpy()))
                network.half()
    cat = lambda outs: tuple(np.concatenate([o[i] for o in outs]) for i in range(2))  # noqa: E731
    onnx_all, torch_all = cat(onnx_out), cat(torch_out)
    precision = "fp16" if half else "fp32"
    tolerance = dict(TOLERANCE[precision])
    if RELATIVE_BOX_TOLERANCE[precision]:
        tolerance["boxes"] = round(tolerance["boxes"] * max(size), 3)
    result: dict[str, Any] = {
        "runtime": f"{ort.__version__} CPUExecutionProvider",
        "frames": int(batch.shape[0]),
        "sources": sources,
        **_compare(onnx_all, torch_all),
        "tolerance": tolerance,
        "detections_torch": _count_detections(detector.config, *torch_all),
        "detections_onnx": _count_detections(detector.config, *onnx_all),
    }
    if half:
        fp32_all = cat(fp32_out)
        result["fp16_vs_fp32"] = {
            **_compare(onnx_all, fp32_all),
            "detections_fp32": _count_detections(detector.config, *fp32_all),
            "detections_fp16": result["detections_onnx"],
        }
    for key in ("scores", "boxes"):
        if result[f"{key}_max_abs_diff"] > tolerance[key]:
            raise ExportError(
                f"{path}: onnxruntime differs from torch by {result[f'{key}_max_abs_diff']:.3g} "
                f"in {key} (tolerance {tolerance[key]:g}); export not kept"
            )
    return result


__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "DecomposedPReLU",
    "ExportError",
    "ExportReport",
    "ExportedNetwork",
    "OnnxModelError",
    "cache_dir",
    "cached_onnx",
    "decompose_prelu",
    "export_detector",
    "export_network",
    "export_onnx",
    "network_input",
    "street_scene",
    "validate_export",
]
