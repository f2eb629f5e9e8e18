"""Export the detector to ONNX (metadata included), validated with ONNX Runtime against PyTorch.

The file alone is enough to run the detector (class names, input size, normalisation, anchors
and thresholds travel in its metadata): ``Pipeline.from_onnx(path)`` or ``backend=onnxruntime``
/ ``tensorrt`` in the node, replay, demo and bench. The network (backbone, RPN head, box decoding)
is exported; NMS stays in the shared pipeline.

examples:
  # full-resolution KITTI input (384x1248, the checkpoint's), opset 17, validated on CPU
  dds-perception export --weights models/dds_detector_synthetic.safetensors --out model.onnx

  # validate on real frames instead of the generated road scenes
  dds-perception export --weights W.safetensors --out model.onnx \\
      --validate-images ../shared/data/kitti_sample/training/image_2/0000*.png

  # Jetson TX2 (JetPack 4.6, TensorRT 8.2 parses opset <= 13), dynamic batch
  dds-perception export --weights W.safetensors --out model.onnx --opset 13 --dynamic-batch

  # fp16 weights and input (ONNX Runtime CUDA); for TensorRT keep fp32 and build fp16:
  dds-perception export --weights W.safetensors --out model_fp16.onnx --half
  dds-perception export --weights W.safetensors --out model.onnx --engine fp16   # on the GPU

  # smaller input (faster, loses the smallest cars)
  dds-perception export --weights W.safetensors --out model_192.onnx --height 192 --width 640

  # the PyTorch weights again, set to run at another input size (a .safetensors --out): what
  # the node, replay and demo then use by default (the shipped model: see its model card)
  dds-perception export --weights runs/cv_kitti/fold0/model.safetensors \\
      --out models/dds_detector_kitti.safetensors --height 352 --width 1152
  # ... or with box voting after NMS stored in the file (0 = off)
  dds-perception export --weights runs/cv_kitti/fold0/model.safetensors \\
      --out models/dds_detector_kitti.safetensors --vote-iou 0.6
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dds_perception.deploy.export import DEFAULT_OPSET, EXPORTERS, export_onnx
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="detector weights (.safetensors)")
    parser.add_argument(
        "--out",
        required=True,
        help="ONNX file to write (atomically); a .safetensors name writes the PyTorch weights "
        "set to run at --height/--width instead",
    )
    parser.add_argument("--height", type=int, help="network input height (default: checkpoint's)")
    parser.add_argument("--width", type=int, help="network input width (default: checkpoint's)")
    parser.add_argument("--half", action="store_true", help="fp16 weights and input")
    parser.add_argument(
        "--dynamic-batch", action="store_true", help="dynamic batch dimension (default: batch 1)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}; 13 for TensorRT 8.2 on a TX2)",
    )
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="torch.onnx exporter: auto = torchscript below opset 18, dynamo from 18",
    )
    parser.add_argument(
        "--validate-images",
        nargs="+",
        default=(),
        metavar="IMAGE",
        help="frames for the ONNX Runtime check (default: generated road scenes)",
    )
    parser.add_argument(
        "--no-validate", action="store_true", help="skip the ONNX Runtime check (not advised)"
    )
    parser.add_argument(
        "--engine",
        choices=("fp16", "fp32"),
        help="also build the TensorRT engine beside the ONNX file (needs tensorrt and a GPU)",
    )
    parser.add_argument("--report", help="write the export report as JSON here")
    parser.add_argument(
        "--nms-iou",
        type=float,
        help="a .safetensors --out: store this NMS IoU in the file (default: the checkpoint's)",
    )
    parser.add_argument(
        "--vote-iou",
        type=float,
        help="a .safetensors --out: store this box-voting IoU in the file, 0 = no voting "
        "(default: the checkpoint's)",
    )
    parser.add_argument(
        "--refine-top-k",
        type=int,
        help="a .safetensors --out of a detector with a second stage: refine this many "
        "candidates per image (default: the checkpoint's)",
    )
    parser.add_argument(
        "--refine-score-weight",
        type=float,
        help="a .safetensors --out of a detector whose second stage predicts IoUs: their "
        "weight in the refined candidates' scores, 0-1 (default: the checkpoint's)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dds_perception").setLevel(logging.INFO)
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    size = (args.height, args.width) if args.height is not None else None
    if Path(args.out).suffix == ".safetensors":
        return export_weights(args, size)
    post = _post_settings(args)
    if post:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in post)
        raise UsageError(
            f"{flags}: set in a .safetensors export first; the ONNX export carries "
            "the weights file's post-processing settings"
        )
    if args.engine:  # fail before the export, not after it
        from dds_perception.deploy.backends import TRT_INSTALL, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            raise UsageError(f"--engine: {reason}; {TRT_INSTALL}")
    report = export_onnx(
        args.weights,
        args.out,
        input_size=size,
        half=args.half,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        exporter=args.exporter,
        validate=not args.no_validate,
        validation_images=args.validate_images,
    )
    print(report.summary())
    result = report.to_json()
    if args.engine:
        from dds_perception.deploy.backends import TensorRTBackend

        backend = TensorRTBackend(args.out, half=args.engine == "fp16")
        print(f"tensorrt engine: {backend.engine_path}")
        result["engine"] = backend.describe()
    if args.report:
        write_json(args.report, result)
    return 0


def _post_settings(args: argparse.Namespace) -> dict[str, float]:
    """The inference settings a weights file stores, as given on the command line
    (``--nms-iou``, ``--vote-iou``, ``--refine-top-k``, ``--refine-score-weight``)."""
    names = ("nms_iou", "vote_iou", "refine_top_k", "refine_score_weight")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def export_weights(args: argparse.Namespace, size: tuple[int, int] | None) -> int:
    """``--out X.safetensors``: the detector of ``--weights`` saved to run at ``size`` (the
    network is fully convolutional; its anchors follow the input) and/or with other
    post-processing IoUs. Recipe and metrics travel along, with the size they were measured at.
    """
    from dds_perception.detection.config import DetectorConfigError
    from dds_perception.detection.weights import load_detector, save_detector

    post = _post_settings(args)
    if size is None and not post:
        raise UsageError(
            f"--out {args.out}: a .safetensors export needs --height and --width, or "
            "--nms-iou / --vote-iou / --refine-top-k / --refine-score-weight"
        )
    onnx_only = {
        "--half": args.half,
        "--dynamic-batch": args.dynamic_batch,
        "--engine": args.engine,
        "--validate-images": args.validate_images,
        "--opset": args.opset != DEFAULT_OPSET,
    }
    given = [name for name, value in onnx_only.items() if value]
    if given:
        raise UsageError(f"{', '.join(given)}: ONNX options; --out {args.out} writes weights")
    # the second stage's settings are checked (and set) by the loader, which names a file
    # without one
    model = load_detector(
        args.weights,
        input_size=size,
        refine_top_k=post.get("refine_top_k"),
        refine_score_weight=post.get("refine_score_weight"),
    )
    meta = model.meta
    try:
        model.config = model.config.replace(**post)
    except DetectorConfigError as error:
        raise UsageError(f"--out {args.out}: {error}") from error
    save_detector(
        args.out,
        model,
        recipe=meta.get("recipe"),
        metrics=meta.get("metrics"),
        exported_from={"weights": str(args.weights), "input_size": meta.get("input_size")},
    )
    height, width = model.config.input_size
    settings = "".join(f", {name} {value:g}" for name, value in post.items())
    print(
        f"{args.out}: the detector of {args.weights} at input {height}x{width} "
        f"(was {'x'.join(map(str, meta.get('input_size', [])))}){settings}"
    )
    return 0
