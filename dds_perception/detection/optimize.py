"""Inference speed-ups that the pipeline applies by default, and the switches the bench measures.

What each one does (measured on/off by ``dds-perception bench``, section "speed-ups"):

* ``fold_batchnorm``: an eval-mode BatchNorm after a convolution is an affine map per channel,
  so it is folded into that convolution's weights and bias and replaced by ``nn.Identity``
  (one pass over the feature map less per BN). Also folds a BN that follows ``torch.cat`` of
  several convolutions (the pyramid block's dilated branches): each branch takes its slice.
* ``channels_last``: NHWC memory layout. oneDNN (CPU) and cuDNN with fp16 run their convolution
  kernels natively in NHWC; in NCHW every convolution reorders its input and output.
* ``merge_pyramid``: the pyramid block's adjacent depthwise branches with the same dilation
  run as one depthwise convolution (:class:`MergedPyramidDepthwiseConv`, identical outputs).
* ``dense_pyramid``: each pyramid stage (all its dilated depthwise branches) as ONE depthwise
  convolution with a (2D+1)^2 kernel that has zeros where the dilations leave holes
  (:class:`DensePyramidDepthwiseConv`, same outputs): one kernel instead of a split, two to
  four convolutions and a concatenation, for up to 9x the multiply-adds of those stages.
* ``inference_mode``: no autograd bookkeeping (the pipeline runs under
  ``torch.inference_mode()``).
* ``compile``: ``torch.compile`` (inductor; on CPU it needs a C compiler), which fuses the
  element-wise work (PReLU, residual additions, concatenation) around the convolutions. It
  costs tens of seconds at start-up, so it is opt-in.
* ``inplace_prelu`` (CPU): each PReLU whose input nothing else reads overwrites it
  (:class:`~dds_perception.detection.native_prelu.InplacePReLU`, a small C kernel built ahead of
  time and registered as a torch operator), so the activation does not stream a second copy of
  the map through the caches.
* ``cudnn_benchmark`` (CUDA): cuDNN times its convolution algorithms once per input shape and
  keeps the fastest. ``torch.backends.cudnn.benchmark`` is a process-wide flag, so it is set
  only around the warm-up and graph capture here (:func:`cudnn_autotuning`) and around each
  call of the deploy ``TorchBackend``; cuDNN keeps the algorithms it chose. The pipeline's
  input size never changes, so the one-off cost buys every later frame.
* ``cuda_graphs`` (CUDA): the whole forward pass is captured once as a CUDA graph and replayed
  (:class:`CUDAGraphModule`). A batch-1 forward of these small networks launches a few hundred
  kernels that each run for microseconds, so eager time is mostly Python and launch overhead;
  a replay is one launch. Needs static shapes (not the two-stage Faster R-CNN).

The folding finds conv -> BN pairs by *recording one forward pass* (a ``TorchFunctionMode``
plus module hooks): a BN is folded only when its input is the output of one convolution (or a
channel-wise concatenation of convolutions) that nothing else reads, and when both modules ran
exactly once. That works for any module structure, including Python control flow that
``torch.fx`` cannot trace, and never folds a pair whose intermediate result is used elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import Conv2dNormActivation
from torchvision.ops.misc import FrozenBatchNorm2d

from dds_perception.models.pyramid import (
    PyramidDepthwiseConv,
    PyramidInvertedResidual,
    dense_depthwise,
)
from dds_perception.utils.errors import DdsPerceptionError

_BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, FrozenBatchNorm2d)
_CAT = (torch.cat, torch.concat, torch.concatenate)
_METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
    torch.Tensor.__len__,
}


class OptimizeError(DdsPerceptionError, ValueError):
    """An inference option that cannot be applied (e.g. fp16 on a CPU)."""


# --------------------------------------------------------------------------- BatchNorm folding
def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (scale, shift) of an eval-mode BN, in float64; None when not foldable."""
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None:  # track_running_stats=False uses batch statistics
        return None
    weight = bn.weight if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    bias = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    scale = weight.detach().double() / torch.sqrt(var.double() + bn.eps)
    shift = bias.detach().double() - mean.double() * scale
    return scale, shift


