"""Pretrained weights: torchvision MobileNetV2 -> mobilenet_v2 / dds_mobilenet_v2, frozen BN."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import SHARED_DATA, run_cli
from torch import nn

from dds_perception.detection import DetectorConfig, build_detector, load_detector
from dds_perception.detection.weights import (
    backbone_normalization,
    load_backbone_weights,
    save_detector,
)
from dds_perception.models import get_model
from dds_perception.models.mobilenetv2 import DDS_STAGES
from dds_perception.models.pretrained import (
    WeightsImportError,
    batchnorm_state_dict,
    convert_mobilenet_v2,
    freeze_batchnorm,
    is_folded_batchnorm,
    read_torchvision_checkpoint,
)
from dds_perception.utils.checkpoint import CheckpointError, load_weights

DILATION_ONE = [[s.expand, s.channels, s.repeats, s.stride, [1, 1, 1, 1]] for s in DDS_STAGES]
SHARED_PTH = SHARED_DATA / "pretrained" / "mobilenet_v2_1.0_imagenet_folded_bn.pth"


def _random_torchvision(width: float = 1.0) -> nn.Module:
    """torchvision's mobilenet_v2 with random weights and random BatchNorm statistics."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=width).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return model


def _relu6_to_relu(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU())
    return model


@pytest.fixture(scope="module")
def torchvision_pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pretrained") / "mobilenet_v2.pth"
    torch.save(_random_torchvision().state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("name", "kwargs", "reference_activation"),
    [
        ("mobilenet_v2", {}, nn.ReLU6),  # torchvision's own block structure
        ("dds_mobilenet_v2", {"stages": DILATION_ONE}, nn.ReLU),  # PReLU slope 0 = ReLU
    ],
)
def test_import_gives_torchvisions_features(torchvision_pth, name, kwargs, reference_activation):
    """mobilenet_v2, and the paper's net with all dilations 1, compute torchvision's features."""
    reference = _random_torchvision()
    if reference_activation is nn.ReLU:
        reference = _relu6_to_relu(reference)
    ours = get_model(name, num_classes=1000, **kwargs).eval()
    ours.load_state_dict(convert_mobilenet_v2(read_torchvision_checkpoint(torchvision_pth), ours))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["layer17"], reference.features[:18](x), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


def test_dds_import_splits_each_depthwise_kernel_by_channel(torchvision_pth):
    state = read_torchvision_checkpoint(torchvision_pth)
    ours = get_model("dds_mobilenet_v2", num_classes=0)
    converted = convert_mobilenet_v2(state, ours)
    # block 2 expands 16 -> 96 channels; K = 4 branches of 24 channels, dilations 1, 2, 3, 4
    full = state["features.2.conv.1.0.weight"]
    assert full.shape == (96, 1, 3, 3)
    for k in range(4):
        branch = converted[f"features.2.conv.1.branches.{k}.weight"]
        torch.testing.assert_close(branch, full[24 * k : 24 * (k + 1)])
    torch.testing.assert_close(
        converted["features.2.conv.1.bn.running_var"], state["features.2.conv.1.1.running_var"]
    )
    slopes = [v for k, v in converted.items() if k.endswith("act.weight")]
    assert slopes and all(float(v.abs().max()) == 0.0 for v in slopes)  # PReLU starts as ReLU
    assert not any(k.startswith("head.") for k in converted)  # backbone only


def test_width_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "half.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5).state_dict(), path)
    ours = get_model("dds_mobilenet_v2", num_classes=0)
    with pytest.raises(WeightsImportError, match=r"features\.0\.0\.weight.*\(16, 3, 3, 3\).*32"):
        convert_mobilenet_v2(read_torchvision_checkpoint(path), ours, source=str(path))


def test_a_pickled_module_is_refused_not_executed(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torchvision.models.mobilenet_v2(), path)
    with pytest.raises(WeightsImportError, match=r"whole_model\.pth: needs pickle beyond tensors"):
        read_torchvision_checkpoint(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsImportError, match=r"garbage\.pth"):
        read_torchvision_checkpoint(garbage)


