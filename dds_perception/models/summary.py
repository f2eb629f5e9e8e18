"""List the model zoo: parameters, MACs at 224x224 and the receptive field of ``layer17``.

MACs are counted by ``torch.utils.flop_counter`` (MACs = FLOPs / 2, convolutions and the
classifier; BatchNorm and activations are not counted, as in the papers). The receptive field is
measured: the extent of the input region whose gradient reaches the centre pixel of ``layer17``
with every weight set positive, so dilations and parallel branches are accounted for exactly.

examples:
  dds-perception models
  dds-perception models --num-classes 102 --json models.json
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dds_perception.models.registry import get_model, list_models
from dds_perception.utils.io import write_json


@dataclass(frozen=True)
class ModelStats:
    """One row of the zoo table."""

    name: str
    params: int
    macs: int
    layer17_channels: int
    layer17_stride: int
    receptive_field: int


def count_params(model: nn.Module) -> int:
    """Number of trainable and non-trainable parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: tuple[int, int] = (224, 224)) -> int:
    """Multiply-accumulates of one forward pass at batch 1, counted by FlopCounterMode."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *size))
    model.train(was_training)
    return counter.get_total_flops() // 2


def receptive_field(model: nn.Module, tap: str = "layer17", start: int = 256) -> int:
    """Theoretical receptive field (pixels) of one ``tap`` pixel, measured with gradients.

    A copy of the network is made linear and positive (conv weights 1/fan-in, identity
    BatchNorm, PReLU/ReLU slopes irrelevant for positive inputs), so no path cancels; the input
    grows until the influenced region no longer touches its border.
    """
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
    size = start
    while size <= 4096:
        x = torch.full((1, 3, size, size), 1e-3, dtype=torch.float64, requires_grad=True)
        out = net.forward_features(x)[tap]
        cy, cx = out.shape[2] // 2, out.shape[3] // 2
        out[0, :, cy, cx].sum().backward()
        touched = x.grad[0].abs().sum(0) > 0
        rows = touched.any(1).nonzero().flatten()
        cols = touched.any(0).nonzero().flatten()
        if rows[0] > 0 and cols[0] > 0 and rows[-1] < size - 1 and cols[-1] < size - 1:
            return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
        size *= 2
    raise RuntimeError(f"receptive field of {tap} exceeds 4096 px")


def model_stats(name: str, num_classes: int = 1000, **kwargs) -> ModelStats:
    """Parameters, MACs at 224x224 and layer17's receptive field of a registered model."""
    model = get_model(name, num_classes=num_classes, **kwargs)
    info = model.feature_info["layer17"]
    return ModelStats(
        name=name,
        params=count_params(model),
        macs=count_macs(model),
        layer17_channels=info.channels,
        layer17_stride=info.stride,
        # The receptive field does not depend on width: measure it on a slim copy (fast).
        receptive_field=receptive_field(
            get_model(name, num_classes=0, **{**kwargs, "width_mult": 0.1})
        ),
    )


def markdown_table(rows: list[ModelStats]) -> str:
    """The zoo as a markdown table."""
    lines = [
        "| model | params (M) | MACs @224 (M) | layer17 (ch, stride) | layer17 RF (px) |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.params / 1e6:.3f} | {r.macs / 1e6:.1f} | "
            f"{r.layer17_channels}, {r.layer17_stride} | {r.receptive_field} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier size")
    parser.add_argument("--width-mult", type=float, default=1.0, help="width multiplier")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(True)
    rows = [
        model_stats(name, num_classes=args.num_classes, width_mult=args.width_mult)
        for name in list_models()
    ]
    print(f"Model zoo ({args.num_classes} classes, width {args.width_mult}):\n")
    print(markdown_table(rows))
    if args.json:
        write_json(args.json, [asdict(r) for r in rows])
    return 0