def _fold_into_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """conv' = scale * conv + shift, per output channel, in place."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
    new_weight = weight.double() * scale.view(-1, 1, 1, 1)
    new_bias = bias.double() * scale + shift
    conv.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)


def _is_plain_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _FlowRecorder(TorchFunctionMode):
    """Records which tensor each op reads, which conv produced what, and what each BN read."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[Any] = []  # keep every tensor alive so that id() stays unique
        self.uses: Counter[int] = Counter()
        self.cat_inputs: dict[int, list[int]] = {}
        self.conv_output: dict[int, nn.Module] = {}
        self.bn_input: dict[nn.Module, int] = {}
        self.calls: Counter[int] = Counter()
        self.bn_depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.bn_depth or func in _METADATA or getattr(func, "__name__", "") == "__get__":
            return out
        for tensor in _tensors((args, kwargs)):
            self.uses[id(tensor)] += 1
            self.keep.append(tensor)
        if func in _CAT:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if isinstance(out, torch.Tensor) and out.dim() == 4 and dim in (1, -3):
                self.cat_inputs[id(out)] = [id(t) for t in tensors]
        self.keep.append(out)
        return out

    # module hooks
    def conv_hook(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        self.calls[id(module)] += 1
        if isinstance(output, torch.Tensor):
            self.conv_output[id(output)] = module
            self.keep.append(output)

    def bn_pre_hook(self, module: nn.Module, inputs: tuple) -> None:
        self.calls[id(module)] += 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            self.bn_input[module] = id(inputs[0])
            self.uses[id(inputs[0])] += 1
            self.keep.append(inputs[0])
        self.bn_depth += 1

    def bn_hook(self, _module: nn.Module, _inputs: Any, _output: Any) -> None:
        self.bn_depth -= 1


def _replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is target:
                setattr(parent, name, new)


def _fold_sequential_pairs(model: nn.Module) -> int:
    """Fold BN that directly follows a conv inside a plain ``nn.Sequential``."""
    folded = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = seq._modules[first], seq._modules[second]
            if (
                _is_plain_conv(conv)
                and isinstance(bn, _BN_TYPES)
                and bn.num_features == conv.out_channels
                and (affine := _bn_affine(bn)) is not None
            ):
                _fold_into_conv(conv, *affine)
                seq._modules[second] = nn.Identity()
                folded += 1
    return folded


def fold_batchnorm(model: nn.Module, example: Any = None) -> int:
    """Fold eval-mode BatchNorm layers into the convolutions feeding them, in place.

    With ``example`` (an input the model accepts), one recorded forward pass finds every
    conv -> BN and cat(convs) -> BN pair, wherever the modules sit. Without it, only BN layers
    directly after a conv inside a plain ``nn.Sequential`` are folded. Returns how many BN
    layers were replaced by ``nn.Identity``. The model must be in eval mode (folding uses the
    running statistics; a training-mode BN normalises with batch statistics instead).
    """
    if model.training:
        raise OptimizeError("fold_batchnorm needs model.eval(): training-mode BN cannot fold")
    if example is None:
        return _fold_sequential_pairs(model)
    if count_batchnorm(model) == 0:
        return 0

    recorder = _FlowRecorder()
    handles = []
    for module in model.modules():
        if _is_plain_conv(module):
            handles.append(module.register_forward_hook(recorder.conv_hook))
        elif isinstance(module, _BN_TYPES):
            handles.append(module.register_forward_pre_hook(recorder.bn_pre_hook))
            handles.append(module.register_forward_hook(recorder.bn_hook))
    try:
        with torch.no_grad(), recorder:
            model(example)
    finally:
        for handle in handles:
            handle.remove()

    def single_use_conv(tensor_id: int) -> nn.Module | None:
        conv = recorder.conv_output.get(tensor_id)
        if conv is None or recorder.uses[tensor_id] != 1 or recorder.calls[id(conv)] != 1:
            return None
        return conv

    folded = 0
    for bn, input_id in recorder.bn_input.items():
        if recorder.calls[id(bn)] != 1 or recorder.uses[input_id] != 1:
            continue
        affine = _bn_affine(bn)
        if affine is None:
            continue
        if (conv := single_use_conv(input_id)) is not None:
            if conv.out_channels != bn.num_features:
                continue
            _fold_into_conv(conv, *affine)
        elif input_id in recorder.cat_inputs:
            convs = [single_use_conv(i) for i in recorder.cat_inputs[input_id]]
            if any(c is None for c in convs) or len({id(c) for c in convs}) != len(convs):
                continue
            if sum(c.out_channels for c in convs) != bn.num_features:
                continue
            start = 0
            for conv in convs:
                stop = start + conv.out_channels
                _fold_into_conv(conv, affine[0][start:stop], affine[1][start:stop])
                start = stop
        else:
            continue
        _replace_module(model, bn, nn.Identity())
        folded += 1
    return folded


def count_batchnorm(model: nn.Module) -> int:
    """How many BatchNorm layers (incl. torchvision's FrozenBatchNorm2d) the model still has."""
    return sum(isinstance(m, _BN_TYPES) for m in model.modules())


# --------------------------------------------------------------------------- pyramid branches
class MergedPyramidDepthwiseConv(nn.Module):
    """Inference form of :class:`PyramidDepthwiseConv`: adjacent equal-dilation branches merged.

    A depthwise convolution filters each channel on its own, so K branches of C/K channels
    that share one dilation are exactly one depthwise convolution over their channels with the
    branch weights stacked. The paper's default tables repeat dilations in the deep stages
    ({1,1,2,3} at stride 16, {1,1,1,2} at stride 32): 4 convolutions become 3 or 2, and the
    split/concatenation disappears where a single dilation is left. Same outputs (per channel
    the same 9 products are summed); not for ``fusion=True`` (branch k adds branch k-1).
    """

    def __init__(self, source: PyramidDepthwiseConv) -> None:
        super().__init__()
        if source.fusion:
            raise OptimizeError("branches with hierarchical fusion cannot be merged")
        groups: list[list[nn.Conv2d]] = []
        for conv, dilation in zip(source.branches, source.dilations, strict=True):
            if groups and groups[-1][0].dilation[0] == dilation:
                groups[-1].append(conv)
            else:
                groups.append([conv])
        self.split_sizes = [sum(c.out_channels for c in group) for group in groups]
        self.branches = nn.ModuleList(_stack_depthwise(group) for group in groups)
        self.bn = source.bn
        self.act = source.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.branches) == 1:
            y = self.branches[0](x)
        else:
            parts = torch.split(x, self.split_sizes, dim=1)
            y = torch.cat([conv(p) for conv, p in zip(self.branches, parts, strict=True)], 1)
        return self.act(self.bn(y))


