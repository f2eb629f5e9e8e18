"""The node's debug image: a frame with its detections drawn on it (``~/debug_image``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def annotate(rgb: np.ndarray, detections: Any) -> np.ndarray:
    """A copy of ``rgb`` with each detection's box, class and score drawn on it."""
    import cv2

    canvas = np.ascontiguousarray(rgb).copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    for box, score, name in zip(
        detections.boxes, detections.scores, detections.class_names, strict=True
    ):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(
            canvas,
            f"{name} {float(score):.2f}",
            (x1, max(y1 - 4, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 255, 0),
            thickness,
        )
    return canvas
