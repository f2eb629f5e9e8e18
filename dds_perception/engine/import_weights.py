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
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dds_perception.data.detection_dataset import read_rgb
from dds_perception.data.sources import list_images
from dds_perception.models import get_model
from dds_perception.models.mobilenetv2 import DDS_STAGES
from dds_perception.models.pretrained import (
    convert_mobilenet_v2,
    freeze_batchnorm,
    is_folded_batchnorm,
    read_torchvision_checkpoint,
)
from dds_perception.utils.checkpoint import save_weights
from dds_perception.utils.errors import UsageError

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
        raise UsageError(f"{path}: {len(names)} class names for a {count}-class classifier")
    return names


class _Images(Dataset):
    """Unlabelled images as normalised float tensors (random crops and flips)."""

    def __init__(self, files: list[Path], size: int, mean, std) -> None:
        self.files = files
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        rgb = read_rgb(self.files[index])
        return self.transform(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())


def _block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.contiguous(memory_format=torch.channels_last)
    outputs = []
    for layer in model.features[:18]:
        x = layer(x)
        outputs.append(x)
    return outputs


def adapt_dilations(
    state: dict[str, torch.Tensor],
    images: Path,
    *,
    width_mult: float = 1.0,
    normalization: str = "imagenet",
    steps: int = 300,
    batch_size: int = 32,
    size: int = 96,
    lr: float = 1e-3,
    seed: int = 0,
    workers: int = 1,
    log_every: int = 50,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Teach the paper's dilated network to compute what the pretrained one computed.

    The imported kernels were trained with dilation 1; spread over dilations 2-4 they compute
    something else (the shared ImageNet checkpoint, imported into ``dds_mobilenet_v2``, calls a
    hot dog a television). Layer-wise self-distillation repairs that without labels: the
    student (paper dilations) learns to match every block output of the same weights run with
    dilation 1 (the teacher), relative MSE summed over the 17 blocks, on unlabelled ``images``.
    BatchNorm stays frozen (a folded checkpoint is exact only with its own statistics).
    Returns the student's backbone state (``features.*``) and a report: relative error of the
    last block and top-1 agreement of the ImageNet classifier with the teacher, before and
    after, on 256 held-out images.
    """
    torch.manual_seed(seed)
    mean, std = NORMALIZATIONS[normalization]
    files = list_images(images)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = [files[i] for i in order[:128]]
    train_files = [files[i] for i in order[256:]] or held_out
    num_classes = (
        int(state["classifier.1.weight"].shape[0]) if "classifier.1.weight" in state else 0
    )
    dilation_one = [[s.expand, s.channels, s.repeats, s.stride, [1] * 4] for s in DDS_STAGES]
    teacher = get_model(
        "dds_mobilenet_v2", num_classes=num_classes, width_mult=width_mult, stages=dilation_one
    )
    student = get_model("dds_mobilenet_v2", num_classes=num_classes, width_mult=width_mult)
    teacher.load_state_dict(convert_mobilenet_v2(state, teacher))
    student.load_state_dict(convert_mobilenet_v2(state, student))
    teacher.eval().requires_grad_(False)
    freeze_batchnorm(student)
    # channels_last: 2-4x faster dilated depthwise convolutions on the CPU (train-detector's)
    teacher.to(memory_format=torch.channels_last)
    student.to(memory_format=torch.channels_last)
    student.train()
    if student.head is not None:
        student.head.requires_grad_(False)

    def measure() -> dict[str, float]:
        student.eval()
        loader = DataLoader(_Images(held_out, size, mean, std), batch_size=64)
        errors, agree, count = [], 0, 0
        with torch.no_grad():
            for x in loader:
                t, s = _block_outputs(teacher, x), _block_outputs(student, x)
                errors.append(float(((s[-1] - t[-1]) ** 2).mean() / (t[-1] ** 2).mean()))
                if num_classes:
                    agree += int(
                        (teacher.head(t[-1]).argmax(1) == student.head(s[-1]).argmax(1)).sum()
                    )
                count += len(x)
        student.train()
        return {
            "relative_error_layer17": sum(errors) / len(errors),
            "top1_agreement": agree / count,
        }

    torch.manual_seed(seed)
    before = measure()
    params = [p for p in student.features.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))
    )
    loader = DataLoader(
        _Images(train_files, size, mean, std),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_files) >= batch_size,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    step, start = 0, time.perf_counter()
    while step < steps:
        for x in loader:
            with torch.no_grad():
                targets = _block_outputs(teacher, x)
            # block-local terms (each block from the teacher's input to it: no compounding)
            # plus chained terms (the student's own path, whose errors do compound)
            inputs = [x.contiguous(memory_format=torch.channels_last), *targets[:-1]]
            local = sum(
                F.mse_loss(layer(inp), t) / t.pow(2).mean().clamp(min=1e-6)
                for layer, inp, t in zip(student.features[:18], inputs, targets, strict=True)
            )
            chained = sum(
                F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-6)
                for s, t in zip(_block_outputs(student, x), targets, strict=True)
            )
            loss = local + chained
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"adapt step {step}/{steps}: loss {float(loss.detach()):.4f}")
            if step >= steps:
                break
    after = measure()
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "size": size,
        "lr": lr,
        "images": str(images),
        "train_images": len(train_files),
        "seconds": round(time.perf_counter() - start, 1),
        "before": before,
        "after": after,
    }
    backbone = {k: v for k, v in student.state_dict().items() if k.startswith("features.")}
    return backbone, report


def import_weights(
    checkpoint: Path,
    out: Path,
    *,
    model_name: str = "dds_mobilenet_v2",
    width_mult: float = 1.0,
    normalization: str = "imagenet",
    labels: Path | None = None,
    adapt_images: Path | None = None,
    adapt_steps: int = 300,
    adapt_lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Map ``checkpoint`` into ``model_name`` and write ``out``; return the file's metadata.

    With ``adapt_images`` (``dds_mobilenet_v2`` only) the dilated blocks are first adapted by
    :func:`adapt_dilations`; the report goes into the metadata (``dilation_adaptation``).
    """
    state = read_torchvision_checkpoint(checkpoint)
    classifier = state.get("classifier.1.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 0
    model = get_model(model_name, num_classes=num_classes, width_mult=width_mult)
    converted = convert_mobilenet_v2(state, model, source=str(checkpoint))
    mean, std = NORMALIZATIONS[normalization]
    adaptation = None
    if adapt_images is not None:
        if model_name != "dds_mobilenet_v2":
            raise UsageError(
                f"--adapt-images: only dds_mobilenet_v2 has dilations, not {model_name}"
            )
        backbone, adaptation = adapt_dilations(
            state,
            adapt_images,
            width_mult=width_mult,
            normalization=normalization,
            steps=adapt_steps,
            lr=adapt_lr,
            seed=seed,
        )
        converted.update(backbone)
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
        "dilation_adaptation": adaptation,
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
    parser.add_argument(
        "--adapt-images",
        type=Path,
        default=None,
        help="unlabelled images on which the dilated blocks learn to match the pretrained "
        "(dilation 1) network before they are written (dds_mobilenet_v2)",
    )
    parser.add_argument("--adapt-steps", type=int, default=300, help="adaptation steps of 32")
    parser.add_argument("--adapt-lr", type=float, default=1e-3, help="adaptation AdamW rate")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Import, write, and say what was written."""
    meta = import_weights(
        args.checkpoint,
        args.out,
        model_name=args.model,
        width_mult=args.width_mult,
        normalization=args.normalization,
        labels=args.labels,
        adapt_images=args.adapt_images,
        adapt_steps=args.adapt_steps,
        adapt_lr=args.adapt_lr,
        seed=args.seed,
    )
    if meta["dilation_adaptation"]:
        report = meta["dilation_adaptation"]
        print(f"dilation adaptation: before {report['before']}, after {report['after']}")
    folded = ""
    if meta["folded_batchnorm"]:
        folded = " (BatchNorm folded: fine-tune with frozen BatchNorm)"
    print(f"{args.checkpoint} -> {args.out}: {meta['arch']}{folded}")
    return 0