def _stack_depthwise(convs: list[nn.Conv2d]) -> nn.Conv2d:
    if len(convs) == 1:
        return convs[0]
    first = convs[0]
    channels = sum(c.out_channels for c in convs)
    merged = nn.Conv2d(
        channels,
        channels,
        kernel_size=first.kernel_size,
        stride=first.stride,
        padding=first.padding,
        dilation=first.dilation,
        groups=channels,
        bias=first.bias is not None,
    ).to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([c.weight for c in convs]))
        if first.bias is not None:
            merged.bias.copy_(torch.cat([c.bias for c in convs]))
    return merged


def merge_pyramid_branches(model: nn.Module) -> int:
    """Replace every pyramid depthwise stage by its merged form, in place; return how many.

    Stages without two adjacent equal dilations are left as they are, and so are stages with
    hierarchical fusion. Apply after :func:`fold_batchnorm` (folding needs the branches as the
    recorded pass saw them, and merged convolutions keep the folded biases).
    """
    merged = 0
    for module in list(model.modules()):
        if not isinstance(module, PyramidDepthwiseConv) or module.fusion:
            continue
        if not any(a == b for a, b in zip(module.dilations, module.dilations[1:], strict=False)):
            continue
        _replace_module(model, module, MergedPyramidDepthwiseConv(module))
        merged += 1
    return merged


