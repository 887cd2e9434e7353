"""Accuracy metrics and FP32-vs-INT8 error, layer by layer. Plain numerics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BUILTIN_METRICS = ("top1", "top5", "agreement", "cosine")


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits.reshape(len(logits), -1), axis=1)[:, :k]
    return (top == labels.reshape(-1, 1)).any(axis=1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


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
        r = ref.astype(np.float64).ravel()
        t = test.astype(np.float64).ravel()
        d = r - t
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ t)
        self.ref_sq += float(r @ r)
        self.test_sq += float(t @ t)
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
        return float(self.dot / den) if den > 0 else 1.0


@dataclass
class Comparison:
    """FP32 and INT8 model outputs over a validation set, accumulated batch by batch."""

    labels: list[np.ndarray] = field(default_factory=list)
    fp32: list[np.ndarray] = field(default_factory=list)
    int8: list[np.ndarray] = field(default_factory=list)

    def add(self, fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray | None) -> None:
        self.fp32.append(fp32)
        self.int8.append(int8)
        if labels is not None:
            self.labels.append(np.asarray(labels))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        labels = np.concatenate(self.labels) if self.labels else None
        return np.concatenate(self.fp32), np.concatenate(self.int8), labels


def score(metric: str, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> float:
    """``metric`` for ``outputs``; ``reference`` (the FP32 outputs) serves agreement and cosine."""
    if metric == "top1":
        return float(topk_hits(outputs, labels, 1).mean())  # type: ignore[arg-type]
    if metric == "top5":
        return float(topk_hits(outputs, labels, 5).mean())  # type: ignore[arg-type]
    if metric == "agreement":
        ref = np.argmax(reference.reshape(len(reference), -1), axis=1)
        return float(topk_hits(outputs, ref, 1).mean())
    if metric == "cosine":
        return float(cosine_rows(reference, outputs).mean())
    raise ValueError(metric)


def custom_score(fn: Callable[..., float], outputs: np.ndarray, labels: np.ndarray | None) -> float:
    return float(fn(outputs, labels))
