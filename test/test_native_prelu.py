"""The in-place PReLU kernel: exact against torch.prelu, in place, safe placement, fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from dds_perception.detection import native_prelu
from dds_perception.detection.native_prelu import (
    InplacePReLU,
    NativeBuildError,
    build,
    inplace_eligible,
    library_path,
    load_kernel,
)
from dds_perception.detection.optimize import (
    InferenceOptions,
    inplace_activations,
    optimize_for_inference,
)
from dds_perception.models import get_model, list_models


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel built ahead of time into a private cache folder (as the install step does)."""
    cache = tmp_path_factory.mktemp("native_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DDS_PERCEPTION_CACHE", str(cache))
    load_kernel.cache_clear()
    try:
        try:
            build()
        except NativeBuildError as error:
            pytest.skip(f"no C compiler here: {error}")
        assert load_kernel() is not None
        yield cache
    finally:
        patch.undo()
        load_kernel.cache_clear()


def _nhwc(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 9, 4), (1, 17, 6, 11), (1, 96, 24, 78)])
def test_kernel_matches_torch_prelu_in_place(kernel, shape):
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
    # the registered operator writes its input (what the module calls)
    y = x.clone(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.ops.dds_perception.prelu_(y, weight) is None
    assert torch.equal(y, want)


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


def test_not_built_the_module_falls_back_and_says_how_to_build(monkeypatch, tmp_path, caplog):
    """A deployed node never compiles: without a built kernel it runs PyTorch's PReLU."""
    monkeypatch.setenv("DDS_PERCEPTION_CACHE", str(tmp_path))
    monkeypatch.setattr(native_prelu.subprocess, "run", _no_compiler_at_run_time)
    load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert load_kernel() is None
        assert "python -m dds_perception.detection.native_prelu" in caplog.text
        x = _nhwc(1, 3, 4, 4)
        prelu = nn.PReLU(3)
        with torch.inference_mode():
            got = InplacePReLU(prelu)(x)
        torch.testing.assert_close(got, torch.prelu(x, prelu.weight.detach()))
    finally:
        monkeypatch.undo()
        load_kernel.cache_clear()


def _no_compiler_at_run_time(*args, **kwargs):
    raise AssertionError(f"a compiler was run: {args}")


def test_build_without_a_compiler_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DDS_PERCEPTION_CACHE", str(tmp_path))
    with pytest.raises(NativeBuildError, match="no-such-cc"):
        build()
    assert not library_path().exists()
    assert native_prelu.main(["--cc", str(tmp_path / "no-such-cc")]) == 1


def test_kernel_is_built_ahead_of_time_and_only_loaded(kernel, monkeypatch):
    (built,) = (kernel / "native").glob("prelu_inplace-*.so")
    assert built == library_path()
    assert not list((kernel / "native").glob("*.tmp"))  # no partial build left behind
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native_prelu.subprocess, "run", _no_compiler_at_run_time)
    load_kernel.cache_clear()
    assert load_kernel() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_only_prelus_with_a_fresh_private_input_become_in_place():
    conv_block = Conv2dNormActivation(3, 4, activation_layer=nn.PReLU, inplace=None)
    after_input = nn.Sequential(nn.Identity(), nn.PReLU(3))  # would overwrite the module input
    after_view = nn.Sequential(nn.Flatten(0, 0), nn.PReLU(3))  # a view of the input
    model = nn.Sequential(after_input, after_view, conv_block)
    assert inplace_activations(model) == 1
    assert isinstance(conv_block[2], InplacePReLU)
    assert isinstance(after_input[1], nn.PReLU) and isinstance(after_view[1], nn.PReLU)


class _ActPlusInput(nn.Sequential):
    """A Sequential subclass whose forward reads the activation's input again (a skip)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        return self[1](y) + y  # an in-place PReLU would have overwritten y


def test_a_sequential_with_its_own_forward_keeps_its_prelu():
    torch.manual_seed(0)
    model = _ActPlusInput(nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4)).eval()
    nn.init.constant_(model[1].weight, 0.1)
    x = _nhwc(1, 3, 16, 16, seed=2)
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(x)
        assert inplace_activations(model) == 0
        assert isinstance(model[1], nn.PReLU)
        torch.testing.assert_close(model(x), want)
    # the plain Sequential of the same modules is still made in place
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4))
    assert inplace_activations(plain) == 1


@pytest.mark.parametrize("name", list_models())
def test_optimised_backbones_keep_outputs_and_inputs(kernel, name):
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