def test_detector_takes_a_pth_backbone_and_refuses_other_architectures(torchvision_pth):
    model = build_detector(DetectorConfig(input_size=(64, 128)))
    assert load_backbone_weights(model, torchvision_pth) == len(model.backbone.state_dict())
    other = build_detector(DetectorConfig(backbone="mobilenet_v1", input_size=(64, 128)))
    with pytest.raises(CheckpointError, match="mobilenet_v1"):
        load_backbone_weights(other, torchvision_pth)


def test_frozen_batchnorm_keeps_statistics_in_training_mode(tmp_path):
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(input_size=(64, 128)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    x = torch.randn(2, 3, 64, 128)
    model.eval()
    with torch.no_grad():
        expected = model(x)["scores"]
    assert freeze_batchnorm(model.backbone) > 0
    model.train()
    features = model.backbone.forward_features(x)  # training mode: statistics must not move
    features["layer17"].sum().backward()
    state = batchnorm_state_dict(model)
    for key, value in before.items():
        torch.testing.assert_close(state[key], value)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn." in n)
    # saved like the plain network: it loads into a fresh build and predicts the same
    path = save_detector(tmp_path / "frozen.safetensors", model)
    with torch.no_grad():
        torch.testing.assert_close(load_detector(path)(x)["scores"], expected)


def test_import_weights_command(torchvision_pth, tmp_path):
    out = tmp_path / "imported.safetensors"
    result = run_cli(
        "import-weights", str(torchvision_pth), "--out", str(out), "--normalization", "signed"
    )
    assert "dds_mobilenet_v2" in result.stdout
    state, meta = load_weights(out)
    assert meta["arch"]["name"] == "dds_mobilenet_v2" and len(meta["class_names"]) == 1000
    assert meta["folded_batchnorm"] is False
    assert backbone_normalization(out) == ([0.5] * 3, [0.5] * 3)
    assert "features.3.conv.1.branches.3.weight" in state
    bad = run_cli("import-weights", str(tmp_path / "missing.pth"), "--out", str(out), check=False)
    assert bad.returncode != 0 and "missing.pth" in bad.stderr


def test_shared_imagenet_weights_classify_and_are_folded():
    if not SHARED_PTH.is_file():
        pytest.skip(f"ImageNet weights not found at {SHARED_PTH} (set DDS_SHARED_DATA)")
    state = read_torchvision_checkpoint(SHARED_PTH)
    assert is_folded_batchnorm(state)
    model = get_model("mobilenet_v2", num_classes=1000).eval()
    model.load_state_dict(convert_mobilenet_v2(state, model))
    image = cv2.cvtColor(cv2.imread(str(SHARED_PTH.parent / "hot_dog.jpg")), cv2.COLOR_BGR2RGB)
    x = torch.from_numpy(cv2.resize(image, (224, 224))).permute(2, 0, 1)[None] / 127.5 - 1.0
    labels = (SHARED_PTH.parent / "imagenet_labels.txt").read_text().splitlines()[1:]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert labels[top].startswith("hotdog")


def test_dilation_adaptation_brings_the_paper_net_closer_to_the_pretrained_one(tmp_path):
    """Spread over dilations 2-4, the imported kernels compute something else; a few steps of
    layer-wise self-distillation on unlabelled images shrink the gap (measured on the shared
    ImageNet weights: layer17 relative error 1.77 -> 0.45 and top-1 agreement 2 % -> 26 %
    after 200 steps; see models/dds_detector_kitti.md)."""
    from dds_perception.engine.import_weights import adapt_dilations

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # smooth random images: blobs, like photographs at this size
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"{i}.png"), cv2.resize(small, (48, 48)))
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v2(width_mult=0.25).state_dict()
    backbone, report = adapt_dilations(
        state, images, width_mult=0.25, steps=8, batch_size=4, size=32, lr=3e-3, workers=0
    )
    assert report["after"]["relative_error_layer17"] < report["before"]["relative_error_layer17"]
    assert all(k.startswith("features.") for k in backbone)
    model = get_model("dds_mobilenet_v2", num_classes=0, width_mult=0.25)
    model.load_state_dict(backbone)  # a complete backbone of the paper's network
