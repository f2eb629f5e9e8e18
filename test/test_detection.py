"""Detector parts: anchors, box coding, Van/DontCare ignoring, losses, postprocess, weights."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dds_perception.detection import (
    DetectorConfig,
    DetectorConfigError,
    PostprocessParams,
    build_detector,
    load_backbone_weights,
    load_detector,
    postprocess,
    save_detector,
)
from dds_perception.detection.optimize import count_batchnorm, fold_batchnorm
from dds_perception.utils.checkpoint import CheckpointError, save_weights

TINY = {"backbone_kwargs": {"width_mult": 0.25}, "input_size": (64, 128)}


@pytest.fixture(scope="module")
def tiny_config() -> DetectorConfig:
    return DetectorConfig(**TINY, anchor_sizes=(32.0,), aspect_ratios=(0.5, 1.0))


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_detector(tiny_config)


def test_detection_anchors_hand_computed(tiny_model):
    anchors = tiny_model.anchors((64, 128), [(2, 4)])
    assert anchors.shape == (2 * 4 * 2, 4)
    # ratio 0.5 (h/w): w = 32*sqrt(2) = 45.25, h = 32/sqrt(2) = 22.63; torchvision rounds the
    # half-extents (22.63 -> 23, 11.31 -> 11); centred on cell (0, 0) at (16, 16)
    assert anchors[0].tolist() == [-7.0, 5.0, 39.0, 27.0]
    assert anchors[1].tolist() == [0.0, 0.0, 32.0, 32.0]  # ratio 1, size 32
    assert anchors[3].tolist() == [32.0, 0.0, 64.0, 32.0]  # next column, stride 32
    assert anchors[2 * 4 + 1].tolist() == [0.0, 32.0, 32.0, 64.0]  # next row
    assert anchors[-1].tolist() == [96.0, 32.0, 128.0, 64.0]


def test_detection_layer13_variant_anchors_per_level():
    config = DetectorConfig(
        **TINY,
        anchor_sizes=(16.0, 64.0),
        aspect_ratios=(1.0,),
        use_layer13=True,
        layer13_max_size=32.0,
    )
    model = build_detector(config)
    assert model.feature_names == ["layer13", "layer17"]
    anchors = model.anchors((64, 128), [(4, 8), (2, 4)])
    assert anchors.shape == (4 * 8 + 2 * 4, 4)
    assert anchors[0].tolist() == [0.0, 0.0, 16.0, 16.0]  # stride 16, size 16, centre (8, 8)
    assert anchors[32].tolist() == [-16.0, -16.0, 48.0, 48.0]  # stride 32, size 64
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 128))
    assert out["scores"].shape == (1, 40) and out["boxes"].shape == (1, 40, 4)


def test_detection_box_coding_hand_computed(tiny_model):
    coder = tiny_model.box_coder
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 32.0, 32.0]])
    boxes = torch.tensor([[4.0, 8.0, 36.0, 40.0], [0.0, 0.0, 64.0, 16.0]])
    deltas = coder.encode_single(boxes, anchors)
    # centres (20, 24) vs (16, 16), same size -> (4/32, 8/32, 0, 0)
    # centre (32, 8), size 64x16 -> (16/32, -8/32, log 2, log 0.5)
    expected = torch.tensor([[0.125, 0.25, 0.0, 0.0], [0.5, -0.25, math.log(2), math.log(0.5)]])
    torch.testing.assert_close(deltas, expected)
    torch.testing.assert_close(coder.decode_single(deltas, anchors), boxes)


def test_detection_van_and_dontcare_are_neither_positive_nor_negative(tiny_model):
    anchors = torch.tensor(
        [
            [0.0, 0.0, 32.0, 32.0],  # exactly the car -> positive
            [100.0, 0.0, 132.0, 32.0],  # exactly the Van -> matched to an ignore box
            [200.0, 0.0, 232.0, 32.0],  # nothing near -> negative
            [300.0, 0.0, 332.0, 32.0],  # inside the DontCare region (IoA 1, IoU 0.28)
            [24.0, 0.0, 56.0, 32.0],  # IoU 256/1792 = 0.14 with the car -> negative
            [16.0, 0.0, 48.0, 32.0],  # IoU 512/1536 = 0.33, between 0.3 and 0.6 -> ignored
        ]
    )
    car = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    ignore = torch.tensor([[100.0, 0.0, 132.0, 32.0], [290.0, -10.0, 400.0, 50.0]])
    labels, matched = tiny_model.assign_targets(anchors, car, ignore)
    assert labels.tolist() == [1.0, -1.0, 0.0, -1.0, 0.0, -1.0]
    assert matched[0].tolist() == car[0].tolist()
    labels, _ = tiny_model.assign_targets(anchors, car, None)
    assert labels.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # without ignores: background
    labels, _ = tiny_model.assign_targets(anchors, torch.zeros((0, 4)), ignore)
    assert labels.tolist() == [0.0, -1.0, 0.0, -1.0, 0.0, 0.0]  # only ignores in the frame


@pytest.mark.parametrize(
    "losses",
    [
        {"box_loss": "giou", "objectness_loss": "focal", "objectness_target": "iou"},
        {"box_loss": "smooth_l1", "objectness_loss": "sampled", "objectness_target": "binary"},
    ],
    ids=["defaults", "faster_rcnn_rpn"],
)
def test_detection_training_losses_are_named_finite_and_backprop(tiny_config, losses):
    torch.manual_seed(0)
    model = build_detector(tiny_config.replace(**losses)).train()
    images = torch.randn(2, 3, 64, 128)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]),
            "labels": torch.ones(1, dtype=torch.int64),
            "ignore_boxes": torch.tensor([[70.0, 10.0, 120.0, 50.0]]),
        },
        {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "ignore_boxes": torch.zeros((0, 4)),
        },
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    with pytest.raises(ValueError, match="targets"):
        model(images)


def _one_car_target() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]),
            "labels": torch.ones(1, dtype=torch.int64),
            "ignore_boxes": torch.zeros((0, 4)),
        }
    ]


def _one_anchor_per_cell(**losses: str) -> tuple[DetectorConfig, torch.nn.Module, torch.Tensor]:
    """2x4 stride-32 anchors of 32x32 centred on their cells (IoU-aware target): the car of
    :func:`_one_car_target` is exactly anchor 0, every other anchor misses it (IoU 0)."""
    config = DetectorConfig(
        **TINY, anchor_sizes=(32.0,), aspect_ratios=(1.0,), objectness_target="iou", **losses
    )
    model = build_detector(config).train()
    return config, model, model.anchors((64, 128), [(2, 4)])


def test_detection_focal_iou_objectness_hand_computed():
    """Focal loss over every non-ignored anchor, the positive's target = its box's IoU."""
    config, model, anchors = _one_anchor_per_cell(objectness_loss="focal")
    logits = torch.zeros(1, 8)  # p = 0.5 everywhere
    deltas = torch.zeros(1, 8, 4)
    deltas[0, 0] = torch.tensor([0.0, 0.0, math.log(0.5), 0.0])  # box 16 x 32: IoU 0.5
    losses = model.losses(logits, deltas, anchors, _one_car_target())
    bce_half = math.log(2.0)  # BCE of p = 0.5 for any target
    # positive: target 0.5, |0.5 - 0.5|^2 = 0; 7 negatives: target 0, factor 0.25; one positive
    assert losses["loss_objectness"].item() == pytest.approx(7 * 0.25 * bce_half)
    binary = build_detector(config.replace(objectness_target="binary")).train()
    losses = binary.losses(logits, deltas, anchors, _one_car_target())
    assert losses["loss_objectness"].item() == pytest.approx(8 * 0.25 * bce_half)
    # the RetinaNet prior: an untrained head scores every anchor 0.01
    with torch.no_grad():
        scores = model.eval()(torch.zeros(1, 3, 64, 128))["scores"]
    torch.testing.assert_close(scores, torch.full_like(scores, 0.01), atol=2e-3, rtol=0)


def test_detection_sampled_iou_objectness_uses_the_box_iou():
    _, model, anchors = _one_anchor_per_cell(objectness_loss="sampled")
    logits = torch.full((1, 8), -20.0)
    logits[0, 0] = 20.0  # confident everywhere: the loss is the positive's soft target's
    deltas = torch.zeros(1, 8, 4)
    deltas[0, 0, 2] = math.log(0.5)  # IoU 0.5 with the car
    loss = model.losses(logits, deltas, anchors, _one_car_target())["loss_objectness"]
    # BCE(logit 20, target 0.5) = 20 * 0.5 + log(1 + e^-20) ~ 10, averaged over 8 sampled
    assert loss.item() == pytest.approx(10.0 / 8, rel=1e-4)


def _refined(top_k: int = 4, **changes) -> torch.nn.Module:
    """The one-anchor-per-cell detector of :func:`_one_anchor_per_cell` with a second stage."""
    config, _, _ = _one_anchor_per_cell()
    torch.manual_seed(0)
    return build_detector(config.replace(refine_top_k=top_k, **changes))


def test_detection_refiner_starts_as_identity_and_moves_boxes_by_its_deltas():
    """An untrained second stage leaves the first stage's scores and boxes unchanged; deltas
    (10 * 0.1, 0, 0, 0) (Fast R-CNN's weights 10, 10, 5, 5) move each of the top-k boxes right
    by a tenth of its width and leave the other anchors' boxes where they were."""
    model = _refined(top_k=3).eval()
    first = build_detector(model.config.replace(refine_top_k=0)).eval()
    first.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("refiner.")}
    )
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        out, plain = model(images), first(images)
        assert out["scores"].shape == (2, 8) and out["boxes"].shape == (2, 8, 4)
        torch.testing.assert_close(out["scores"], plain["scores"])
        torch.testing.assert_close(out["boxes"], plain["boxes"])
        model.refiner.deltas.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        moved = model(images)["boxes"]
    top = plain["scores"].topk(3, dim=1).indices
    refined = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, top, True)
    boxes = plain["boxes"]
    shift = torch.where(refined, 0.1 * (boxes[..., 2] - boxes[..., 0]), 0.0)
    torch.testing.assert_close(moved[..., 0], boxes[..., 0] + shift)
    torch.testing.assert_close(moved[..., 2], boxes[..., 2] + shift)
    torch.testing.assert_close(moved[..., 1::2], boxes[..., 1::2])


