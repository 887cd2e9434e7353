"""A task metric for detectors: the share of FP32 detections the INT8 model still makes.

Use it on a YOLO-style detector whose output is ``[N, 4 + C, A]``: for each of A anchors the box
(cx, cy, w, h) followed by C class scores (probabilities, as YOLOv8 exports them):

    steps:
      validate: {metric: "detection:detections_kept", max_drop: 0.02, output: output0}

with this file next to the pipeline YAML (or on the path: ``metric: "examples.metrics.detection:..."``
from the repository root). int8pipe calls ``detections_kept(outputs, labels, reference)``: ``outputs``
are the scored model's outputs, ``reference`` the FP32 outputs of the same samples. No labels are
needed: the FP32 detections are the reference. For the FP32 score ``outputs`` is ``reference``
and the score is 1.0, so the accuracy drop is the share of FP32 detections lost.

A detection is a box whose best class score is at least ``SCORE_THRESHOLD``, kept by per-class
non-maximum suppression (IoU ``NMS_IOU``). An FP32 detection is kept when an INT8 detection of the same
class overlaps it with IoU >= ``MATCH_IOU``; each INT8 detection matches at most one FP32 detection
(greedy, highest FP32 score first).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCORE_THRESHOLD = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
OUTPUT: str | None = None  # which output to read when int8pipe passes {name: array} (None: the only one)


def xyxy(boxes: np.ndarray) -> np.ndarray:
    """[K, 4] (cx, cy, w, h) -> [K, 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each of ``boxes`` [K, 4]."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detections(pred: np.ndarray, score_threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, ...]:
    """One sample's [4 + C, A] output -> (boxes xyxy [K, 4], scores [K], classes [K]) after NMS per class."""
    pred = np.asarray(pred, dtype=np.float64)
    classes = pred[4:].argmax(axis=0)
    scores = pred[4:].max(axis=0)
    mask = scores >= score_threshold
    boxes, scores, classes = xyxy(pred[:4, mask].T), scores[mask], classes[mask]
    kept = [np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c])] for c in np.unique(classes)]
    idx = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return boxes[idx], scores[idx], classes[idx]


def _array(x: Any) -> np.ndarray:
    if isinstance(x, dict):
        if OUTPUT is not None:
            return np.asarray(x[OUTPUT])
        if len(x) != 1:
            raise ValueError(
                f"detections_kept reads one output, got {sorted(x)}: set steps.validate.output to the "
                "detection output (or OUTPUT in this module)"
            )
        (x,) = x.values()
    return np.asarray(x)


def detections_kept(outputs: Any, labels: Any, reference: Any) -> float:
    """Share of the FP32 detections (in ``reference``) that ``outputs`` reproduce; 1.0 when FP32 has none."""
    outputs, reference = _array(outputs), _array(reference)
    total = matched = 0
    for out, ref in zip(outputs, reference):
        ref_boxes, _, ref_classes = detections(ref)
        out_boxes, _, out_classes = detections(out)
        free = np.ones(len(out_boxes), dtype=bool)
        total += len(ref_boxes)
        for box, cls in zip(ref_boxes, ref_classes):  # highest FP32 score first
            candidates = np.flatnonzero(free & (out_classes == cls))
            if candidates.size == 0:
                continue
            overlaps = iou(box, out_boxes[candidates])
            best = int(np.argmax(overlaps))
            if overlaps[best] >= MATCH_IOU:
                free[candidates[best]] = False
                matched += 1
    return matched / total if total else 1.0
