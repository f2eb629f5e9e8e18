"""The in-place PReLU kernel: exact against torch.prelu, in place, safe placement, fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from dds_perception.detection.native_prelu import InplacePReLU, inplace_eligible, load_kernel
from dds_perception.detection.optimize import (
    InferenceOptions,
    inplace_activations,
    optimize_for_inference,
)
from dds_perception.models import get_model, list_models

needs_kernel = pytest.mark.skipif(
    load_kernel() is None, reason="no C compiler here: the kernel cannot be built"
)


def _nhwc(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 9, 4), (1, 17, 6, 11), (1, 96, 24, 78)])
def test_kernel_matches_torch_prelu_in_place(shape):
    x = _nhwc(*shape)
    weight = torch.linspace(-0.5, 1.5, shape[1])  # negative, zero-crossing and > 1 slopes
    prelu = nn.PReLU(shape[1])
    prelu.weight.data = weight.clone()
    want = torch.prelu(x, weight)
    module = InplacePReLU(prelu)
    with torch.inference_mode():
        x_inf = x.clone(memory_format=torch.channels_last)
        pointer = x_inf.data_ptr()
        got = module(x_inf)
    assert got.data_ptr() == pointer  # the input's own storage, activated
    assert torch.equal(got, want)


def test_other_layouts_dtypes_and_autograd_fall_back_out_of_place():
    prelu = nn.PReLU(4)
    prelu.weight.data = torch.tensor([0.1, 0.2, 0.3, 0.4])
    module = InplacePReLU(prelu)
    nchw = torch.randn(1, 4, 5, 6)
    for x in (nchw, nchw.double(), _nhwc(1, 4, 5, 6).requires_grad_()):
        before = x.detach().clone()
        got = module(x)
        torch.testing.assert_close(got, torch.prelu(before, prelu.weight.to(x.dtype)))
        assert torch.equal(x.detach(), before)  # untouched
    assert not inplace_eligible(nchw, 4) and not inplace_eligible(_nhwc(1, 5, 2, 2), 4)


def test_without_a_compiler_the_module_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert load_kernel() is None
        assert "no C compiler" in caplog.text
        x = _nhwc(1, 3, 4, 4)
        prelu = nn.PReLU(3)
        with torch.inference_mode():
            got = InplacePReLU(prelu)(x)
        torch.testing.assert_close(got, torch.prelu(x, prelu.weight.detach()))
    finally:
        monkeypatch.undo()
        load_kernel.cache_clear()


@needs_kernel
def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DDS_PERCEPTION_CACHE", str(tmp_path))
    load_kernel.cache_clear()
    try:
        assert load_kernel() is not None
        (built,) = (tmp_path / "native").glob("prelu_inplace-*.so")
        stamp = built.stat().st_mtime_ns
        load_kernel.cache_clear()
        assert load_kernel() is not None and built.stat().st_mtime_ns == stamp  # reused
        assert not list((tmp_path / "native").glob("*.tmp"))  # no partial build left behind
    finally:
        monkeypatch.undo()
        load_kernel.cache_clear()


def test_only_prelus_with_a_fresh_private_input_become_in_place():
    conv_block = Conv2dNormActivation(3, 4, activation_layer=nn.PReLU, inplace=None)
    after_input = nn.Sequential(nn.Identity(), nn.PReLU(3))  # would overwrite the module input
    after_view = nn.Sequential(nn.Flatten(0, 0), nn.PReLU(3))  # a view of the input
    model = nn.Sequential(after_input, after_view, conv_block)
    assert inplace_activations(model) == 1
    assert isinstance(conv_block[2], InplacePReLU)
    assert isinstance(after_input[1], nn.PReLU) and isinstance(after_view[1], nn.PReLU)


@pytest.mark.parametrize("name", list_models())
def test_optimised_backbones_keep_outputs_and_inputs(name):
    """Every registered backbone: all its PReLUs in place, same outputs, input untouched."""
    model = get_model(name, num_classes=10).eval()
    x = _nhwc(2, 3, 64, 64, seed=1)
    fast = optimize_for_inference(model, "cpu", example=x)
    # none left out of place (the producer split makes one activation per branch)
    assert not any(isinstance(m, nn.PReLU) for m in fast.modules())
    has_prelu = any(isinstance(m, nn.PReLU) for m in model.modules())
    assert any(isinstance(m, InplacePReLU) for m in fast.modules()) == has_prelu
    off = optimize_for_inference(
        model, "cpu", example=x, options=InferenceOptions(inplace_prelu=False)
    )
    before = x.clone()
    with torch.inference_mode():
        got, want = fast(x), off(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