def test_detection_refiner_loss_hand_computed():
    """Training boxes: the first stage's best candidate (anchor 0 at half the car's width: IoU
    0.5, GIoU loss 0.5) and the car itself (loss 0); the second best misses the car (IoU 0,
    not trained). An untrained refiner returns them as they are: mean loss 0.25."""
    model = _refined(top_k=2).train()
    anchors = model.anchors((64, 128), [(2, 4)])
    logits = torch.full((1, 8), -5.0)
    logits[0, 0], logits[0, 5] = 5.0, 4.0
    deltas = torch.zeros(1, 8, 4)
    deltas[0, 0, 2] = math.log(0.5)  # box [8, 0, 24, 32]
    feature = torch.randn(1, model.backbone.feature_info["layer17"].channels, 2, 4)
    losses = model.refine_loss(feature, logits, deltas, anchors, _one_car_target(), jitter=0)
    assert set(losses) == {"loss_refine"}
    loss = losses["loss_refine"]
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert model.refiner.deltas.weight.grad.abs().sum() > 0
    # with jittered copies the loss stays finite and positive; without cars it is a zero
    # that still reaches the refiner's weights (every process of a DDP run sees them)
    torch.manual_seed(0)
    jittered = model.refine_loss(feature, logits, deltas, anchors, _one_car_target(), jitter=8)
    assert 0.0 < jittered["loss_refine"].item() < 1.0
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}]
    zero = model.refine_loss(feature, logits, deltas, anchors, empty)["loss_refine"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_detection_refiner_iou_output_loss_hand_computed():
    """The IoU output's targets for the boxes of the test above: the best candidate 0.5, the
    second 0 (it misses the car), the car 1; an untrained refiner keeps the boxes, so with the
    output's logit at 1 everywhere the loss is BCE(1, y) = log(1 + e) - y, mean over y. The
    second candidate inside an ignore region drops out; a frame without cars teaches 0."""
    model = _refined(top_k=2, refine_score=True).train()
    anchors = model.anchors((64, 128), [(2, 4)])
    logits = torch.full((1, 8), -5.0)
    logits[0, 0], logits[0, 5] = 5.0, 4.0
    deltas = torch.zeros(1, 8, 4)
    deltas[0, 0, 2] = math.log(0.5)  # box [8, 0, 24, 32]; anchor 5 is [32, 32, 64, 64]
    feature = torch.randn(1, model.backbone.feature_info["layer17"].channels, 2, 4)
    with torch.no_grad():
        model.refiner.quality.bias.fill_(1.0)
    softplus = math.log(1.0 + math.e)
    losses = model.refine_loss(feature, logits, deltas, anchors, _one_car_target(), jitter=0)
    assert losses["loss_refine"].item() == pytest.approx(0.25)  # regression: fitting boxes only
    assert losses["loss_refine_score"].item() == pytest.approx(softplus - 0.5)
    losses["loss_refine_score"].backward()
    assert model.refiner.quality.weight.grad.abs().sum() > 0
    ignored = _one_car_target()
    ignored[0]["ignore_boxes"] = torch.tensor([[30.0, 30.0, 70.0, 70.0]])
    losses = model.refine_loss(feature, logits, deltas, anchors, ignored, jitter=0)
    assert losses["loss_refine_score"].item() == pytest.approx(softplus - 0.75)
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.refine_loss(feature, logits, deltas, anchors, empty)
    assert losses["loss_refine"].item() == 0.0 and losses["loss_refine"].requires_grad
    assert losses["loss_refine_score"].item() == pytest.approx(softplus)


def test_detection_refiner_iou_output_rescores_only_the_refined_candidates():
    """With the IoU output at logit b, each refined candidate's score s becomes
    s ** (1 - w) * sigmoid(b) ** w; the other anchors keep theirs."""
    model = _refined(top_k=3, refine_score=True, refine_score_weight=0.25).eval()
    plain = build_detector(model.config.replace(refine_top_k=0)).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("refiner.")}
    )
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        model.refiner.quality.bias.fill_(2.0)
        scores, first = model(images)["scores"], plain(images)["scores"]
    refined = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, first.topk(3, dim=1).indices, True)
    wanted = torch.where(refined, first**0.75 * torch.sigmoid(torch.tensor(2.0)) ** 0.25, first)
    torch.testing.assert_close(scores, wanted)


