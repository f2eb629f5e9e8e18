"""From per-anchor scores and boxes to final detections: top-k, threshold, clip, NMS, top-k, and
optionally box voting.

Box voting (Gidaris and Komodakis, "Object detection via a multi-region & semantic
segmentation-aware CNN model", 2015): each box that NMS keeps is replaced by the score-weighted
mean of the candidates that overlap it by at least ``vote_iou``, itself included. NMS throws away
the neighbours' evidence about where the object's edges are; the mean keeps it. KITTI counts a
car only above IoU 0.7, so edge accuracy is AP: on the real-car cross-validation it added 8 points
of moderate AP_40 (``models/dds_detector_kitti.md``). Scores and the set of kept boxes do not
change.

Works on the eval output of :class:`~dds_perception.detection.detector.RPNDetector` (or the same
two tensors from an exported graph), in network-input pixels. Mapping back to the source image is
the pipeline's job (the letterbox inverse).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, nms, remove_small_boxes


@dataclass(frozen=True)
class PostprocessParams:
    """Inference thresholds (defaults come from the detector's config)."""

    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    min_box_size: float = 2.0
    vote_iou: float = 0.0  # box voting's overlap (0: off)

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
        kept_box = box[keep]
        if params.vote_iou > 0:
            weight = (box_iou(kept_box, box) >= params.vote_iou) * score
            if label is not None:
                weight = weight * (label[keep, None] == label[None, :])
            kept_box = vote(kept_box, box, weight)
        score, _, label = _take(keep, score, None, label)
        box = kept_box
        if label is None:
            label = torch.zeros(score.shape, dtype=torch.int64, device=score.device)
        results.append((box, score, label))
    return results


def vote(kept: Tensor, candidates: Tensor, weight: Tensor) -> Tensor:
    """Box voting: ``(..., M, K) weight @ (..., K, 4) candidates``, normalised per kept box;
    a kept box whose weights are all zero (it cannot happen for a box that votes for itself,
    but a NaN IoU of a degenerate box is not >= anything) stays as it is."""
    total = weight.sum(-1, keepdim=True)
    mean = (weight @ candidates) / total.clamp(min=torch.finfo(weight.dtype).tiny)
    return torch.where(total > 0, mean, kept)


def _take(index: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t[index] for t in tensors)


@dataclass(frozen=True)
class FixedDetections:
    """Detections of a batch in fixed-shape tensors (what :func:`postprocess_fixed` returns).

    ``boxes`` (N, M, 4) and ``scores`` (N, M), best first, valid up to ``counts`` (N,) per
    image; ``settled`` (N,) says whether the on-device NMS reached its exact answer for that
    image within the rounds it was given (see :func:`postprocess_fixed`).
    """

    boxes: Tensor
    scores: Tensor
    counts: Tensor
    settled: Tensor


def pairwise_iou(boxes: Tensor) -> Tensor:
    """IoU of every pair of boxes in each image: (N, T, 4) x1,y1,x2,y2 -> (N, T, T)."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )
    lt = torch.max(boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.min(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[:, :, None] + area[:, None, :] - inter
    return inter / union  # 0/0 (two empty boxes) is NaN: never above a threshold


def _suppressed(over: Tensor, keep: Tensor) -> Tensor:
    """Which boxes a kept box of higher score overlaps too much: (N, T)."""
    return (over & keep.unsqueeze(2)).any(1)


def postprocess_fixed(
    scores: Tensor,
    boxes: Tensor,
    params: PostprocessParams,
    clip_size: tuple[int, int] | None = None,
    rounds: int = 12,
) -> FixedDetections:
    """:func:`postprocess` for a whole batch with fixed shapes: no host round trip.

    Why: on a GPU every data-dependent step of :func:`postprocess` (a boolean mask, the
    survivors of a threshold, torchvision's NMS, which copies its overlap mask to the host)
    waits for the device, several times per frame. Here every tensor's shape is known in
    advance, so the whole step is queued behind the network (and can be captured in a CUDA
    graph) and only the final (N, M) boxes travel to the host.

    Same detections as :func:`postprocess`: the top ``pre_nms_top_k`` scores overall (the
    survivors of the threshold among them are exactly the top ``pre_nms_top_k`` survivors),
    clipped, small boxes and those at or below the threshold marked invalid, then greedy NMS
    as a fixed point: with the candidates sorted, box j is kept iff it is valid and no kept box
    before it overlaps it by more than ``nms_iou``. Each round of
    ``keep = valid & ~any(keep[i] & overlap[i, j], i < j)`` settles at least the next box of
    the order, and the answer is exact once a round changes nothing; ``settled`` says so per
    image (the caller finishes the rare unsettled image with :func:`postprocess`). ``rounds``:
    how many rounds run on the device.
    """
    n, k = scores.shape
    t = min(params.pre_nms_top_k or k, k)
    m = int(params.max_detections)
    top, index = scores.topk(t, dim=1)  # sorted, best first
    box = boxes.gather(1, index.unsqueeze(-1).expand(n, t, 4))
    if clip_size is not None:
        height, width = clip_size
        box = torch.stack(
            (
                box[..., 0].clamp(0, width),
                box[..., 1].clamp(0, height),
                box[..., 2].clamp(0, width),
                box[..., 3].clamp(0, height),
            ),
            dim=-1,
        )
    size_ok = ((box[..., 2:] - box[..., :2]) >= params.min_box_size).all(-1)
    valid = (top > params.score_threshold) & size_ok
    iou = pairwise_iou(box)
    over = (iou > params.nms_iou).triu_(1)  # [i, j]: i < j (higher score)
    keep = valid
    for _ in range(rounds):
        keep = valid & ~_suppressed(over, keep)
    settled = (keep == (valid & ~_suppressed(over, keep))).all(1)
    rank = keep.cumsum(1) - 1
    chosen = keep & (rank < m)
    slot = torch.where(chosen, rank, m)  # slot m collects what is not chosen, then is dropped
    if params.vote_iou > 0:  # every candidate's vote; only the chosen ones' are kept below
        box = vote(box, box, (iou >= params.vote_iou) * (top * valid).unsqueeze(1))
    out_boxes = box.new_zeros(n, m + 1, 4).scatter_(1, slot.unsqueeze(-1).expand(n, t, 4), box)
    out_scores = top.new_zeros(n, m + 1).scatter_(1, slot, top)
    return FixedDetections(
        boxes=out_boxes[:, :m], scores=out_scores[:, :m], counts=chosen.sum(1), settled=settled
    )


def pack_detections(
    scores: Tensor,
    boxes: Tensor,
    params: PostprocessParams,
    clip_size: tuple[int, int] | None = None,
) -> Tensor:
    """:func:`postprocess_fixed` packed into one (N, 5M + 2) float tensor per batch, so that one
    copy brings everything to the host: per image ``M * 4`` box coordinates, ``M`` scores, the
    count and whether the NMS settled (1.0 / 0.0)."""
    fixed = postprocess_fixed(scores, boxes, params, clip_size)
    n = scores.shape[0]
    return torch.cat(
        (
            fixed.boxes.reshape(n, -1),
            fixed.scores,
            fixed.counts.unsqueeze(1).to(fixed.scores.dtype),
            fixed.settled.unsqueeze(1).to(fixed.scores.dtype),
        ),
        dim=1,
    )


@dataclass(frozen=True)
class DetectionMatch:
    """How two detection sets of one frame agree (see :func:`match_detections`)."""

    pairs: list[tuple[int, int, float]]  # (index in a, index in b, IoU)
    unmatched_a: list[int]
    unmatched_b: list[int]

    def score_gaps(self, scores_a: Tensor, scores_b: Tensor) -> list[float]:
        """|score_a - score_b| of every matched pair."""
        return [abs(float(scores_a[i]) - float(scores_b[j])) for i, j, _ in self.pairs]


def match_detections(
    boxes_a: Tensor, scores_a: Tensor, boxes_b: Tensor, scores_b: Tensor, iou: float = 0.5
) -> DetectionMatch:
    """Match two detection sets one to one, greedily: the best-scoring box of ``a`` first takes
    the unmatched box of ``b`` it overlaps most, if that IoU is at least ``iou``.

    For comparing the same detector on two devices or precisions (CPU / CUDA / fp16, the cv2
    and the on-device preprocessing): a box that moved a little is still the same detection,
    and boxes near the score threshold may exist on one side only.
    """
    boxes_a, boxes_b = torch.as_tensor(boxes_a).float(), torch.as_tensor(boxes_b).float()
    scores_a = torch.as_tensor(scores_a)
    overlap = box_iou(boxes_a.reshape(-1, 4), boxes_b.reshape(-1, 4))
    taken = torch.zeros(overlap.shape[1], dtype=torch.bool)
    pairs, unmatched_a = [], []
    for i in torch.argsort(scores_a, descending=True, stable=True).tolist():
        if overlap.shape[1] == 0:
            unmatched_a.append(i)
            continue
        row = overlap[i].masked_fill(taken, -1.0)
        j = int(row.argmax())
        if float(row[j]) >= iou:
            taken[j] = True
            pairs.append((i, j, float(row[j])))
        else:
            unmatched_a.append(i)
    unmatched_b = [j for j in range(overlap.shape[1]) if not taken[j]]
    return DetectionMatch(pairs, sorted(unmatched_a), unmatched_b)
