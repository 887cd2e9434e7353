"""Accuracy metrics and FP32-vs-INT8 error, layer by layer. Plain numerics."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BUILTIN_METRICS = ("top1", "top5", "agreement", "cosine")
CLASS_SCORE_METRICS = ("top1", "top5", "agreement")  # these read an [N, C] array of class scores

# What a metric scores: one output's array, or {output name: array} when it scores several outputs.
Outputs = np.ndarray | dict[str, np.ndarray]


def gate_passed(drop: float, max_drop: float) -> bool:
    """The accuracy gate: a drop (FP32 score - INT8 score) of at most ``max_drop`` passes; equal passes."""
    return drop <= max_drop


def class_scores(x: np.ndarray) -> np.ndarray | None:
    """``x`` as [N, C] when it holds class scores, else None.

    Class scores are 2-D after dropping trailing singleton axes ([N, C, 1, 1] is [N, C]) with C >= 2.
    A detector's [N, 4 + C, A] or a single logit [N, 1] are not: their argmax means nothing.
    """
    shape = list(x.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    if len(shape) == 2 and shape[1] >= 2:
        return x.reshape(shape)
    return None


UNSURE_MARGIN = 0.1  # top-1 minus top-2 class probability under which FP32's own top-1 is a coin toss


def unsure_share(scores: np.ndarray) -> float | None:
    """Share of samples whose top two class probabilities are less than ``UNSURE_MARGIN`` apart, or
    None when ``scores`` are not class scores. Rows that are already probabilities (non-negative,
    summing to 1) are read as such, anything else as logits (softmax).

    On such samples any perturbation, INT8 or 1% input noise, flips top-1 often: agreement with FP32
    measured there says little about the model.
    """
    x = class_scores(scores)
    if x is None:
        return None
    x = x.astype(np.float64)
    if not ((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3)):
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    top2 = np.sort(x, axis=1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0] < UNSURE_MARGIN).mean())


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits.reshape(len(logits), -1), axis=1)[:, :k]
    return (top == labels.reshape(-1, 1)).any(axis=1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample cosine of ``a`` and ``b`` (flattened); exactly 1 for identical rows, 0 where one row
    is all zeros and the other is not (an INT8 output wiped to zero is no match)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    # a row holding inf (an FP16 region that overflowed, which validate names right after scoring)
    # scores NaN; numpy's RuntimeWarning would only precede that message with noise
    with np.errstate(invalid="ignore", over="ignore"):
        num = (a * b).sum(axis=1)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.clip(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)
    return np.where((a == b).all(axis=1), 1.0, cos)


def relative_noise(sqnr_db: float) -> float:
    """Noise power over signal power for an SQNR in dB (0 for an exact tensor)."""
    return 0.0 if math.isinf(sqnr_db) and sqnr_db > 0 else float(10.0 ** (-sqnr_db / 10.0))


# Elements summed in float64 at a time (128 KiB each): whole-tensor float64 copies and BLAS dot products
# made the layer comparison 90% of validate on EfficientNet-Lite0 (benchmarks/results/validate_cost.md)
ACCUMULATE_BLOCK = 1 << 14


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # numpy's own loop, not BLAS: BLAS's threads fight ONNX Runtime's for the cores, and lose badly
    return float(np.einsum("i,i->", a, b))


@dataclass
class ErrorAccumulator:
    """Streaming SQNR and cosine between a reference tensor and its quantised counterpart."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    test_sq: float = 0.0
    max_abs_err: float = 0.0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r, t = np.ravel(ref), np.ravel(test)
        for start in range(0, r.size, ACCUMULATE_BLOCK):
            self._add(r[start : start + ACCUMULATE_BLOCK], t[start : start + ACCUMULATE_BLOCK])

    def _add(self, ref: np.ndarray, test: np.ndarray) -> None:
        """One block, in float64 while it is in cache."""
        r, t = ref.astype(np.float64), test.astype(np.float64)
        d = r - t
        power = _dot(r, r)
        self.signal += power
        self.ref_sq += power
        self.noise += _dot(d, d)
        self.dot += _dot(r, t)
        self.test_sq += _dot(t, t)
        self.max_abs_err = max(self.max_abs_err, float(np.abs(d).max(initial=0.0)))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return float(10.0 * np.log10(self.signal / self.noise))

    @property
    def cosine(self) -> float:
        den = np.sqrt(self.ref_sq * self.test_sq)
        if den > 0:
            return float(self.dot / den)
        return 1.0 if self.ref_sq == self.test_sq else 0.0  # both all zeros: identical; one of them: no match