def test_detection_refiner_training_forward_and_learning():
    """The second stage's loss joins the others, and a few steps on one car lower it."""
    model = _refined(top_k=8).train()
    images = torch.randn(1, 3, 64, 128)
    targets = [{"boxes": torch.tensor([[20.0, 12.0, 70.0, 44.0]]), "labels": torch.ones(1).long()}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_box", "loss_refine"}
    model = _refined(top_k=8, refine_score=True).train()
    assert set(model(images, targets)) == {
        "loss_objectness",
        "loss_box",
        "loss_refine",
        "loss_refine_score",
    }
    optimizer = torch.optim.Adam(model.refiner.parameters(), lr=1e-3)
    history = []
    for _ in range(50):
        torch.manual_seed(1)  # the same jittered boxes every step
        losses = model(images, targets)
        loss = losses["loss_refine"] + losses["loss_refine_score"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((losses["loss_refine"].item(), losses["loss_refine_score"].item()))
    assert history[-1][0] < 0.5 * history[0][0], history
    assert history[-1][1] < 0.9 * history[0][1], history


def test_detection_narrow_head_channels():
    wide = build_detector(DetectorConfig(**TINY))
    narrow = build_detector(DetectorConfig(**TINY, head_channels=16))
    channels = wide.backbone.feature_info["layer17"].channels
    assert wide.heads[0].conv[0][0].out_channels == channels
    conv = narrow.heads[0].conv[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (channels, 16, (3, 3))
    assert narrow.heads[0].cls_logits.in_channels == 16
    assert narrow.heads[0].bbox_pred.in_channels == 16
    capped = build_detector(DetectorConfig(**TINY, head_channels=4 * channels))
    assert capped.heads[0].conv[0][0].out_channels == channels  # a cap, never a widening
    out = narrow.eval()(torch.zeros(1, 3, 64, 128))
    assert out["boxes"].shape == (1, 2 * 4 * 15, 4)


def test_detection_postprocess_threshold_nms_topk():
    scores = torch.tensor([[0.9, 0.85, 0.2, 0.8]])
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50, 50, 60, 60], [20, 20, 30, 30]]]
    )
    params = PostprocessParams(score_threshold=0.5, nms_iou=0.5, max_detections=10)
    ((kept, kept_scores, labels),) = postprocess(scores, boxes, params)
    # box 1 overlaps box 0 with IoU 81/119 = 0.68 > 0.5: suppressed; box 2 under the threshold
    assert kept.tolist() == [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]
    torch.testing.assert_close(kept_scores, torch.tensor([0.9, 0.8]))
    assert labels.tolist() == [0, 0]
    one = PostprocessParams(score_threshold=0.5, nms_iou=0.5, max_detections=1)
    assert postprocess(scores, boxes, one)[0][0].shape == (1, 4)
    ((clipped, _, _),) = postprocess(scores[:, :1], boxes[:, :1] - 5.0, params, clip_size=(8, 8))
    assert clipped.tolist() == [[0.0, 0.0, 5.0, 5.0]]


