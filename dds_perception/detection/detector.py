"""The car detector: a registered backbone + Faster R-CNN's RPN head, built from torchvision parts.

``RPNDetector(config)`` takes the backbone's ``layer17`` map (stride 32; optionally ``layer13``,
stride 16, with its own head) and predicts, per location and anchor, an objectness logit (the car
score: one class) and four box deltas. Anchors come from torchvision's ``AnchorGenerator``
shifted by half a stride so they are centred on their cell (torchvision puts the centre of cell
(0, 0) at pixel (0, 0)). Matching (``Matcher``) and box coding (``BoxCoder``) are torchvision's
(decoding written out in :meth:`RPNDetector.decode` so that a CUDA graph can capture it).

Objectness: ``focal`` (default) is a focal BCE over every anchor that is not ignored, summed over
the positives (RetinaNet); ``sampled`` is BCE on torchvision's ``BalancedPositiveNegativeSampler``
sample (Faster R-CNN's RPN, which has a second stage to clean up after it; this detector has
none). With ``objectness_target="iou"`` (default) a positive's target is the IoU of its own
decoded box (GFL's quality focal loss), so the score ranks boxes by how well they fit, which is
what KITTI's IoU 0.7 rewards. Box loss: GIoU (default) or smooth-L1 on the deltas, averaged over
the positives. Measured on generated scenes (MobileNetV2 x0.35, 128x416, 3,200 steps of 8
frames, Car AP_40 moderate on 160 validation frames): sampled + IoU target + smooth-L1 36.7;
focal + IoU target + smooth-L1 61.1; focal + IoU target + GIoU 63.2.

Van boxes and DontCare regions (``targets[i]["ignore_boxes"]``) are matched together with the cars:
an anchor whose best match is an ignore box is neither positive nor negative, and an anchor that is
not positive and lies inside an ignore region by more than ``ignore_ioa`` of its own area is
neither either.

Optional second stage (``refine_top_k`` > 0, :class:`BoxRefiner`): the boxes of the
``refine_top_k`` best-scored anchors of each image are corrected from RoI-aligned features of the
first feature map (stride 16 with ``layer13``). KITTI counts a car only above IoU 0.7, and one
stride-16/32 cell sees an edge only coarsely; a box-sized look at the features places the edges
again (Faster R-CNN's second stage without its classifier). With ``refine_score`` the stage also
predicts the IoU of its own box with the nearest car, and a refined candidate's score becomes the
weighted geometric mean of the first stage's score and that IoU (``refine_score_weight``): the
first stage scored the box before it moved, so NMS and voting would otherwise rank the refined
boxes by how well their unrefined versions fitted.

Training ``forward(images, targets)`` returns ``{"loss_objectness", "loss_box"}`` (and
``"loss_refine"`` with the second stage, ``"loss_refine_score"`` with its IoU output); eval
``forward(images)`` returns ``{"scores": (N, K) probabilities, "boxes": (N, K, 4)}`` per anchor in
network-input pixels, for
:func:`dds_perception.detection.postprocess.postprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import Conv2dNormActivation, box_iou, generalized_box_iou_loss, roi_align

from dds_perception.detection.config import DetectorConfig
from dds_perception.models import get_model

Target = Mapping[str, Tensor]


def rpn_head(in_channels: int, num_anchors: int, channels: int = 0) -> RPNHead:
    """torchvision's RPN head whose 3x3 conv maps ``in_channels`` to at most ``channels``.

    ``channels`` 0 keeps Faster R-CNN's width (``in_channels``). A narrower 3x3 conv is the
    cheap part to trim: at 384x1248 the full-width head of the 320-channel layer17 map costs
    0.43 GMACs, 14 % of the whole detector.
    """
    channels = min(int(channels), in_channels) if channels else in_channels
    head = RPNHead(channels, num_anchors)
    if channels != in_channels:
        conv = Conv2dNormActivation(in_channels, channels, kernel_size=3, norm_layer=None)
        nn.init.normal_(conv[0].weight, std=0.01)  # RPNHead's own initialisation
        nn.init.zeros_(conv[0].bias)
        head.conv[0] = conv
    return head


def decode_deltas(
    deltas: Tensor,
    anchors: Tensor,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = math.log(1000.0 / 16),
) -> Tensor:
    """Boxes (M, 4) x1,y1,x2,y2 from deltas (M, 4) and reference boxes (M, 4): the inverse of
    torchvision's ``BoxCoder(weights).encode_single``, as its ``decode_single`` computes it.

    Written out here because ``decode_single`` builds a CPU scalar tensor on every call, a
    host-to-device copy that a CUDA graph cannot capture.
    """
    anchors = anchors.to(deltas.dtype)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    pred_x = deltas[:, 0] / wx * widths + ctr_x
    pred_y = deltas[:, 1] / wy * heights + ctr_y
    half_w = 0.5 * torch.exp(torch.clamp(deltas[:, 2] / ww, max=clip)) * widths
    half_h = 0.5 * torch.exp(torch.clamp(deltas[:, 3] / wh, max=clip)) * heights
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=1)


class BoxRefiner(nn.Module):
    """The second stage: box corrections from RoI-aligned features.

    A 1x1 conv (ReLU) narrows the feature map to ``channels``, ``roi_align`` pools each box to
    ``pool`` x ``pool`` bins of ``sampling_ratio`` x ``sampling_ratio`` bilinear samples,
    Faster R-CNN's two fully connected layers (``TwoMLPHead``) and a linear layer predict Fast
    R-CNN deltas (weights 10, 10, 5, 5) relative to the box. The last layer starts at zero:
    an untrained refiner returns its input boxes, so training starts from the first stage's AP.
    With ``score`` one more linear layer predicts the logit of the refined box's IoU with the
    nearest car.
    """

    weights = (10.0, 10.0, 5.0, 5.0)

    def __init__(
        self,
        in_channels: int,
        stride: int,
        channels: int,
        hidden: int,
        pool: int = 7,
        sampling_ratio: int = 2,
        score: bool = False,
    ) -> None:
        super().__init__()
        self.stride = int(stride)
        self.pool = int(pool)
        self.sampling_ratio = int(sampling_ratio)
        self.reduce = Conv2dNormActivation(in_channels, channels, kernel_size=1, norm_layer=None)
        self.mlp = TwoMLPHead(channels * self.pool * self.pool, hidden)
        self.deltas = nn.Linear(hidden, 4)
        nn.init.zeros_(self.deltas.weight)
        nn.init.zeros_(self.deltas.bias)
        self.quality = nn.Linear(hidden, 1) if score else None
        if self.quality is not None:  # IoU 0.5 for every box until trained
            nn.init.zeros_(self.quality.weight)
            nn.init.zeros_(self.quality.bias)

    def forward(self, feature: Tensor, rois: Tensor) -> tuple[Tensor, Tensor | None]:
        """Refined boxes (R, 4) of ``rois`` (R, 5): image index in ``feature`` (N, C, h, w),
        then x1, y1, x2, y2 in input pixels; and the logits (R,) of their predicted IoU with the
        nearest car (None without ``score``)."""
        pooled = roi_align(
            self.reduce(feature),
            rois.to(feature.dtype),
            self.pool,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=self.sampling_ratio,
            aligned=False,  # what ONNX's RoiAlign computes below opset 16 (TensorRT on a TX2)
        )
        hidden = self.mlp(pooled)
        boxes = decode_deltas(self.deltas(hidden).float(), rois[:, 1:].float(), self.weights)
        if self.quality is None:
            return boxes, None
        return boxes, self.quality(hidden).float().squeeze(1)


def jittered_boxes(boxes: Tensor, copies: int, spread: float = 0.1) -> Tensor:
    """``copies`` noisy versions (copies * B, 4) of each box (B, 4): centre moved by N(0,
    ``spread``) of the box's size, width and height scaled by exp(N(0, ``spread``)). The
    second stage's training boxes around each car, besides the first stage's own candidates
    (few of which fit early in training). Draws from torch's default generator."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(copies, 1)
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2).repeat(copies, 1)
    centre = centre + torch.randn_like(centre) * spread * size
    half = size * torch.exp(torch.randn_like(size) * spread) / 2
    return torch.cat((centre - half, centre + half), 1)


