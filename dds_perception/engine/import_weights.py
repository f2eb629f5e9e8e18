"""Import a torchvision MobileNetV2 checkpoint as a self-describing backbone weights file.

The ``.pth`` (a state dict as torchvision saves it, read with ``weights_only=True``) is mapped
into the zoo's ``mobilenet_v2`` or the paper's ``dds_mobilenet_v2`` (each depthwise kernel split
into the pyramid's dilation groups by channel, PReLU slopes starting at 0 = ReLU; see
``models.pretrained``) and written as a classification ``.safetensors`` file whose header holds
the architecture, the 1000 class names, the input normalisation and whether BatchNorm was
folded. ``train-detector --backbone-weights FILE`` then starts from it with frozen BatchNorm and
the file's normalisation.

examples:
  dds-perception import-weights \\
      ../shared/data/pretrained/mobilenet_v2_1.0_imagenet_folded_bn.pth \\
      --model dds_mobilenet_v2 --normalization signed \\
      --labels ../shared/data/pretrained/imagenet_labels.txt \\
      --out runs/imagenet_dds_mnv2.safetensors
  dds-perception import-weights ~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth \\
      --model mobilenet_v2 --out runs/imagenet_mnv2.safetensors       # torchvision's own
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dds_perception.models import get_model
from dds_perception.models.pretrained import (
    convert_mobilenet_v2,
    is_folded_batchnorm,
    read_torchvision_checkpoint,
)
from dds_perception.utils.checkpoint import save_weights

# input normalisation on a 0-1 scale: torchvision's ImageNet checkpoints use ImageNet's
# statistics; TF-trained MobileNets (and the shared folded checkpoint) use x / 127.5 - 1
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "signed": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def read_class_names(path: Path | None, count: int) -> list[str]:
    """``count`` class names from a labels file (TF's extra leading 'background' dropped)."""
    if path is None:
        return [f"class_{i}" for i in range(count)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(names) == count + 1:
        names = names[1:]  # TF label files start with 'background'
    if len(names) != count:
        raise ValueError(f"{path}: {len(names)} class names for a {count}-class classifier")
    return names


def import_weights(
    checkpoint: Path,
    out: Path,
    *,
    model_name: str = "dds_mobilenet_v2",
    width_mult: float = 1.0,
    normalization: str = "imagenet",
    labels: Path | None = None,
) -> dict[str, Any]:
    """Map ``checkpoint`` into ``model_name`` and write ``out``; return the file's metadata."""
    state = read_torchvision_checkpoint(checkpoint)
    classifier = state.get("classifier.1.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 0
    model = get_model(model_name, num_classes=num_classes, width_mult=width_mult)
    converted = convert_mobilenet_v2(state, model, source=str(checkpoint))
    mean, std = NORMALIZATIONS[normalization]
    meta = {
        "task": "classification",
        "arch": dict(model.build_args),
        "class_names": read_class_names(labels, num_classes),
        "input_size": [224, 224],
        "eval_resize": 256,
        "normalization": {"mean": list(mean), "std": list(std)},
        "dataset": "imagenet",
        "imported_from": str(checkpoint),
        "folded_batchnorm": is_folded_batchnorm(state),
    }
    save_weights(out, converted, meta)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dds-perception import-weights``."""
    parser.add_argument("checkpoint", type=Path, help="torchvision MobileNetV2 state dict (.pth)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--model", default="dds_mobilenet_v2", choices=("dds_mobilenet_v2", "mobilenet_v2")
    )
    parser.add_argument("--width-mult", type=float, default=1.0, help="must match the file's")
    parser.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATIONS),
        default="imagenet",
        help="input normalisation the weights expect (signed: x / 127.5 - 1, TF-trained)",
    )
    parser.add_argument("--labels", type=Path, default=None, help="class names, one a line")


def run(args: argparse.Namespace) -> int:
    """Import, write, and say what was written."""
    meta = import_weights(
        args.checkpoint,
        args.out,
        model_name=args.model,
        width_mult=args.width_mult,
        normalization=args.normalization,
        labels=args.labels,
    )
    folded = ""
    if meta["folded_batchnorm"]:
        folded = " (BatchNorm folded: fine-tune with frozen BatchNorm)"
    print(f"{args.checkpoint} -> {args.out}: {meta['arch']}{folded}")
    return 0