class DensePyramidDepthwiseConv(nn.Module):
    """Inference form of a pyramid stage as ONE operator: every dilated depthwise branch in one
    depthwise convolution whose larger kernel has zeros where the dilations leave holes
    (:func:`~dds_perception.models.pyramid.dense_depthwise`), then the stage's BN and PReLU.

    No split, no concatenation, one kernel launch instead of four (plus the copies): what a GPU
    at batch 1 is bound by. The price is arithmetic: a (2D+1)^2 kernel instead of 3x3 for
    dilations up to D. Same outputs up to float summation order (tested for every registered
    model with the pyramid); not for ``fusion=True`` (branch k adds branch k-1).
    """

    def __init__(self, source: PyramidDepthwiseConv | MergedPyramidDepthwiseConv) -> None:
        super().__init__()
        if getattr(source, "fusion", False):
            raise OptimizeError("branches with hierarchical fusion cannot be one convolution")
        self.conv = dense_depthwise(list(source.branches))
        self.bn = source.bn
        self.act = source.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def pyramid_reach(module: nn.Module) -> int:
    """The largest dilation of a pyramid stage's branches (0 for anything else)."""
    if isinstance(module, PyramidDepthwiseConv | MergedPyramidDepthwiseConv):
        return max(int(conv.dilation[0]) for conv in module.branches)
    return 0


def densify_pyramids(model: nn.Module, max_reach: int | None = None) -> int:
    """Replace pyramid stages by :class:`DensePyramidDepthwiseConv`, in place; return how many.

    ``max_reach``: only stages whose largest dilation is at most this (their dense kernel is at
    most ``2 * max_reach + 1`` wide); None: every stage. Stages with hierarchical fusion and
    single-branch stages (already one convolution) are left as they are. Apply after
    :func:`fold_batchnorm` and :func:`merge_pyramid_branches`, before the producer split.
    """
    dense = 0
    for module in list(model.modules()):
        if not isinstance(module, PyramidDepthwiseConv | MergedPyramidDepthwiseConv):
            continue
        if getattr(module, "fusion", False) or len(module.branches) < 2:
            continue
        if max_reach is not None and pyramid_reach(module) > max_reach:
            continue
        _replace_module(model, module, DensePyramidDepthwiseConv(module))
        dense += 1
    return dense


# --------------------------------------------------------------------------- split producers
def _conv_part(
    conv: nn.Conv2d, out: slice = slice(None), inp: slice = slice(None), bias: bool = True
) -> nn.Conv2d:
    """The part of a (groups=1) convolution that computes output channels ``out`` from input
    channels ``inp``, with the bias when ``bias``: parts by output channel, concatenated, or
    parts by input channel (one with the bias), summed, give the convolution's output."""
    weight = conv.weight[out, inp]
    part = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias and conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight)
        if part.bias is not None:
            part.bias.copy_(conv.bias[out])
    return part


def _pointwise_projection(tail: nn.Module) -> nn.Conv2d | None:
    """The tail's 1x1 convolution when the tail is that plain convolution (groups 1, stride 1)
    followed by identities only (folded BN); otherwise None."""
    layers = list(tail.children()) if isinstance(tail, nn.Sequential) else [tail]
    conv = layers[0] if layers else None
    if (
        conv is not None
        and _is_plain_conv(conv)
        and conv.kernel_size == (1, 1)
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and all(isinstance(layer, nn.Identity) for layer in layers[1:])
    ):
        return conv
    return None


def _act_slice(act: nn.Module, start: int, stop: int) -> nn.Module:
    if isinstance(act, nn.PReLU) and act.num_parameters > 1:
        part = nn.PReLU(stop - start).to(device=act.weight.device, dtype=act.weight.dtype)
        with torch.no_grad():
            part.weight.copy_(act.weight[start:stop])
        return part
    return act  # a shared-slope PReLU or a parameter-free activation applies to any slice


def _folded_producer(module: nn.Module) -> tuple[nn.Conv2d, nn.Module] | None:
    """(conv, activation) of a folded Conv2dNormActivation [conv, Identity, act], else None."""
    if not isinstance(module, Conv2dNormActivation) or len(module) != 3:
        return None
    conv, norm, act = module
    if not _is_plain_conv(conv) or conv.groups != 1 or not isinstance(norm, nn.Identity):
        return None
    return conv, act


