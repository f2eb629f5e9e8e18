"""Inference forms of the network: exact rewrites, the per-device option sets applied together,
and no side effects on the caller (its model, torch's process-wide flags)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dds_perception.deploy.backends import TorchBackend
from dds_perception.detection import DetectorConfig, build_detector
from dds_perception.detection.optimize import (
    DensePyramidDepthwiseConv,
    InferenceOptions,
    MergedPyramidDepthwiseConv,
    OptimizeError,
    cudnn_autotuning,
    densify_pyramids,
    fold_batchnorm,
    merge_pyramid_branches,
    optimize_for_inference,
)
from dds_perception.models import get_model, list_models
from dds_perception.models.pyramid import PyramidDepthwiseConv, dense_depthwise
from dds_perception.utils.errors import UsageError

PYRAMID_MODELS = [
    name
    for name in list_models()
    if any(isinstance(m, PyramidDepthwiseConv) for m in get_model(name, num_classes=4).modules())
]


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so folding shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
        if isinstance(module, nn.PReLU):
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) * 0.5)
    return model.eval()


def test_pyramid_models_are_found():
    assert "dds_mobilenet_v2" in PYRAMID_MODELS


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilations", [(1, 2, 3, 4), (1, 1, 2, 3), (1, 1, 1, 2), (2, 1), (3,)])
def test_dense_depthwise_equals_the_branches(stride, dilations):
    torch.manual_seed(0)
    stage = PyramidDepthwiseConv(8 * len(dilations), stride, dilations).eval()
    _randomise_batchnorm(stage)
    x = torch.randn(2, stage.split * len(dilations), 13, 22)  # odd sizes: padding at both ends
    dense = DensePyramidDepthwiseConv(stage)
    reach = max(dilations)
    assert dense.conv.kernel_size == (2 * reach + 1,) * 2 and dense.conv.padding == (reach,) * 2
    with torch.no_grad():
        torch.testing.assert_close(dense(x), stage(x), rtol=1e-5, atol=1e-5)
        # the zeros sit where the dilation leaves holes: each group's taps, nothing else
        for k, d in enumerate(dilations):
            rows = dense.conv.weight[k * stage.split : (k + 1) * stage.split, 0]
            holes = torch.ones_like(rows, dtype=torch.bool)
            holes[:, reach - d : reach + d + 1 : d, reach - d : reach + d + 1 : d] = False
            assert not rows[holes].any()


def test_dense_depthwise_refuses_what_it_cannot_represent():
    with pytest.raises(OptimizeError, match="fusion"):
        DensePyramidDepthwiseConv(PyramidDepthwiseConv(8, 1, (1, 2), fusion=True))
    with pytest.raises(UsageError, match="not a pyramid branch"):
        dense_depthwise([nn.Conv2d(4, 4, 3, padding=0, groups=4)])


@pytest.mark.parametrize("name", PYRAMID_MODELS)
def test_dense_pyramid_keeps_every_registered_pyramid_model_exact(name):
    """The whole network with every pyramid stage as one dense depthwise convolution (after
    BatchNorm folding and equal-dilation merging, as the optimiser applies it)."""
    torch.manual_seed(1)
    model = _randomise_batchnorm(get_model(name, num_classes=10))
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        want = model(x)
        fast = copy.deepcopy(model)
        fold_batchnorm(fast, x)
        merge_pyramid_branches(fast)
        stages = sum(
            isinstance(m, PyramidDepthwiseConv | MergedPyramidDepthwiseConv)
            and len(m.branches) > 1
            for m in fast.modules()
        )
        assert densify_pyramids(fast) == stages > 0
        assert not any(isinstance(m, PyramidDepthwiseConv) for m in fast.modules())
        torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reach", [2, 3])
def test_dense_pyramid_only_up_to_a_dilation(reach):
    model = _randomise_batchnorm(get_model("dds_mobilenet_v2", num_classes=10))
    merge_pyramid_branches(model)
    densify_pyramids(model, max_reach=reach)
    for module in model.modules():
        if isinstance(module, DensePyramidDepthwiseConv):
            assert module.conv.kernel_size[0] <= 2 * reach + 1
        elif isinstance(module, PyramidDepthwiseConv | MergedPyramidDepthwiseConv):
            assert max(c.dilation[0] for c in module.branches) > reach


def _detector(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = DetectorConfig(backbone_kwargs={"width_mult": 0.35}, input_size=(128, 416))
    return _randomise_batchnorm(build_detector(config), seed)


def test_the_cuda_option_set_is_exact_on_the_cpu():
    """What CUDA resolves to (NCHW, no producer split, dense pyramid, no in-place PReLU; graphs
    and cuDNN aside) applied together on the CPU: the eager model's outputs."""
    model = _detector()
    cuda = InferenceOptions().resolved(torch.device("cuda"), False, model)
    assert (cuda.channels_last, cuda.split_pyramid, cuda.inplace_prelu) == (False, False, False)
    assert cuda.dense_pyramid and cuda.cuda_graphs and cuda.cudnn_benchmark
    on_cpu = InferenceOptions(
        **{**cuda.__dict__, "cuda_graphs": False, "cudnn_benchmark": False}
    ).resolved(torch.device("cpu"), False, model)
    x = torch.randn(2, 3, 128, 416)
    fast = optimize_for_inference(model, "cpu", example=x[:1], options=on_cpu)
    assert any(isinstance(m, DensePyramidDepthwiseConv) for m in fast.modules())
    with torch.inference_mode():
        want, got = model(x), fast(x)
    for key in ("scores", "boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-3)


def test_torch_backend_leaves_the_callers_model_alone():
    model = _detector().train()  # a model the caller may still train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    backend = TorchBackend(model, device="cpu")
    assert model.training  # not switched to eval
    assert [type(m) for m in model.modules()] == types  # no BN folded, no PReLU swapped
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    # and the backend's copy is the optimised one
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backend.model.modules())
    with pytest.raises(ValueError, match="input_size or example"):
        TorchBackend(nn.Conv2d(3, 4, 3), device="cpu")
    bare = TorchBackend(nn.Conv2d(3, 4, 3), device="cpu", input_size=(8, 8))  # any network
    assert bare.config is None and bare(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_autotuning_is_scoped(before):
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = before
        with cudnn_autotuning(True):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is before
        with cudnn_autotuning(None):
            assert torch.backends.cudnn.benchmark is before
        with pytest.raises(RuntimeError), cudnn_autotuning(not before):
            assert torch.backends.cudnn.benchmark is (not before)
            raise RuntimeError("a failed capture")
        assert torch.backends.cudnn.benchmark is before
        # optimising for any device leaves the flag as it was
        optimize_for_inference(_detector(), "cpu", example=torch.zeros(1, 3, 128, 416))
        assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = saved
