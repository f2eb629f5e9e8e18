"""The backbone zoo: Table 3 shapes, parameter parity, known numbers, dilation, every model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dds_perception.models import get_model, list_models
from dds_perception.models.pyramid import PyramidDepthwiseConv
from dds_perception.models.summary import count_macs, count_params, receptive_field

MODELS = list_models()


def test_registry_has_the_papers_four_models():
    assert set(MODELS) == {"dds_mobilenet_v2", "mobilenet_v1", "mobilenet_v2", "shufflenet_v1"}


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*dds_mobilenet_v2"):
        get_model("resnet50")


# Table 3 of the paper (224x224 input): (channels, size) after layers 0..17.
TABLE3 = [(32, 112), (16, 112), (24, 56), (24, 56), (32, 28), (32, 28), (32, 28)]
TABLE3 += [(64, 14)] * 4 + [(96, 14)] * 3 + [(160, 7)] * 3 + [(320, 7)]


def test_proposed_network_matches_table3_row_by_row():
    model = get_model("dds_mobilenet_v2").eval()
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for index, layer in enumerate(model.features):
            x = layer(x)
            channels, size = TABLE3[index]
            assert tuple(x.shape) == (1, channels, size, size), f"layer {index}"
        assert tuple(model.head[0](x).shape) == (1, 1280, 7, 7)  # layer 18
        assert tuple(model(torch.zeros(1, 3, 224, 224)).shape) == (1, 1000)  # layers 19-20


def test_proposed_blocks_use_the_dilations_of_the_table():
    model = get_model("dds_mobilenet_v2")
    pyramids = [m for m in model.modules() if isinstance(m, PyramidDepthwiseConv)]
    assert len(pyramids) == 17
    assert pyramids[0].dilations == (1, 2, 3, 4)  # 112 px
    assert pyramids[9].dilations == (1, 1, 2, 3)  # layer 10, 14 px
    assert pyramids[16].dilations == (1, 1, 1, 2)  # layer 17, 7 px
    assert all(isinstance(m, nn.PReLU) for m in (pyramids[0].act, model.features[0][2]))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(224, 224), (375, 1242)])
def test_output_and_feature_shapes(name, size):
    model = get_model(name, num_classes=7).eval()
    x = torch.zeros(1, 3, *size)
    with torch.no_grad():
        assert tuple(model(x).shape) == (1, 7)
        features = model.forward_features(x)
    assert set(features) == {"layer13", "layer17"}
    for key, info in model.feature_info.items():
        stride = info.stride
        expected = (1, info.channels, -(-size[0] // stride), -(-size[1] // stride))
        assert tuple(features[key].shape) == expected, key
    assert model.feature_info["layer13"].stride == 16
    assert model.feature_info["layer17"].stride == 32


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_forward_backward_without_nan(name, train):
    model = get_model(name, num_classes=5, width_mult=0.5).train(train)
    x = torch.randn(2, 3, 96, 128)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_backbone_only_and_rebuild_from_build_args(name):
    backbone = get_model(name, num_classes=0, width_mult=0.5)
    assert backbone.head is None
    assert all(k.startswith("features.") for k in backbone.state_dict())
    out = backbone(torch.zeros(1, 3, 64, 64))
    assert set(out) == {"layer13", "layer17"}
    classifier = get_model(name, num_classes=3, width_mult=0.5)
    rebuilt = get_model(**classifier.build_args)
    rebuilt.load_state_dict(classifier.state_dict())  # strict: identical architecture
    head_keys = {k for k in classifier.state_dict() if not k.startswith("features.")}
    assert head_keys and all(k.startswith("head.") for k in head_keys)
    assert set(backbone.state_dict()) == set(classifier.state_dict()) - head_keys


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_parameter_parity_with_mobilenet_v2(width):
    def conv_bn(model):
        return sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)
            for p in m.parameters(recurse=False)
        )

    dds = get_model("dds_mobilenet_v2", num_classes=102, width_mult=width)
    mnv2 = get_model("mobilenet_v2", num_classes=102, width_mult=width)
    assert conv_bn(dds) == conv_bn(mnv2)
    prelu = sum(
        p.numel() for m in dds.modules() if isinstance(m, nn.PReLU) for p in m.parameters()
    )
    assert count_params(dds) - count_params(mnv2) == prelu
    assert abs(count_macs(dds) - count_macs(mnv2)) <= 0.01 * count_macs(mnv2)


def test_known_numbers():
    assert count_params(get_model("mobilenet_v2", num_classes=1000)) == 3_504_872
    assert count_params(get_model("mobilenet_v1", num_classes=1000)) == 4_231_976
    assert 295e6 < count_macs(get_model("mobilenet_v2")) < 305e6  # ~300M MACs (paper: 300M)


@pytest.mark.parametrize("dilations", [(1, 2, 3, 4), (1, 1, 2, 3)])
def test_each_branch_sees_the_region_of_its_dilation(dilations):
    """Measured with gradients: branch k's output pixel sees (3-1)*d_k + 1 input pixels."""
    block = PyramidDepthwiseConv(8, stride=1, dilations=dilations).double().eval()
    x = torch.randn(1, 8, 21, 21, dtype=torch.float64, requires_grad=True)
    group = 8 // len(dilations)
    for branch, d in enumerate(dilations):
        x.grad = None
        block(x)[0, branch * group, 10, 10].backward()
        touched = x.grad[0].abs().sum(0) > 0
        rows = touched.any(1).nonzero().flatten()
        cols = touched.any(0).nonzero().flatten()
        assert rows[-1] - rows[0] + 1 == (3 - 1) * d + 1
        assert cols[-1] - cols[0] + 1 == (3 - 1) * d + 1
        channels = (x.grad[0].abs().sum((1, 2)) > 0).nonzero().flatten().tolist()
        assert channels == [branch * group]  # depthwise: one input channel