def test_detection_postprocess_box_voting_by_hand():
    """Box voting moves each kept box to the score-weighted mean of the candidates that overlap
    it by at least vote_iou; scores, order and the set of kept boxes stay NMS's."""
    scores = torch.tensor([[0.9, 0.3, 0.5, 0.6]])
    boxes = torch.tensor(
        [[[0.0, 0, 10, 10], [0.0, 0, 10, 12], [50, 50, 60, 60], [0.0, 0, 14, 10]]]
    )
    # IoU(0, 1) = 100 / 120 = 0.833, IoU(0, 3) = 100 / 140 = 0.714, IoU(1, 3) = 100 / 160
    plain = PostprocessParams(score_threshold=0.1, nms_iou=0.5)
    ((kept, kept_scores, _),) = postprocess(scores, boxes, plain)
    assert kept.tolist() == [[0, 0, 10, 10], [50, 50, 60, 60]]
    ((voted, voted_scores, _),) = postprocess(scores, boxes, replace(plain, vote_iou=0.7))
    # box 0 <- (0.9 * box0 + 0.3 * box1 + 0.6 * box3) / 1.8: x2 = (9 + 3 + 8.4) / 1.8 = 11.333,
    # y2 = (9 + 3.6 + 6) / 1.8 = 10.333; box 2 overlaps nothing and votes alone
    torch.testing.assert_close(voted, torch.tensor([[0.0, 0, 34 / 3, 31 / 3], [50, 50, 60, 60]]))
    assert torch.equal(voted_scores, kept_scores)
    ((strict, _, _),) = postprocess(scores, boxes, replace(plain, vote_iou=0.8))  # box 3 out
    torch.testing.assert_close(strict[0], torch.tensor([0.0, 0, 10, 10.5]))  # (9 + 3.6) / 1.2
    # a candidate of another class never votes
    ((aware, _, _),) = postprocess(
        scores, boxes, replace(plain, vote_iou=0.7), labels=torch.tensor([[0, 1, 0, 1]])
    )
    assert aware[0].tolist() == [0, 0, 10, 10]  # boxes 1 and 3 are kept apart as class 1