@dataclass
class Comparison:
    """FP32 and INT8 outputs (by output name) over a validation set, accumulated batch by batch."""

    labels: list[np.ndarray] = field(default_factory=list)
    fp32: dict[str, list[np.ndarray]] = field(default_factory=dict)
    int8: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, fp32: Mapping[str, np.ndarray], int8: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        for name, value in fp32.items():
            self.fp32.setdefault(name, []).append(value)
            self.int8.setdefault(name, []).append(int8[name])
        if labels is not None:
            self.labels.append(np.asarray(labels))

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
        """FP32 outputs, INT8 outputs (each {output name: all samples}) and the labels, if any."""
        labels = np.concatenate(self.labels) if self.labels else None
        fp32 = {k: np.concatenate(v) for k, v in self.fp32.items()}
        return fp32, {k: np.concatenate(v) for k, v in self.int8.items()}, labels


def score(metric: str, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> float:
    """Built-in ``metric`` of ``outputs``; ``reference`` (the FP32 outputs) serves agreement and cosine.

    Higher is better. For the FP32 score pass ``outputs=reference``. top1, top5 and agreement need
    class scores (see :func:`class_scores`) and raise ValueError otherwise.
    """
    return float(per_sample(metric, outputs, labels, reference).mean())


def per_sample(metric: str, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
    """Built-in ``metric`` sample by sample (1.0 / 0.0 hits, or cosines): :func:`score` is their mean."""
    if metric == "cosine":
        return cosine_rows(reference, outputs)  # INT8 (outputs) against FP32 (reference)
    scores, ref = class_scores(outputs), class_scores(reference)
    if scores is None or ref is None:
        raise ValueError(f"{metric} needs class scores [N, C] with C >= 2, got shape {list(outputs.shape)}")
    if metric == "top1":
        return topk_hits(scores, labels, 1).astype(np.float64)  # type: ignore[arg-type]
    if metric == "top5":
        return topk_hits(scores, labels, 5).astype(np.float64)  # type: ignore[arg-type]
    if metric == "agreement":
        return topk_hits(scores, np.argmax(ref, axis=1), 1).astype(np.float64)
    raise ValueError(metric)


def drop_standard_error(fp32: np.ndarray, int8: np.ndarray) -> float | None:
    """The standard error of the accuracy drop, mean(fp32 - int8), from per-sample scores of the
    same samples (paired: what both models get right together cancels). None under two samples.

    The gate compares a drop measured on a sample of inputs with ``max_drop``; on 128 samples a
    top-1 drop of 0.04 carries about +-0.017, so a gate decided by less than that is a coin toss.
    """
    d = np.asarray(fp32, np.float64) - np.asarray(int8, np.float64)
    if len(d) < 2:
        return None
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def metric_arity(fn: Callable[..., Any]) -> int:
    """3 when a custom metric takes the FP32 reference (a third positional parameter, or ``*args``),
    2 for ``fn(outputs, labels)``; ValueError when it cannot be called either way."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (some builtins): the two-argument form
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if len(positional) < 2 or len(required) > 3 or any(p.kind is p.KEYWORD_ONLY for p in required):
        raise ValueError(
            f"takes ({', '.join(p.name for p in params)}); a metric is called as fn(outputs, labels) or "
            "fn(outputs, labels, reference)"
        )
    return 3 if len(positional) >= 3 else 2


def call_metric(fn: Callable[..., Any], outputs: Outputs, labels: np.ndarray | None, reference: Outputs) -> Any:
    """``fn(outputs, labels, reference)``, or ``fn(outputs, labels)`` for a two-parameter metric."""
    return fn(outputs, labels, reference) if metric_arity(fn) == 3 else fn(outputs, labels)


def custom_score(fn: Callable[..., Any], outputs: Outputs, labels: np.ndarray | None, reference: Outputs) -> float:
    """A custom metric's score of ``outputs``; for the FP32 score pass ``outputs=reference``."""
    return float(call_metric(fn, outputs, labels, reference))