def test_receptive_field_known_value_and_growth_by_dilation():
    mnv2 = receptive_field(get_model("mobilenet_v2", num_classes=0, width_mult=0.1))
    dds = receptive_field(get_model("dds_mobilenet_v2", num_classes=0, width_mult=0.1))
    assert mnv2 == 491  # MobileNetV2's layer-17 receptive field
    assert dds > mnv2


def test_hierarchical_fusion_changes_outputs_not_parameters():
    plain = get_model("dds_mobilenet_v2", num_classes=4, width_mult=0.5)
    fused = get_model("dds_mobilenet_v2", num_classes=4, width_mult=0.5, fusion=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), fused.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": [[1, 16, 1, 1, [1, 2, 3]], [6, 24, 16, 1, [1, 2, 3]]]}, "not divisible"),
        ({"stages": [[1, 16, 1, 3, [1, 2, 3, 4]]]}, "stride must be 1 or 2"),
        ({"stages": [[1, 16, 1, 1, [1, 0, 2, 3]]]}, "positive integers"),
        ({"stages": [[1, 16, 1]]}, r"expected \[t, c, n, s, dilations\]"),
    ],
)
def test_bad_architecture_tables_name_the_stage(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("dds_mobilenet_v2", branches=None, **kwargs)


def test_table_must_give_17_blocks():
    with pytest.raises(ValueError, match="17 blocks"):
        get_model("dds_mobilenet_v2", stages=[[1, 16, 1, 1, [1, 2, 3, 4]]])


def test_table_with_wrong_k_names_the_entry():
    with pytest.raises(ValueError, match=r"stage 0 .*K = 4"):
        get_model("dds_mobilenet_v2", stages=[[1, 16, 1, 1, [1, 2, 3]]])


def test_models_command_prints_and_writes_json(cli, tmp_path):
    out = tmp_path / "zoo.json"
    result = cli("models", "--json", str(out))
    assert "| dds_mobilenet_v2 | 3.520 |" in result.stdout
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["mobilenet_v2"]["params"] == 3_504_872
    assert rows["dds_mobilenet_v2"]["receptive_field"] > rows["mobilenet_v2"]["receptive_field"]
