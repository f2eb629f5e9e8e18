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

Training ``forward(images, targets)`` returns ``{"loss_objectness", "loss_box"}``; eval
``forward(images)`` returns ``{"scores": (N, K) probabilities, "boxes": (N, K, 4)}`` per anchor in
network-input pixels, for :func:`dds_perception.detection.postprocess.postprocess`.
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
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import Conv2dNormActivation, box_iou, generalized_box_iou_loss

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
        return torch.cat(logits, 1), torch.cat(deltas, 1), anchors

    def forward(
        self, images: Tensor, targets: Sequence[Target] | None = None
    ) -> dict[str, Tensor]:
        logits, deltas, anchors = self.head_outputs(images)
        if self.training:
            if targets is None:
                raise ValueError("training forward needs targets (boxes, labels, ignore_boxes)")
            return self.losses(logits, deltas, anchors, targets)
        n, k = logits.shape
        boxes = self.decode(deltas.reshape(-1, 4).float(), anchors.repeat(n, 1)).view(n, k, 4)
        return {"scores": logits.float().sigmoid(), "boxes": boxes}

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (M, 4) x1,y1,x2,y2 from deltas (M, 4) and anchors (M, 4): the inverse of the
        box coder's ``encode_single``, as torchvision's ``decode_single`` computes it.

        Written out here because ``decode_single`` builds a CPU scalar tensor on every call,
        a host-to-device copy that a CUDA graph cannot capture.
        """
        anchors = anchors.to(deltas.dtype)
        widths = anchors[:, 2] - anchors[:, 0]
        heights = anchors[:, 3] - anchors[:, 1]
        ctr_x = anchors[:, 0] + 0.5 * widths
        ctr_y = anchors[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.box_coder.weights
        clip = self.box_coder.bbox_xform_clip
        pred_x = deltas[:, 0] / wx * widths + ctr_x
        pred_y = deltas[:, 1] / wy * heights + ctr_y
        half_w = 0.5 * torch.exp(torch.clamp(deltas[:, 2] / ww, max=clip)) * widths
        half_h = 0.5 * torch.exp(torch.clamp(deltas[:, 3] / wh, max=clip)) * heights
        return torch.stack(
            (pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=1
        )

    # ----------------------------------------------------------------------------- training
    def assign_targets(
        self, anchors: Tensor, boxes: Tensor, ignore_boxes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per anchor: label (1 car, 0 background, -1 ignored) and its matched car box (K, 4)."""
        k = anchors.shape[0]
        boxes = boxes.reshape(-1, 4).to(anchors)
        ignore = (
            torch.zeros((0, 4), device=anchors.device)
            if ignore_boxes is None
            else ignore_boxes.reshape(-1, 4).to(anchors)
        )
        # degenerate boxes would be low-quality-matched to every anchor; drop them
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        ignore = ignore[(ignore[:, 2] > ignore[:, 0]) & (ignore[:, 3] > ignore[:, 1])]
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
            inter_w = (
                torch.min(anchors[:, None, 2], ignore[None, :, 2])
                - torch.max(anchors[:, None, 0], ignore[None, :, 0])
            ).clamp(min=0)
            inter_h = (
                torch.min(anchors[:, None, 3], ignore[None, :, 3])
                - torch.max(anchors[:, None, 1], ignore[None, :, 1])
            ).clamp(min=0)
            area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
            ioa = (inter_w * inter_h).amax(1) / area.clamp(min=1e-6)
            labels[(ioa > self.config.ignore_ioa) & ~positive] = -1.0
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
