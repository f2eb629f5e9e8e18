"""From per-anchor scores and boxes to final detections: top-k, threshold, clip, NMS, top-k.

Works on the eval output of :class:`~dds_perception.detection.detector.RPNDetector` (or the same
two tensors from an exported graph), in network-input pixels. Mapping back to the source image is
the pipeline's job (the letterbox inverse).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes


@dataclass(frozen=True)
class PostprocessParams:
    """Inference thresholds (defaults come from the detector's config)."""

    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    min_box_size: float = 2.0

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> PostprocessParams:
        """The thresholds a :class:`DetectorConfig` (or any object with these fields) holds,
        ``overrides`` (e.g. a lower ``score_threshold`` for AP) applied on top."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**{**values, **overrides})


def postprocess(
    scores: Tensor,
    boxes: Tensor,
    params: PostprocessParams,
    clip_size: tuple[int, int] | None = None,
    labels: Tensor | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Return per image ``(boxes (M, 4), scores (M,), labels (M,))``, best score first.

    ``scores`` (N, K) are probabilities, ``boxes`` (N, K, 4) x1,y1,x2,y2; ``clip_size`` (height,
    width) clips boxes before NMS; ``labels`` (N, K) class indices for class-aware NMS (all 0 for
    the single-class detector when omitted).
    """
    results = []
    for i in range(scores.shape[0]):
        score, box = scores[i], boxes[i]
        label = torch.zeros_like(score, dtype=torch.int64) if labels is None else labels[i]
        # threshold first, then top-k of the survivors: the same set as top-k then threshold,
        # but the sort sees only the few anchors above the threshold
        keep = score > params.score_threshold
        score, box, label = score[keep], box[keep], label[keep]
        if params.pre_nms_top_k and score.numel() > params.pre_nms_top_k:
            score, top = score.topk(params.pre_nms_top_k)
            box, label = box[top], label[top]
        if clip_size is not None:
            box = clip_boxes_to_image(box, clip_size)
        keep = remove_small_boxes(box, params.min_box_size)
        score, box, label = score[keep], box[keep], label[keep]
        keep = batched_nms(box, score, label, params.nms_iou)[: params.max_detections]
        results.append((box[keep], score[keep], label[keep]))
    return results
