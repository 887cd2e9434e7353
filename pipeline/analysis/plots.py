"""PNG plots for results people would rather look at than read. matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.log import logger


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: plots are skipped")
        return None
    return plt


PLOT_BINS = 512


def histograms(items: list[tuple[str, np.ndarray, float, float, float]], path: Path, method: str) -> bool:
    """One panel per tensor: |x| histogram (log counts), the chosen threshold and max |x|."""
    plt = _pyplot()
    if plt is None or not items:
        return False
    fig, axes = plt.subplots(len(items), 1, figsize=(8, 2.2 * len(items)), squeeze=False)
    for ax, (name, counts, width, amax, maxabs) in zip(axes[:, 0], items):
        # at most PLOT_BINS bars: a 720-pixel panel shows no more, and drawing 2048 per panel cost a second
        merge = max(1, -(-len(counts) // PLOT_BINS))
        padded = np.pad(np.asarray(counts, np.float64), (0, (-len(counts)) % merge))
        merged = padded.reshape(-1, merge).sum(axis=1)
        ax.stairs(np.maximum(merged, 0.5), np.arange(len(merged) + 1) * width * merge, baseline=0.5, fill=True,
                  color="#4c72b0")  # fmt: skip
        ax.set_yscale("log")
        ax.axvline(amax, color="#c44e52", label=f"{method} amax {amax:.4g}")
        ax.axvline(maxabs, color="#555555", linestyle=":", label=f"max |x| {maxabs:.4g}")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("|x|")
    # fixed margins: tight_layout measured every log-scale tick label again, a second per plot
    height = 2.2 * len(items)
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.3 / height, bottom=0.45 / height, hspace=0.55)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


BAR_DPI = 90
LABEL_CHARS = 72  # a tensor name longer than this is shortened from the middle


def shorten(name: str, limit: int = LABEL_CHARS) -> str:
    """``name`` in at most ``limit`` characters: its start (which block) and its end (which tensor of
    it) kept, the middle elided."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) * 2 // 3
    head = limit - 1 - tail
    return name[:head] + "…" + name[-tail:]


def fit_labels(names: list[str], limit: int = LABEL_CHARS) -> list[str]:
    """Shortened names, longer where shortening would make two of them read the same."""
    longest = max((len(n) for n in names), default=0)
    while True:
        labels = [shorten(n, limit) for n in names]
        if len(set(labels)) == len(set(names)) or limit >= longest:
            return labels
        limit += 16


def bars(labels: list[str], values: list[float], path: Path, title: str, xlabel: str) -> bool:
    """Horizontal bars, one per label, saved as a PNG at ``path``."""
    plt = _pyplot()
    if plt is None or not labels:
        return False
    fig = bar_figure(plt, labels, values, title, xlabel)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=BAR_DPI)
    plt.close(fig)
    return True


def bar_figure(plt: Any, labels: list[str], values: list[float], title: str, xlabel: str) -> Any:
    """The figure of :func:`bars`: it widens so the longest label fits beside the axes."""
    height = max(2.0, 0.25 * len(labels) + 1)
    # measured at the dpi it is saved with: small text does not scale exactly with the dpi
    fig, ax = plt.subplots(figsize=(8, height), dpi=BAR_DPI)
    y = np.arange(len(labels))
    ax.barh(y, values, color="#4c72b0")
    ax.set_yticks(y, fit_labels(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    renderer = fig.canvas.get_renderer()
    widest = max(t.get_window_extent(renderer).width for t in ax.get_yticklabels()) / fig.dpi
    fig.set_size_inches(max(8.0, widest + 5.5), height)  # the bars keep about 5 inches
    fig.tight_layout()
    return fig


def tradeoff(
    labels: list[str],
    coverage: list[float],
    drops: list[float],
    best: list[bool],
    path: Path,
    recovered: list[int] | None = None,
) -> bool:
    """Sweep trials: INT8 nodes against accuracy drop, the selected trial marked; ``recovered`` counts
    the nodes each trial's recovery kept float."""
    plt = _pyplot()
    if plt is None or not labels:
        return False
    fig = tradeoff_figure(plt, labels, coverage, drops, best, recovered or [0] * len(labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def tradeoff_figure(
    plt: Any, labels: list[str], coverage: list[float], drops: list[float], best: list[bool], recovered: list[int]
) -> Any:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = np.array(["#c44e52" if b else "#4c72b0" for b in best])
    kept = np.array([n > 0 for n in recovered], dtype=bool)
    x, y = np.asarray(coverage, dtype=float), np.asarray(drops, dtype=float)
    ax.scatter(x[~kept], y[~kept], c=colours[~kept], s=40, marker="o", label="as quantized")
    if kept.any():  # recovery changed the model: its node count is after the revert
        ax.scatter(x[kept], y[kept], c=colours[kept], s=60, marker="D", label="after recovery")
    for xi, yi, label, n in zip(x, y, labels, recovered):
        text = f"{label} ({n} kept float)" if n else label
        ax.annotate(text, (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of nodes: no 49.5 on the axis
    ax.set_xlabel("INT8 nodes")
    ax.set_ylabel("accuracy drop (FP32 - INT8)")
    ax.set_title("sweep trials (selected in red)")
    if kept.any():
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
