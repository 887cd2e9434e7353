"""A task metric for DB-style text detectors (PaddleOCR / RapidOCR's PP-OCR det models): how many of
the FP32 model's text boxes the INT8 model still finds, and how many it adds.

The model's output is a text probability map ``[N, 1, H, W]`` (or ``[N, H, W]``). Use it as

    steps:
      validate: {metric: "text_detection:boxes_f1", max_drop: 0.05}

with this file next to the pipeline YAML (or ``metric: "examples.metrics.text_detection:boxes_f1"``
from the repository root). int8pipe calls ``boxes_f1(outputs, labels, reference)`` with the FP32
outputs of the same samples as ``reference``; no labels are needed. The FP32 score is 1.0, so the
accuracy drop is what INT8 loses.

A box is what DB's post-processing keeps, with RapidOCR's settings: the map binarised at
``THRESH`` and dilated by a 2x2 kernel (``use_dilation``), each 4-connected component with both
sides of its bounding box >= ``MIN_SIDE`` pixels whose mean probability is >= ``BOX_THRESH``. DB
averages the probability over the rotated rectangle around the component's contour and then
enlarges the box (``unclip_ratio``); the component's own pixels and its upright bounding box are
close to that, and enlarging both sides' boxes alike does not change which ones match.

FP32 and INT8 boxes of a sample are matched one to one, greedily from the highest IoU down, pairs
with IoU >= ``MATCH_IOU`` only. ``boxes_kept`` = matched / FP32 boxes (recall); ``boxes_f1`` =
2 * matched / (FP32 boxes + INT8 boxes), which also falls when INT8 finds text that FP32 does not
(a gate on recall alone passes a model whose background lights up).
"""

from __future__ import annotations

from typing import Any

import numpy as np

THRESH = 0.3
BOX_THRESH = 0.5
MIN_SIDE = 3
MATCH_IOU = 0.5
OUTPUT: str | None = None  # which output to read when int8pipe passes {name: array} (None: the only one)


def _runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """Horizontal runs of set pixels: (row, start, end), end exclusive, row by row, left to right."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    ys, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row order as the starts: each run starts once, ends once
    return list(zip(ys.tolist(), starts.tolist(), ends.tolist()))


def components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """The 4-connected components of a 2-D boolean mask, each as its list of runs.

    Union-find over runs rather than pixels: a text map has a few thousand runs, so this stays fast
    in plain Python and needs nothing beyond numpy.
    """
    runs = _runs(mask)
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start: dict[int, int] = {}
    for i, (y, _, _) in enumerate(runs):
        row_start.setdefault(y, i)
    for i, (y, a0, a1) in enumerate(runs):
        j = row_start.get(y + 1)
        while j is not None and j < len(runs) and runs[j][0] == y + 1 and runs[j][1] < a1:
            if runs[j][2] > a0:  # the runs overlap in x: 4-connected through a vertical step
                parent[root(j)] = root(i)
            j += 1
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(root(i), []).append(run)
    return list(groups.values())


def bounding_box(runs: list[tuple[int, int, int]]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), ends exclusive, of a component given as its runs."""
    ys = [y for y, _, _ in runs]
    return min(ys), min(r[1] for r in runs), max(ys) + 1, max(r[2] for r in runs)


def text_boxes(prob: np.ndarray) -> np.ndarray:
    """The boxes [k, 4] (y0, x0, y1, x1; ends exclusive) DB keeps in one [H, W] probability map."""
    prob = np.asarray(prob, dtype=np.float64)
    mask = prob > THRESH
    dilated = mask.copy()  # 2x2 kernel anchored at its centre: a pixel or its upper/left neighbours
    dilated[1:] |= mask[:-1]
    dilated[:, 1:] |= mask[:, :-1]
    dilated[1:, 1:] |= mask[:-1, :-1]
    cumulative = np.concatenate([np.zeros((prob.shape[0], 1)), prob.cumsum(axis=1)], axis=1)
    boxes = []
    for runs in components(dilated):
        y0, x0, y1, x1 = bounding_box(runs)
        if min(y1 - y0, x1 - x0) < MIN_SIDE:
            continue
        total = sum(cumulative[y, b] - cumulative[y, a] for y, a, b in runs)
        pixels = sum(b - a for _, a, b in runs)
        if total / pixels >= BOX_THRESH:
            boxes.append((y0, x0, y1, x1))
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4]: [n, m]."""
    top, left = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    bottom, right = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matched(ref: np.ndarray, out: np.ndarray) -> int:
    """One-to-one pairs of ``ref`` and ``out`` boxes with IoU >= MATCH_IOU, greedily from the highest IoU."""
    if len(ref) == 0 or len(out) == 0:
        return 0
    iou = box_iou(ref, out)
    pairs = 0
    while True:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[i, j] < MATCH_IOU:
            return pairs
        pairs += 1
        iou[i, :] = -1
        iou[:, j] = -1


def _maps(x: Any) -> np.ndarray:
    if isinstance(x, dict):
        if OUTPUT is not None:
            x = x[OUTPUT]
        elif len(x) != 1:
            raise ValueError(
                f"text_detection reads one output, got {sorted(x)}: set steps.validate.output to the "
                "probability map (or OUTPUT in this module)"
            )
        else:
            (x,) = x.values()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"text_detection expects probability maps [N, 1, H, W] or [N, H, W], got shape {x.shape}")
    return x


def counts(outputs: Any, reference: Any) -> tuple[int, int, int]:
    """(matched pairs, FP32 boxes, INT8 boxes), pooled over the samples."""
    pairs = n_ref = n_out = 0
    for out, ref in zip(_maps(outputs), _maps(reference)):
        a, b = text_boxes(ref), text_boxes(out)
        pairs, n_ref, n_out = pairs + matched(a, b), n_ref + len(a), n_out + len(b)
    return pairs, n_ref, n_out


def boxes_kept(outputs: Any, labels: Any, reference: Any) -> float:
    """Share of the FP32 text boxes the scored model reproduces; 1.0 when FP32 finds none."""
    pairs, n_ref, _ = counts(outputs, reference)
    return pairs / n_ref if n_ref else 1.0


def boxes_f1(outputs: Any, labels: Any, reference: Any) -> float:
    """F1 of the scored model's text boxes against the FP32 ones; 1.0 when neither finds any."""
    pairs, n_ref, n_out = counts(outputs, reference)
    return 2 * pairs / (n_ref + n_out) if n_ref + n_out else 1.0
