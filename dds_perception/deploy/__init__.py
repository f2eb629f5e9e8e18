"""Deployment: ONNX export with self-describing metadata, and the network backends.

- :mod:`~dds_perception.deploy.onnx_meta`: the metadata an exported file carries (class names,
  input size, normalisation, anchors, the detector config, opset, source weights hash) and the
  checks that refuse a file from another model or opset.
- :mod:`~dds_perception.deploy.export`: ``torch.onnx`` export of the detector network (backbone,
  RPN head and box decoding; NMS stays in the pipeline), validated with ONNX Runtime.
- :mod:`~dds_perception.deploy.backends`: ``torch``, ``onnxruntime`` and ``tensorrt`` backends,
  each a callable from the normalised input batch to per-anchor ``scores`` and ``boxes``, so the
  pipeline's pre- and post-processing are shared and only the network call differs.

``onnx``/``onnxruntime``/``tensorrt`` are imported lazily: the torch path never needs them.
"""

from dds_perception.deploy.backends import (
    BACKENDS,
    Backend,
    BackendError,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    create_backend,
)
from dds_perception.deploy.onnx_meta import OnnxModelError, OnnxModelInfo, read_onnx_info

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "OnnxModelError",
    "OnnxModelInfo",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "create_backend",
    "read_onnx_info",
]
