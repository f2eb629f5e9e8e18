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
from torchvision.ops import batched_nms, clip_boxes_to_image, nms, remove_small_boxes


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
        # the single-class case carries no labels through the steps (fewer small ops per frame:
        # they are a good part of the pipeline's time outside the network)
        score, box, label = scores[i], boxes[i], None if labels is None else labels[i]
        # threshold first, then top-k of the survivors: the same set as top-k then threshold,
        # but the sort sees only the few anchors above the threshold
        keep = score > params.score_threshold
        score, box, label = _take(keep, score, box, label)
        if params.pre_nms_top_k and score.numel() > params.pre_nms_top_k:
            score, top = score.topk(params.pre_nms_top_k)
            _, box, label = _take(top, None, box, label)
        if clip_size is not None:
            box = clip_boxes_to_image(box, clip_size)
        keep = remove_small_boxes(box, params.min_box_size)
        score, box, label = _take(keep, score, box, label)
        if label is None:
            keep = nms(box, score, params.nms_iou)[: params.max_detections]
        else:
            keep = batched_nms(box, score, label, params.nms_iou)[: params.max_detections]
        score, box, label = _take(keep, score, box, label)
        if label is None:
            label = torch.zeros(score.shape, dtype=torch.int64, device=score.device)
        results.append((box, score, label))
    return results


def _take(index: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t[index] for t in tensors)