def _valid_boxes(boxes: Tensor) -> Tensor:
    """The boxes (B, 4) of ``boxes`` (any shape ending in 4) with positive width and height."""
    boxes = boxes.reshape(-1, 4)
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def max_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """For each box (B, 4), the largest share of its area inside one of ``regions`` (R, 4)."""
    if not regions.shape[0]:
        return boxes.new_zeros(boxes.shape[0])
    wh = (
        torch.min(boxes[:, None, 2:], regions[None, :, 2:])
        - torch.max(boxes[:, None, :2], regions[None, :, :2])
    ).clamp(min=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (wh[..., 0] * wh[..., 1]).amax(1) / area.clamp(min=1e-6)


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (both (N, 4) x1,y1,x2,y2)."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


class RPNDetector(nn.Module):
    """Backbone + RPN head(s); see the module docstring for inputs and outputs."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = get_model(config.backbone, num_classes=0, **config.backbone_kwargs)
        info = self.backbone.feature_info
        level_sizes = config.level_sizes()
        self.feature_names = config.feature_names()
        self.heads = nn.ModuleList(
            rpn_head(
                info[name].channels, len(sizes) * len(config.aspect_ratios), config.head_channels
            )
            for name, sizes in zip(self.feature_names, level_sizes, strict=True)
        )
        if config.objectness_loss == "focal":
            # RetinaNet's prior: every anchor starts at p = 0.01, so the thousands of background
            # anchors do not swamp the first steps
            for head in self.heads:
                nn.init.constant_(head.cls_logits.bias, -math.log(99.0))
        self.anchor_generator = AnchorGenerator(
            sizes=tuple(tuple(float(s) for s in sizes) for sizes in level_sizes),
            aspect_ratios=tuple(tuple(config.aspect_ratios) for _ in level_sizes),
        )
        self.refiner: BoxRefiner | None = None
        if config.refine_top_k:
            first = info[self.feature_names[0]]
            self.refiner = BoxRefiner(
                first.channels,
                first.stride,
                config.refine_channels,
                config.refine_hidden,
                config.refine_pool,
                config.refine_sampling_ratio,
                config.refine_score,
            )
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(config.fg_iou, config.bg_iou, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(
            config.batch_size_per_image, config.positive_fraction
        )
        self._anchor_cache: dict[tuple, Tensor] = {}

    # ----------------------------------------------------------------------------- anchors
    def anchors(
        self, image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]], device=None
    ) -> Tensor:
        """All anchors (K, 4) x1,y1,x2,y2 for the given input size and feature-map sizes.

        Order: feature map, then location (row-major), then anchor (ratio-major, size inner),
        matching the flattened head outputs.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(image_size), tuple(map(tuple, grid_sizes)), str(device))
        cached = self._anchor_cache.get(key)
        if cached is not None:
            return cached
        strides = [
            [torch.tensor(image_size[0] // h), torch.tensor(image_size[1] // w)]
            for h, w in grid_sizes
        ]
        generator = self.anchor_generator
        generator.set_cell_anchors(torch.float32, torch.device("cpu"))
        per_level = generator.grid_anchors([list(g) for g in grid_sizes], strides)
        centred = [
            a + torch.tensor([s[1], s[0], s[1], s[0]], dtype=torch.float32) / 2
            for a, s in zip(per_level, strides, strict=True)
        ]
        anchors = torch.cat(centred).to(device)
        self._anchor_cache[key] = anchors
        return anchors

    # ----------------------------------------------------------------------------- forward
    def normalize(self, images: Tensor) -> Tensor:
        """0-255 RGB images (N, 3, H, W), any dtype -> the network's normalised float input.

        Training and evaluation use this; the pipeline applies the same constants with cv2.
        """
        scale = 255.0
        mean = torch.tensor(self.config.mean, device=images.device).view(1, 3, 1, 1) * scale
        std = torch.tensor(self.config.std, device=images.device).view(1, 3, 1, 1) * scale
        return (images.float() - mean) / std

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Objectness logits (N, K), box deltas (N, K, 4) and anchors (K, 4)."""
        return self._run(images)[:3]

    def _run(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`head_outputs` and the feature map the second stage reads."""
        features = self.backbone.forward_features(images)
        logits, deltas, grids = [], [], []
        for name, head in zip(self.feature_names, self.heads, strict=True):
            feature = features[name]
            (logit,), (delta,) = head([feature])
            n, a, h, w = logit.shape
            logits.append(logit.permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(delta.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            grids.append((h, w))
        anchors = self.anchors(tuple(images.shape[-2:]), grids, images.device)
        first = features[self.feature_names[0]]
        return torch.cat(logits, 1), torch.cat(deltas, 1), anchors, first

    def forward(
        self, images: Tensor, targets: Sequence[Target] | None = None
    ) -> dict[str, Tensor]:
        logits, deltas, anchors, feature = self._run(images)
        if self.training:
            if targets is None:
                raise ValueError("training forward needs targets (boxes, labels, ignore_boxes)")
            losses = self.losses(logits, deltas, anchors, targets)
            if self.refiner is not None:
                losses.update(self.refine_loss(feature, logits, deltas, anchors, targets))
            return losses
        n, k = logits.shape
        scores = logits.float().sigmoid()
        boxes = self.decode(deltas.reshape(-1, 4).float(), anchors.repeat(n, 1)).view(n, k, 4)
        if self.refiner is None:
            return {"scores": scores, "boxes": boxes}
        # the best-scored boxes of each image refined in place, the others kept as they are:
        # dropping them instead cost 0.5-5.6 points of cross-validated moderate AP (top-k 200, 64)
        index = self._top_k(scores).unsqueeze(-1).expand(-1, -1, 4)
        chosen = boxes.gather(1, index)
        # each candidate's image index from shape-generic ops, so that an export with a dynamic
        # batch keeps it dynamic
        image = torch.ones_like(chosen[..., :1]).cumsum(0) - 1.0
        rois = torch.cat((image, chosen), 2).reshape(-1, 5)
        refined, quality = self.refiner(feature, rois)
        boxes = boxes.scatter(1, index, refined.view_as(chosen))
        if quality is not None:
            top, weight = index[..., 0], self.config.refine_score_weight
            iou = quality.view_as(top).sigmoid()
            rescored = scores.gather(1, top).pow(1.0 - weight) * iou.pow(weight)
            scores = scores.scatter(1, top, rescored)
        return {"scores": scores, "boxes": boxes}

    def _top_k(self, scores: Tensor) -> Tensor:
        """Indices (N, T) of the ``refine_top_k`` best scores (or logits) of each image."""
        return scores.topk(min(self.config.refine_top_k, scores.shape[1]), dim=1).indices

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (M, 4) from first-stage deltas (M, 4) and anchors (M, 4): see
        :func:`decode_deltas`."""
        return decode_deltas(
            deltas, anchors, self.box_coder.weights, self.box_coder.bbox_xform_clip
        )

    # ----------------------------------------------------------------------------- training
    def assign_targets(
        self, anchors: Tensor, boxes: Tensor, ignore_boxes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per anchor: label (1 car, 0 background, -1 ignored) and its matched car box (K, 4)."""
        k = anchors.shape[0]
        # degenerate boxes would be low-quality-matched to every anchor; drop them
        boxes = _valid_boxes(boxes.to(anchors))
        ignore = anchors[:0] if ignore_boxes is None else _valid_boxes(ignore_boxes.to(anchors))
        labels = torch.zeros(k, device=anchors.device)
        matched = torch.zeros((k, 4), device=anchors.device)
        n_cars = boxes.shape[0]
        if n_cars + ignore.shape[0] == 0:
            return labels, matched
        quality = box_iou(torch.cat([boxes, ignore]), anchors)
        index = self.matcher(quality)
        positive = (index >= 0) & (index < n_cars)
        labels[positive] = 1.0
        labels[index == Matcher.BETWEEN_THRESHOLDS] = -1.0
        labels[index >= n_cars] = -1.0
        if ignore.shape[0]:
            labels[(max_ioa(anchors, ignore) > self.config.ignore_ioa) & ~positive] = -1.0
        if n_cars:
            matched = boxes[index.clamp(min=0, max=n_cars - 1)]
        return labels, matched

    def losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: Sequence[Target]
    ) -> dict[str, Tensor]:
        """Objectness loss (focal or sampled BCE) and positive-anchor box loss."""
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} images")
        labels, matched = [], []
        for target in targets:
            label, box = self.assign_targets(anchors, target["boxes"], target.get("ignore_boxes"))
            labels.append(label)
            matched.append(box)
        flat_labels = torch.cat(labels)
        if self.config.objectness_loss == "focal":
            pos = flat_labels > 0
            scored = flat_labels >= 0  # every anchor that is not ignored
        else:
            pos_masks, neg_masks = self.sampler(labels)
            pos = torch.cat(pos_masks).bool()
            scored = pos | torch.cat(neg_masks).bool()
        # normalised by the positives (SSD / RetinaNet), not by all sampled anchors as in
        # torchvision's RPN: with a handful of cars per frame the latter starves the regression
        num_pos = max(int(pos.sum()), 1)
        flat_logits = logits.reshape(-1).float()
        flat_deltas = deltas.reshape(-1, 4).float()
        flat_anchors = anchors.repeat(logits.shape[0], 1)
        flat_matched = torch.cat(matched)
        pred = None
        if self.config.box_loss == "giou" or self.config.objectness_target == "iou":
            pred = self.decode(flat_deltas[pos], flat_anchors[pos])
        if self.config.objectness_target == "iou":
            # IoU-aware score (as in VarifocalNet / GFL): a positive's target is how well its
            # own box fits, so NMS keeps the best-localised box and the score ranks boxes by
            # the quality KITTI's IoU 0.7 asks for
            flat_labels[pos] = elementwise_iou(pred.detach(), flat_matched[pos])
        logit, target = flat_logits[scored], flat_labels[scored]
        bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        if self.config.objectness_loss == "focal":
            # the easy anchors damped by |target - p|^gamma (RetinaNet's focal loss; with IoU
            # targets GFL's quality focal loss), summed over the positives
            factor = (logit.sigmoid() - target).abs().pow(self.config.focal_gamma)
            loss_obj = (bce * factor).sum() / num_pos
        else:
            loss_obj = bce.sum() / max(int(scored.sum()), 1)
        if self.config.box_loss == "giou":
            loss_box = generalized_box_iou_loss(pred, flat_matched[pos], reduction="sum")
        else:
            wanted = self.box_coder.encode_single(flat_matched[pos], flat_anchors[pos])
            loss_box = F.smooth_l1_loss(
                flat_deltas[pos], wanted, beta=self.config.smooth_l1_beta, reduction="sum"
            )
        return {
            "loss_objectness": loss_obj,
            "loss_box": self.config.box_loss_weight * loss_box / num_pos,
        }

    def refine_loss(
        self,
        feature: Tensor,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        targets: Sequence[Target],
        jitter: int = 8,
    ) -> dict[str, Tensor]:
        """The second stage's losses: ``"loss_refine"``, the GIoU loss of its boxes, and with an
        IoU output ``"loss_refine_score"``, the BCE of that output; each a mean over its boxes.

        Training boxes of each image: the first stage's ``refine_top_k`` candidates (what the
        refiner sees at inference), ``jitter`` noisy copies of each car (:func:`jittered_boxes`)
        and the cars themselves; each one that overlaps a car by >= 0.5 learns that car's box.
        The IoU output learns, for every one of them, the IoU of its refined box with the
        nearest car (0 in a frame without cars), except for candidates that fit no car and lie
        in an ignore region (a Van, DontCare) by more than ``ignore_ioa`` of their area.
        """
        assert self.refiner is not None
        scoring = self.refiner.quality is not None
        with torch.no_grad():
            index = self._top_k(logits.detach())
            n, t = index.shape
            chosen = deltas.detach().float().gather(1, index.unsqueeze(-1).expand(n, t, 4))
            proposals = self.decode(chosen.reshape(-1, 4), anchors[index.reshape(-1)]).view(
                n, t, 4
            )
        rois, wanted, fitting, spans = [], [], [], []
        for i, target in enumerate(targets):
            cars = _valid_boxes(target["boxes"].to(proposals))
            boxes = proposals[i]
            if cars.shape[0]:
                boxes = torch.cat((boxes, jittered_boxes(cars, jitter), cars))
                best, which = box_iou(boxes, cars).max(1)
                fits = best >= 0.5
            else:
                which = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
                fits = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
            keep = fits
            if scoring:
                regions = target.get("ignore_boxes")
                ignore = boxes[:0] if regions is None else _valid_boxes(regions.to(proposals))
                keep = fits | (max_ioa(boxes, ignore) <= self.config.ignore_ioa)
            if not keep.any():
                continue
            first = sum(len(r) for r in rois)
            image = torch.full((int(keep.sum()), 1), float(i), device=boxes.device)
            rois.append(torch.cat((image, boxes[keep]), 1))
            wanted.append(cars[which[keep]] if cars.shape[0] else boxes[keep])
            fitting.append(fits[keep])
            spans.append((first, first + len(rois[-1]), cars))
        weight = self.config.refine_loss_weight
        if not rois:  # nothing to learn from: a zero that still reaches every refiner weight
            zero = sum(p.sum() for p in self.refiner.parameters()) * 0.0
            return {"loss_refine": zero, **({"loss_refine_score": zero} if scoring else {})}
        refined, quality = self.refiner(feature, torch.cat(rois))
        fits = torch.cat(fitting)
        if fits.any():
            box_loss = generalized_box_iou_loss(
                refined[fits], torch.cat(wanted)[fits], reduction="mean"
            )
        else:
            box_loss = refined.sum() * 0.0
        losses = {"loss_refine": weight * box_loss}
        if quality is not None:
            with torch.no_grad():
                wanted_iou = torch.zeros_like(quality)
                for first, last, cars in spans:
                    if cars.shape[0]:
                        wanted_iou[first:last] = box_iou(refined[first:last], cars).amax(1)
            bce = F.binary_cross_entropy_with_logits(quality, wanted_iou)
            losses["loss_refine_score"] = weight * bce
        return losses