def test_detection_postprocess_single_class_equals_class_aware_with_one_class():
    """The label-free fast path keeps exactly what class-aware NMS keeps with one class, top-k
    included; with two classes, overlapping boxes of different classes both survive."""
    generator = torch.Generator().manual_seed(5)
    corners = torch.rand(2, 3000, 2, generator=generator) * 300
    boxes = torch.cat([corners, corners + 5 + torch.rand(2, 3000, 2, generator=generator) * 60], 2)
    scores = torch.rand(2, 3000, generator=generator)
    params = PostprocessParams(
        score_threshold=0.2, nms_iou=0.5, max_detections=50, pre_nms_top_k=500
    )
    fast = postprocess(scores, boxes, params, clip_size=(320, 320))
    aware = postprocess(
        scores, boxes, params, clip_size=(320, 320), labels=torch.zeros(2, 3000, dtype=torch.int64)
    )
    for (b1, s1, l1), (b2, s2, l2) in zip(fast, aware, strict=True):
        assert torch.equal(b1, b2) and torch.equal(s1, s2) and torch.equal(l1, l2)
        assert len(s1) == 50
    pair = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]]])
    two = postprocess(torch.tensor([[0.9, 0.8]]), pair, params, labels=torch.tensor([[0, 1]]))
    assert two[0][2].tolist() == [0, 1]


