"""The metadata an exported ONNX detector carries, and the checks made before running one.

An exported file is enough to run the detector: its ``metadata_props`` hold one JSON document
under the key ``dds_perception`` (format ``dds_perception.onnx/1``) with the class names, the
network input size and normalisation, the anchors, the full :class:`DetectorConfig` (so the
pipeline's thresholds and letterbox are the checkpoint's), the opset, the exporter, the precision,
and the SHA-256 of the source weights file. The same values are also written as separate,
flat properties (``class_names``, ``input_size``, ``normalization``, ``anchors``) for viewers such
as Netron; only the ``dds_perception`` document is read back.

:func:`read_onnx_info` refuses, with an :class:`OnnxModelError` naming the file and what differs,
a file that is not ONNX, has no such metadata (another model), describes another task or
architecture, a newer format, or whose graph no longer matches its metadata (opset converted,
input size or anchor count changed after export).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dds_perception.detection.config import DetectorConfig, DetectorConfigError
from dds_perception.utils.errors import DdsPerceptionError

META_KEY = "dds_perception"
FORMAT = "dds_perception.onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "boxes")
FLAT_KEYS = ("class_names", "input_size", "normalization", "anchors")
TASK = "detection"
ARCHITECTURE = "rpn_detector"


class OnnxModelError(DdsPerceptionError, ValueError):
    """An ONNX file is unreadable, was not exported by dds-perception, or no longer matches."""


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (weights and ONNX identities, engine cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def set_metadata(model_proto: Any, meta: Mapping[str, Any]) -> None:
    """Write ``meta`` (and its flat copies) into an ``onnx.ModelProto``'s ``metadata_props``."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    values = {META_KEY: doc, **{k: doc[k] for k in FLAT_KEYS if k in doc}}
    keep = [p for p in model_proto.metadata_props if p.key not in values]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model_proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value, sort_keys=True)
    model_proto.producer_name = "dds_perception"


@dataclass(frozen=True)
class OnnxModelInfo:
    """What :func:`read_onnx_info` found in a checked ONNX file."""

    path: Path
    meta: dict[str, Any]  # the dds_perception document
    config: DetectorConfig
    opset: int  # default-domain opset of the graph
    input_shape: tuple[int | str, ...]  # (batch, 3, H, W); batch is a name when dynamic
    input_dtype: str  # "float32" or "float16"

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        return int(self.input_shape[2]), int(self.input_shape[3])

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.input_shape[0], int)

    @property
    def half(self) -> bool:
        return self.input_dtype == "float16"


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def read_onnx_info(path: str | os.PathLike[str]) -> OnnxModelInfo:
    """Read and check an exported detector's metadata against its graph (weights not loaded)."""
    import onnx
    from onnx import helper

    file = Path(path)
    if not file.is_file():
        raise OnnxModelError(f"ONNX file not found: {file}")
    try:
        proto = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # protobuf DecodeError, truncated file, ...
        raise OnnxModelError(f"{file}: not a readable ONNX model ({error})") from error
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise OnnxModelError(
            f"{file}: no '{META_KEY}' metadata (keys present: {sorted(props) or 'none'}; "
            f"producer {proto.producer_name!r}): not exported by 'dds-perception export', so its "
            "class names, input size, normalisation and anchors are unknown"
        )
    try:
        meta = json.loads(props[META_KEY])
    except json.JSONDecodeError as error:
        raise OnnxModelError(f"{file}: metadata '{META_KEY}' is not JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise OnnxModelError(f"{file}: metadata format {got!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise OnnxModelError(
            f"{file}: metadata format_version {version!r}; this dds_perception reads up to "
            f"{FORMAT_VERSION} (upgrade dds_perception or re-export)"
        )
    for key, wanted in (("task", TASK), ("architecture", ARCHITECTURE)):
        if meta.get(key) != wanted:
            raise OnnxModelError(f"{file}: {key} {meta.get(key)!r} in metadata, need {wanted!r}")
    try:
        config = DetectorConfig.from_dict(meta["config"])
    except (KeyError, TypeError, DetectorConfigError) as error:
        raise OnnxModelError(f"{file}: bad detector config in metadata ({error})") from error
    missing = [k for k in ("class_names", "opset", "anchors") if k not in meta]
    if missing:
        raise OnnxModelError(f"{file}: metadata lacks {missing}")

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != meta["opset"]:
        raise OnnxModelError(
            f"{file}: the graph uses opset {opset} but was exported with opset {meta['opset']} "
            "(converted after export?); re-export with 'dds-perception export --opset N'"
        )
    inputs = [
        i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}
    ]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise OnnxModelError(
            f"{file}: graph inputs {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]"
        )
    outputs = {o.name: o for o in proto.graph.output}
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        raise OnnxModelError(
            f"{file}: graph outputs {sorted(outputs)}, expected {sorted(OUTPUT_NAMES)}"
        )
    shape = _dims(inputs[0])
    if len(shape) != 4 or shape[1] != 3:
        raise OnnxModelError(f"{file}: input shape {shape}, expected (batch, 3, height, width)")
    if tuple(shape[2:]) != tuple(config.input_size):
        raise OnnxModelError(
            f"{file}: graph input size {tuple(shape[2:])} differs from the metadata's "
            f"input_size {tuple(config.input_size)}"
        )
    count = meta["anchors"].get("count")
    scores_shape, boxes_shape = _dims(outputs["scores"]), _dims(outputs["boxes"])
    if scores_shape[1:] != (count,) or boxes_shape[1:] != (count, 4):
        raise OnnxModelError(
            f"{file}: outputs scores {scores_shape} / boxes {boxes_shape} do not match the "
            f"metadata's {count} anchors"
        )
    elem = inputs[0].type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem).name
    if dtype not in ("float32", "float16"):
        raise OnnxModelError(f"{file}: input dtype {dtype}, expected float32 or float16")
    return OnnxModelInfo(
        path=file, meta=meta, config=config, opset=int(opset), input_shape=shape, input_dtype=dtype
    )