class SplitPyramidBlock(nn.Module):
    """Inference form of a pyramid block whose producer writes one tensor per dilation group.

    In NHWC (channels_last) memory a channel slice is not contiguous, so ``torch.split`` before
    the dilated branches costs one copy of the expanded map per branch, and the pyramid stage
    then costs several times MobileNetV2's single depthwise convolution (measured by the bench).
    Here the producer (the block's 1x1 expansion, or the stem for the expansion-1 block) is
    split by output channels instead: convolution k computes exactly the channels of branch k
    (the same dot products), so every branch reads a contiguous tensor and nothing is copied
    before the concatenation. Needs folded BatchNorm (:func:`fold_batchnorm`).

    When the tail is the block's 1x1 projection alone (BatchNorm folded), the concatenation
    goes too: the projection is split by input channels, each branch projects its own output
    and the parts are summed (the same products; a copy of the expanded map less per block,
    37.2 vs 39.0 ms for the whole detector at 384x1248 on 2 threads of an AMD EPYC).
    """

    def __init__(
        self,
        producer: tuple[nn.Conv2d, nn.Module],
        pyramid: nn.Module,
        tail: nn.Module,
        residual: bool,
    ) -> None:
        super().__init__()
        conv, act = producer
        sizes = [branch.out_channels for branch in pyramid.branches]
        if sum(sizes) != conv.out_channels:
            raise OptimizeError(f"branches cover {sum(sizes)} of {conv.out_channels} channels")
        bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.produce = nn.ModuleList(_conv_part(conv, out=slice(a, b)) for a, b in bounds)
        self.produce_act = nn.ModuleList(_act_slice(act, a, b) for a, b in bounds)
        self.branches = pyramid.branches
        self.branch_act = nn.ModuleList(_act_slice(pyramid.act, a, b) for a, b in bounds)
        self.tail: nn.Module | None = tail
        self.project: nn.ModuleList | None = None
        projection = _pointwise_projection(tail) if len(bounds) > 1 else None
        if projection is not None:
            self.project = nn.ModuleList(
                _conv_part(projection, inp=slice(a, b), bias=i == 0)
                for i, (a, b) in enumerate(bounds)
            )
            self.tail = None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [
            branch_act(branch(produce_act(produce(x))))
            for produce, produce_act, branch, branch_act in zip(
                self.produce, self.produce_act, self.branches, self.branch_act, strict=True
            )
        ]
        if self.project is not None:
            y = self.project[0](parts[0])
            for project, part in zip(self.project[1:], parts[1:], strict=True):
                y = y.add_(project(part))  # y is this block's own fresh tensor
        else:
            y = self.tail(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        return x + y if self.residual else y


def _splittable_pyramid(module: nn.Module) -> bool:
    return (
        isinstance(module, PyramidDepthwiseConv | MergedPyramidDepthwiseConv)
        and not getattr(module, "fusion", False)
        and isinstance(module.bn, nn.Identity)
        and len(module.branches) > 1
    )


def split_pyramid_producers(model: nn.Module) -> int:
    """Rewrite pyramid blocks into :class:`SplitPyramidBlock`, in place; return how many.

    A block with a 1x1 expansion is rewritten on its own. The expansion-1 block (paper layer 1)
    takes its producer from the conv block before it in the same ``nn.Sequential`` (the stem),
    which then becomes ``nn.Identity`` so that layer indices (feature taps) stay as they were;
    that happens only when the producer's output is not tapped and the block has no residual.
    Apply after :func:`fold_batchnorm` (and after :func:`merge_pyramid_branches`).
    """
    rewritten = 0
    for parent in list(model.modules()):
        taps = set(getattr(parent, "taps", {}).values())
        for seq in (
            [parent.features]
            if isinstance(getattr(parent, "features", None), nn.Sequential)
            else []
        ):
            for index in range(1, len(seq)):
                block = seq[index]
                if not isinstance(block, PyramidInvertedResidual) or block.use_res_connect:
                    continue
                first = block.conv[0]
                producer = _folded_producer(seq[index - 1])
                if _splittable_pyramid(first) and producer and index - 1 not in taps:
                    tail = nn.Sequential(*list(block.conv)[1:])
                    seq[index] = SplitPyramidBlock(producer, first, tail, residual=False)
                    seq[index - 1] = nn.Identity()
                    rewritten += 1
    for block in list(model.modules()):
        if not isinstance(block, PyramidInvertedResidual) or len(block.conv) < 3:
            continue
        producer = _folded_producer(block.conv[0])
        if producer is None or not _splittable_pyramid(block.conv[1]):
            continue
        tail = nn.Sequential(*list(block.conv)[2:])
        new = SplitPyramidBlock(producer, block.conv[1], tail, block.use_res_connect)
        _replace_module(model, block, new)
        rewritten += 1
    return rewritten


# --------------------------------------------------------------------------- in-place PReLU
_FRESH_PRODUCERS = (nn.Conv2d, *_BN_TYPES)  # modules whose output is a new tensor


def _inplace_safe_prelus(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, child name) of every PReLU whose input is a fresh tensor nothing else reads.

    Decided by structure, not by running the model: a PReLU in a plain ``nn.Sequential`` (one
    whose forward is ``nn.Sequential.forward``: a subclass may reuse a tensor) right after
    a convolution or BatchNorm (``nn.Identity`` between them is skipped: a folded BN), the
    activation after a pyramid stage's concatenation, and the per-branch activations of
    :class:`SplitPyramidBlock`. A PReLU whose input may be read elsewhere (a module input, a
    view, a residual) is never made in place.
    """
    found: list[tuple[nn.Module, str]] = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            if type(parent).forward is not nn.Sequential.forward:
                continue  # its own forward may read an activation's input again (e.g. a skip)
            children = list(parent.named_children())
            for index, (name, child) in enumerate(children):
                if not isinstance(child, nn.PReLU):
                    continue
                before = [c for _, c in children[:index] if not isinstance(c, nn.Identity)]
                if before and isinstance(before[-1], _FRESH_PRODUCERS):
                    found.append((parent, name))
        elif isinstance(
            parent,
            PyramidDepthwiseConv | MergedPyramidDepthwiseConv | DensePyramidDepthwiseConv,
        ):
            if isinstance(parent.act, nn.PReLU):  # reads the concatenation (or its BN)
                found.append((parent, "act"))
        elif isinstance(parent, SplitPyramidBlock):
            for acts in ("produce_act", "branch_act"):  # each reads its own convolution
                for index, act in enumerate(getattr(parent, acts)):
                    if isinstance(act, nn.PReLU):
                        found.append((getattr(parent, acts), str(index)))
    return found


def inplace_activations(model: nn.Module) -> int:
    """Replace the PReLUs that may overwrite their input by :class:`InplacePReLU`; return how
    many. On CPU float32 NHWC maps they run the in-place kernel, elsewhere PyTorch's PReLU."""
    from dds_perception.detection.native_prelu import InplacePReLU

    safe = _inplace_safe_prelus(model)
    for parent, name in safe:
        setattr(parent, name, InplacePReLU(getattr(parent, name)))
    return len(safe)


# --------------------------------------------------------------------------- one entry point
@dataclass(frozen=True)
class InferenceOptions:
    """Which speed-ups :func:`optimize_for_inference` applies (defaults: the measured winners).

    ``None`` means "decided per device" by :meth:`resolved`, from measurements (``bench``,
    section speed-ups; H200 numbers in the README):

    * ``channels_last``: on CPU yes (oneDNN is about 3x faster in NHWC for these networks). On
      CUDA only with fp16 and only for networks without depthwise convolutions: NHWC made
      SSD300-VGG16 1.45x faster in fp16 but our detector 1.35x slower (cuDNN's NHWC depthwise
      kernels), and fp32 NHWC was slower for ours too.
    * ``split_pyramid``: on CPU yes (it exists to avoid NHWC channel-slice copies); on CUDA no
      (one 1x1 convolution instead of one per branch: 1.37x faster in fp32, 1.16x in fp16).
    * ``dense_pyramid``: on CPU no: the whole network ran 217.9 ms with every stage dense
      against 190.6 ms with the branches (1 thread, interleaved, 384x1248), and 188.9 / 193.7 ms
      with only the stages up to dilation 3 / 2 dense (no gain). On CUDA yes, by reasoning and
      not yet measured: at batch 1 a GPU runs these stages' few-microsecond kernels back to
      back, and one kernel replaces two to five; ``scripts/gpu_checks.sh`` measures it both
      ways (``dense_pyramid_max_dilation`` keeps the wide high-resolution stages as branches).
    * ``cudnn_benchmark`` and ``cuda_graphs``: on CUDA yes (graphs: 3.98x on ours in fp32).
    * ``inplace_prelu``: on CPU yes (about 7 % on our detector; CUDA keeps PyTorch's PReLU,
      which a CUDA graph captures).

    ``compile`` is off by default because it adds tens of seconds of start-up; turn it on for
    long-running nodes.
    """

    fold_bn: bool = True
    merge_pyramid: bool = True
    dense_pyramid: bool | None = None  # each pyramid stage as one dense depthwise conv
    dense_pyramid_max_dilation: int | None = None  # only stages up to this dilation (None: all)
    split_pyramid: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    # inductor freezing: constant-folds the (frozen) weights and prepacks them for oneDNN
    compile_freezing: bool = True
    cudnn_benchmark: bool | None = None  # None: on CUDA yes (ignored on CPU)
    cuda_graphs: bool | None = None  # None: on CUDA yes (needs ``example``; ignored on CPU)
    inplace_prelu: bool | None = None  # None: on CPU yes

    def resolved(
        self, device: torch.device, half: bool, model: nn.Module | None = None
    ) -> InferenceOptions:
        """The options with every ``None`` decided for this device (and ``model``: whether it
        has depthwise convolutions decides NHWC on CUDA; without it, it is assumed to)."""
        cuda = torch.device(device).type == "cuda"
        nhwc = not cuda or (half and model is not None and not has_depthwise_conv(model))

        def decide(value: bool | None, default: bool, cuda_only: bool = False) -> bool:
            chosen = default if value is None else value
            return chosen and (cuda or not cuda_only)

        return replace(
            self,
            channels_last=decide(self.channels_last, nhwc),
            dense_pyramid=decide(self.dense_pyramid, cuda),
            split_pyramid=decide(self.split_pyramid, not cuda),
            cudnn_benchmark=decide(self.cudnn_benchmark, cuda, cuda_only=True),
            cuda_graphs=decide(self.cuda_graphs, cuda, cuda_only=True),
            # inductor fuses the activations itself (and cannot trace the kernel call)
            inplace_prelu=decide(self.inplace_prelu, not cuda) and not self.compile,
        )


def has_depthwise_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (groups == input channels > 1)."""
    return any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        for m in model.modules()
    )


def optimize_for_inference(
    model: nn.Module,
    device: torch.device | str = "cpu",
    half: bool = False,
    *,
    example: Any = None,
    options: InferenceOptions | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` ready for fast inference on ``device``: eval, BN folded, NHWC, fp16.

    ``example`` (a batch the model accepts, on any device) lets BN folding see the data flow;
    the pipeline passes its warm-up frame. Run the result under ``torch.inference_mode()`` and
    feed it inputs on ``device`` (fp16 when ``half``); a channels-last input avoids one copy.
    fp16 on a CPU runs (the bench measures it) but is slower than fp32 on CPUs without fp16
    arithmetic; the deploy ``TorchBackend`` refuses it unless asked explicitly.
    """
    device = torch.device(device)
    options = (options or InferenceOptions()).resolved(device, half, model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    if options.fold_bn:
        if isinstance(example, torch.Tensor):
            first = next(model.parameters(), None)
            example = example.to(first.device if first is not None else "cpu").float()
        fold_batchnorm(model, example)
    if options.merge_pyramid:
        merge_pyramid_branches(model)
    if options.dense_pyramid:
        densify_pyramids(model, options.dense_pyramid_max_dilation)
    if options.split_pyramid and options.fold_bn:
        split_pyramid_producers(model)
    if options.inplace_prelu:
        inplace_activations(model)
    model.to(device)
    if half:
        model.half()
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        inductor = {"freezing": True} if options.compile_freezing else None
        if options.compile_mode is not None and inductor:
            raise OptimizeError("compile_mode and compile_freezing cannot be combined")
        model = torch.compile(model, mode=options.compile_mode, dynamic=False, options=inductor)
    if options.cuda_graphs and isinstance(example, torch.Tensor):
        autotune = bool(options.cudnn_benchmark)
        try:
            model = CUDAGraphModule(
                model, to_input_layout(example, options, device, half), autotune=autotune
            )
        except RuntimeError as error:  # an op that cannot be captured: slower, still correct
            warnings.warn(f"CUDA graph capture failed, running eagerly: {error}", stacklevel=2)
    return model


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool | None) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = enabled`` for the block only (None: leave it).

    cuDNN keeps the algorithm it timed for each convolution shape, so an autotuned warm-up or
    graph capture keeps its choice after the flag is restored; the flag itself is process-wide,
    which library code must not change for the rest of the process.
    """
    if enabled is None:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class CUDAGraphModule(nn.Module):
    """Runs ``module`` by replaying CUDA graphs: one captured per input shape (up to
    ``max_graphs``), the first for ``example`` at once, others on their first call.

    The input is copied into the graph's static buffer and the graph replayed; the outputs are
    the same static tensors on every call, overwritten by the next call with that shape
    (consume or clone them first, as the pipeline's postprocess does). An input of another
    dtype, device or layout, a shape beyond ``max_graphs``, or one whose capture failed runs
    ``module`` eagerly. Captured under ``torch.inference_mode``; warm-up runs on a side stream
    first (cuDNN's algorithm search, with ``autotune``, and the allocator must not happen
    during capture). Each graph has its own memory pool, so graphs of different batch sizes may
    replay in any order.
    """

    def __init__(
        self,
        module: nn.Module,
        example: torch.Tensor,
        warmup: int = 3,
        *,
        autotune: bool = True,
        max_graphs: int = 4,
    ) -> None:
        super().__init__()
        if example.device.type != "cuda":
            raise OptimizeError(f"CUDA graphs need a CUDA input, got {example.device}")
        self.module = module
        self.warmup = int(warmup)
        self.autotune = bool(autotune)
        self.max_graphs = int(max_graphs)
        self.dtype, self.device = example.dtype, example.device
        self.memory_format = _memory_format(example)
        self.graphs: dict[tuple[int, ...], tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]] = {}
        self.failed: set[tuple[int, ...]] = set()
        self._capture(example)  # the first one must work: errors reach the caller

    @property
    def static_input(self) -> torch.Tensor:
        """The first graph's input buffer (the shape the module was prepared for)."""
        return next(iter(self.graphs.values()))[0]

    @property
    def static_output(self) -> Any:
        """The first graph's outputs."""
        return next(iter(self.graphs.values()))[2]

    def _capture(self, example: torch.Tensor) -> None:
        with torch.inference_mode(), cudnn_autotuning(self.autotune):
            static_input = example.clone(memory_format=self.memory_format)
            graph, static_output = capture_cuda_graph(
                lambda: self.module(static_input), example.device, self.warmup
            )
        self.graphs[tuple(example.shape)] = (static_input, graph, static_output)

    def _matches(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can replay a graph (captured or still to capture for its shape)."""
        return (
            x.dtype == self.dtype
            and x.device == self.device
            and x.is_contiguous(memory_format=self.memory_format)
        )

    def forward(self, x: torch.Tensor) -> Any:
        shape = tuple(x.shape)
        if not self._matches(x) or shape in self.failed:
            return self.module(x)
        if shape not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.module(x)
            try:
                self._capture(x)
            except RuntimeError as error:  # e.g. out of memory: this shape runs eagerly
                warnings.warn(f"CUDA graph capture for {shape} failed: {error}", stacklevel=2)
                self.failed.add(shape)
                return self.module(x)
        static_input, graph, static_output = self.graphs[shape]
        with torch.inference_mode():
            static_input.copy_(x)
            graph.replay()
        return static_output


def capture_cuda_graph(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1
) -> tuple[Any, Any]:
    """Capture ``fn()`` (which reads only tensors it holds, on ``device``) as a CUDA graph:
    ``(graph, outputs)``; ``graph.replay()`` recomputes ``outputs`` in place. Warm-up calls
    run on a side stream first, as capture requires (allocator, cuDNN's algorithm search)."""
    with torch.inference_mode(), torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
    return graph, outputs


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def to_input_layout(
    batch: torch.Tensor, options: InferenceOptions, device: torch.device, half: bool
) -> torch.Tensor:
    """Move a preprocessed NCHW batch to the device, dtype and memory layout the model wants."""
    options = options.resolved(torch.device(device), half)
    batch = batch.to(device, dtype=torch.float16 if half else torch.float32, non_blocking=True)
    if options.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