def _clustered(seed: int, images: int = 3, anchors: int = 2000) -> tuple[torch.Tensor, ...]:
    """Scores and boxes like a detector's: clusters of overlapping boxes around a few objects,
    some boxes past the image edge or tiny, scores spread over (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(images, 12, 2, generator=generator) * torch.tensor([640.0, 192.0])
    pick = torch.randint(0, 12, (images, anchors), generator=generator)
    centre = centres.gather(1, pick.unsqueeze(-1).expand(images, anchors, 2))
    centre = centre + torch.randn(images, anchors, 2, generator=generator) * 6
    size = 3 + torch.rand(images, anchors, 2, generator=generator) * 70
    boxes = torch.cat([centre - size / 2, centre + size / 2], 2)
    scores = torch.rand(images, anchors, generator=generator) ** 3
    return scores, boxes


@pytest.mark.parametrize(
    ("threshold", "top_k", "max_detections", "vote_iou"),
    [
        (0.3, 1000, 100, 0.0),
        (0.01, 1000, 100, 0.0),
        (0.01, 1000, 100, 0.6),
        (0.01, 300, 20, 0.7),
        (0.5, 0, 5, 0.5),
        (0.999, 1000, 100, 0.6),
    ],
)
def test_detection_fixed_shape_postprocess_equals_postprocess(
    threshold, top_k, max_detections, vote_iou
):
    """The on-device form keeps exactly what the data-dependent one keeps, in the same order,
    with the same voted boxes."""
    from dds_perception.detection.postprocess import postprocess_fixed

    params = PostprocessParams(
        score_threshold=threshold,
        nms_iou=0.5,
        max_detections=max_detections,
        pre_nms_top_k=top_k,
        min_box_size=4.0,
        vote_iou=vote_iou,
    )
    for seed in range(3):
        scores, boxes = _clustered(seed)
        want = postprocess(scores, boxes, params, clip_size=(192, 640))
        got = postprocess_fixed(scores, boxes, params, clip_size=(192, 640), rounds=64)
        assert got.boxes.shape == (3, max_detections, 4) and got.settled.all()
        for i, (w_boxes, w_scores, _) in enumerate(want):
            count = int(got.counts[i])
            assert count == len(w_scores), (seed, i)
            torch.testing.assert_close(got.scores[i, :count], w_scores)
            torch.testing.assert_close(got.boxes[i, :count], w_boxes)
            assert not got.scores[i, count:].any()


def test_detection_fixed_shape_nms_says_when_it_has_not_settled():
    """A chain A > B > C where each overlaps the next only: greedy NMS keeps A and C. One round
    from "all valid" suppresses C too (B still counts); the second round brings C back."""
    from dds_perception.detection.postprocess import postprocess_fixed

    boxes = torch.tensor([[[0.0, 0, 10, 10], [3.0, 0, 13, 10], [6.0, 0, 16, 10]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    params = PostprocessParams(score_threshold=0.1, nms_iou=0.5, min_box_size=0.0)
    want = postprocess(scores, boxes, params)[0][1]
    assert want.tolist() == pytest.approx([0.9, 0.7])
    one = postprocess_fixed(scores, boxes, params, rounds=1)
    assert not one.settled.item() and int(one.counts[0]) == 1  # not exact yet, and it says so
    two = postprocess_fixed(scores, boxes, params, rounds=2)
    assert two.settled.item() and two.scores[0, :2].tolist() == pytest.approx([0.9, 0.7])


def test_detection_match_detections_one_to_one():
    from dds_perception.detection.postprocess import match_detections

    a = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])
    b = torch.tensor([[0.5, 0, 10.5, 10], [100.0, 0, 110, 10]])
    match = match_detections(a, torch.tensor([0.9, 0.8, 0.7]), b, torch.tensor([0.85, 0.5]))
    # the best box of a takes b's first box; a's second (same car) finds nothing left
    assert [(i, j) for i, j, _ in match.pairs] == [(0, 0)] and match.pairs[0][2] > 0.9
    assert match.unmatched_a == [1, 2] and match.unmatched_b == [1]
    assert match.score_gaps(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.85, 0.5])) == (
        pytest.approx([0.05])
    )
    empty = match_detections(a, torch.ones(3), torch.zeros(0, 4), torch.zeros(0))
    assert empty.pairs == [] and empty.unmatched_a == [0, 1, 2] and empty.unmatched_b == []


def test_detection_fuse_batchnorm_keeps_outputs(tiny_config):
    torch.manual_seed(0)
    model = build_detector(tiny_config)
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()
    images = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        before = model(images)
        fused = fold_batchnorm(model, images)
        after = model(images)
    assert fused > 0 and count_batchnorm(model) == 0
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-2, rtol=1e-4)


def test_detection_config_rejects_bad_values():
    with pytest.raises(DetectorConfigError, match="unknown detector config key"):
        DetectorConfig.from_dict({"anchor_size": [32]})
    with pytest.raises(DetectorConfigError, match="multiples of 32"):
        DetectorConfig(input_size=(375, 1242))
    with pytest.raises(DetectorConfigError, match="bg_iou"):
        DetectorConfig(fg_iou=0.3, bg_iou=0.5)
    with pytest.raises(DetectorConfigError, match="objectness_loss"):
        DetectorConfig(objectness_loss="ohem")
    with pytest.raises(DetectorConfigError, match="objectness_target"):
        DetectorConfig(objectness_target="centerness")
    with pytest.raises(DetectorConfigError, match="head_channels"):
        DetectorConfig(head_channels=-1)
    with pytest.raises(DetectorConfigError, match="refine_top_k -1"):
        DetectorConfig(refine_top_k=-1)
    with pytest.raises(DetectorConfigError, match="refine_hidden 0"):
        DetectorConfig(refine_top_k=100, refine_hidden=0)
    with pytest.raises(DetectorConfigError, match="refine_pool 0"):
        DetectorConfig(refine_top_k=100, refine_pool=0)
    with pytest.raises(DetectorConfigError, match="refine_sampling_ratio -1"):
        DetectorConfig(refine_sampling_ratio=-1)
    with pytest.raises(
        DetectorConfigError, match=r"refine_score_weight 1.5: must lie in \[0, 1\]"
    ):
        DetectorConfig(refine_top_k=100, refine_score=True, refine_score_weight=1.5)
    config = DetectorConfig()
    assert DetectorConfig.from_dict(config.to_dict()) == config


def test_detection_weights_round_trip(tmp_path, tiny_model):
    path = save_detector(
        tmp_path / "det.safetensors", tiny_model, recipe={"epochs": 1}, metrics={"ap": 0.5}
    )
    model = load_detector(path)
    assert model.meta["task"] == "detection"
    assert model.meta["class_names"] == ["car"]
    assert model.meta["input_size"] == [64, 128]
    assert model.meta["normalization"]["mean"] == list(tiny_model.config.mean)
    assert model.meta["recipe"] == {"epochs": 1} and model.meta["metrics"] == {"ap": 0.5}
    assert model.config == tiny_model.config
    images = torch.randn(1, 3, 64, 128)
    tiny_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images)["scores"], tiny_model(images)["scores"])


def test_detection_weights_load_at_another_input_size(tmp_path, tiny_model):
    """The same weights at another letterbox size: the config says so, the anchors follow the
    new grid, and an image of that size gives the saved model's outputs on it."""
    path = save_detector(tmp_path / "det.safetensors", tiny_model)
    model = load_detector(path, input_size=(96, 160))
    assert model.config.input_size == (96, 160) and model.meta["input_size"] == [64, 128]
    images = torch.randn(1, 3, 96, 160)
    tiny_model.eval()
    with torch.no_grad():
        out, want = model(images), tiny_model(images)
    assert out["scores"].shape[1] == 3 * 5 * 2  # a 3x5 grid at stride 32, two anchors each
    torch.testing.assert_close(out["boxes"], want["boxes"])
    with pytest.raises(DetectorConfigError, match="input_size"):
        load_detector(path, input_size=(90, 160))


