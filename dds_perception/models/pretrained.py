"""Import torchvision MobileNetV2 checkpoints into the zoo's ``mobilenet_v2`` and the paper's net.

torchvision's ``mobilenet_v2()`` and ours share the table, the widths and the tensor order; they
differ in three places, which :func:`convert_mobilenet_v2` maps:

- the depthwise 3x3 of every block: torchvision has one ``Conv2d(C, C, groups=C)``, the paper's
  block has K branches over C/K channels each. Channel ``c`` of the pretrained kernel goes to
  branch ``c // (C/K)``, so every channel keeps its own pretrained filter; its dilation becomes
  the branch's (the taps are spread out, a change of function the fine-tuning absorbs; with all
  dilations 1 the network is exactly torchvision's);
- the activations: ReLU6 has no parameters, the paper's PReLU has a slope per channel. The slope
  starts at 0, so PReLU begins as ReLU (identical to ReLU6 below 6);
- the classifier: torchvision's ``features.18`` + ``classifier.1`` are our ``head``.

Checkpoints with BatchNorm folded into the convolutions (weight 1, mean 0, variance 1 - eps, the
folded bias in ``bias``) import like any other; they are exact in eval mode only, so a detector
fine-tuned from them keeps its BatchNorms frozen (:func:`freeze_batchnorm`).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dds_perception.models.pyramid import PyramidDepthwiseConv
from dds_perception.utils.errors import DdsPerceptionError


class WeightsImportError(DdsPerceptionError, ValueError):
    """A checkpoint cannot be read or does not fit the target network (names the tensor)."""


def read_torchvision_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict saved by ``torch.save(model.state_dict())``, read with ``weights_only=True``.

    A ``{"model": state}`` or ``{"state_dict": state}`` wrapper is unwrapped. A file that needs
    pickle beyond tensors (a whole pickled model, custom classes) is refused, never executed.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsImportError(f"checkpoint not found: {file}")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsImportError(
            f"{file}: needs pickle beyond tensors, refused (weights_only=True: {first}); save "
            "the state dict alone (torch.save(model.state_dict(), path))"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsImportError(f"{file}: not a readable torch checkpoint ({error})") from error
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise WeightsImportError(f"{file}: expected a state dict of tensors, got {type(data)}")
    return dict(data)


def is_folded_batchnorm(state: dict[str, Tensor]) -> bool:
    """Whether every BatchNorm of ``state`` is the identity (weight 1, mean 0, var ~1): folded."""
    found = False
    for key, mean in state.items():
        if not key.endswith(".running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        var, weight = state.get(prefix + "running_var"), state.get(prefix + "weight")
        if var is None or weight is None:
            continue
        found = True
        if mean.abs().max() > 1e-6 or (var - 1).abs().max() > 1e-3 or (weight - 1).abs().max():
            return False
    return found


def _source_key(key: str, model: nn.Module) -> tuple[str, int | None]:
    """torchvision's name for our tensor ``key``; for a pyramid branch also its branch index."""
    match = re.fullmatch(r"(features\.\d+\.conv\.\d+)\.branches\.(\d+)\.weight", key)
    if match:
        return f"{match.group(1)}.0.weight", int(match.group(2))
    match = re.fullmatch(r"(features\.\d+\.conv\.\d+)\.bn\.(\w+)", key)
    if match:
        return f"{match.group(1)}.1.{match.group(2)}", None
    match = re.fullmatch(r"head\.0\.(\d+\.\w+)", key)
    if match:
        return f"features.18.{match.group(1)}", None
    match = re.fullmatch(r"head\.(\d+)\.(weight|bias)", key)
    if match and isinstance(model.get_submodule(f"head.{match.group(1)}"), nn.Linear):
        return f"classifier.1.{match.group(2)}", None
    return key, None


def convert_mobilenet_v2(
    state: dict[str, Tensor], model: nn.Module, *, source: str = "<state dict>"
) -> dict[str, Tensor]:
    """A full state dict for ``model`` (our ``mobilenet_v2`` or ``dds_mobilenet_v2``) from
    torchvision MobileNetV2 tensors. ``model`` is only read.

    PReLU slopes start at 0 (ReLU). A tensor missing from ``state`` or of another shape (another
    width) raises :class:`WeightsImportError` naming the tensor and both shapes. A model built
    with ``num_classes=0`` takes the backbone only; with a head, ``state``'s classifier must
    have the head's number of classes.
    """
    target = model.state_dict()
    prelus = {name for name, m in model.named_modules() if isinstance(m, nn.PReLU)}
    pyramids = {
        name: m for name, m in model.named_modules() if isinstance(m, PyramidDepthwiseConv)
    }
    out: dict[str, Tensor] = {}
    for key, wanted in target.items():
        module_name = key.rpartition(".")[0]
        if module_name in prelus:
            out[key] = torch.zeros_like(wanted)  # PReLU with slope 0 is ReLU
            continue
        src_key, branch = _source_key(key, model)
        if src_key not in state:
            raise WeightsImportError(
                f"{source}: no tensor {src_key!r} for {key!r} (not a torchvision MobileNetV2 "
                "checkpoint?)"
            )
        tensor = state[src_key]
        if branch is not None:
            pyramid = pyramids[module_name.rsplit(".branches", 1)[0]]
            split, channels = pyramid.split, pyramid.split * len(pyramid.branches)
            if tensor.shape[0] != channels:
                raise WeightsImportError(
                    f"{source}: {src_key!r} has shape {tuple(tensor.shape)} but {key!r} is one "
                    f"of {len(pyramid.branches)} branches over {channels} channels (another "
                    "width?)"
                )
            tensor = tensor[branch * split : (branch + 1) * split]
        if tuple(tensor.shape) != tuple(wanted.shape):
            raise WeightsImportError(
                f"{source}: {src_key!r} has shape {tuple(tensor.shape)} but {key!r} needs "
                f"{tuple(wanted.shape)} (another width or number of classes?)"
            )
        out[key] = tensor.detach().clone().to(wanted.dtype)
    return out


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` under ``module`` by torchvision's ``FrozenBatchNorm2d``
    with the same statistics and affine values; return how many were replaced.

    Frozen BatchNorm applies the stored statistics in training mode too and has no trainable
    parameters (Detectron2 / torchvision detection backbones): what a pretrained backbone
    needs when batches are small, and what a folded checkpoint needs to stay itself. Changes
    ``module`` in place: call it on a model you own (a trainer's fresh copy).
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            frozen.to(child.weight.device)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def batchnorm_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with the keys a ``BatchNorm2d`` has where it holds frozen ones.

    A network trained with :func:`freeze_batchnorm` saves like the plain network (one
    ``num_batches_tracked`` per frozen layer), so it loads into a freshly built model.
    """
    state = module.state_dict()
    for name, child in module.named_modules():
        if isinstance(child, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return state