def test_detection_weights_errors_name_the_file(tmp_path, tiny_model):
    good = save_detector(tmp_path / "good.safetensors", tiny_model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_detector(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors"):
        load_detector(garbage)
    classifier = tmp_path / "classifier.safetensors"
    save_weights(classifier, {"head.weight": torch.zeros(2, 2)}, {"task": "classification"})
    with pytest.raises(CheckpointError, match=r"classifier.safetensors.*not a detector"):
        load_detector(classifier)
    other = tmp_path / "other_anchors.safetensors"
    meta_model = build_detector(tiny_model.config.replace(aspect_ratios=[0.5, 1.0, 2.0]))
    save_weights(
        other,
        tiny_model.state_dict(),
        {"task": "detection", "config": meta_model.config.to_dict()},
    )
    with pytest.raises(CheckpointError, match=r"other_anchors.safetensors.*do not fit"):
        load_detector(other)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors"):
        load_detector(tmp_path / "missing.safetensors")


def test_detection_backbone_weights_from_a_classifier_file(tmp_path, tiny_config):
    source = build_detector(tiny_config)
    state = {f"features.{k[len('backbone.features.'):]}": v for k, v in source.state_dict().items()
             if k.startswith("backbone.features.")}  # fmt: skip
    state["head.weight"] = torch.zeros(3, 4)
    path = tmp_path / "classifier.safetensors"
    save_weights(path, state, {"task": "classification"})
    model = build_detector(tiny_config)
    assert load_backbone_weights(model, path) == len(state) - 1
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, source.backbone.state_dict()[key])
    wider = build_detector(tiny_config.replace(backbone_kwargs={"width_mult": 0.5}))
    with pytest.raises(CheckpointError, match=r"classifier\.safetensors"):
        load_backbone_weights(wider, path)
