"""Scoring INT8 models on a validation set against a cached FP32 reference. Plain numerics.

A :class:`Scorer` runs the FP32 model once, over the whole validation set and together with the
first INT8 model (:meth:`Scorer.first`), and keeps the FP32 outputs the metric reads, the labels and,
within :data:`INPUT_CACHE_BYTES`, the model inputs. Any other INT8 model of the same network (one
with some nodes kept in float, say) is then scored against that reference by running the INT8 model
alone (:meth:`Scorer.score`), on the whole set or on its first samples.

The metric is a built-in one (:data:`pipeline.analysis.evaluation.BUILTIN_METRICS`) or a custom
``fn(outputs, labels, reference)``: it receives one output's array, or ``{output name: array}``
when it scores several outputs (see :func:`scored_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.analysis import evaluation
from pipeline.errors import ConfigError, DataError, fail
from pipeline.execution import runtime
from pipeline.graph.layout import Layout, output_axes, samples_first
from pipeline.log import progress
from pipeline.sources import data
from pipeline.user_code import import_object

SAMPLES = 8  # validation samples kept with every output (validate hands them on)
# Samples per ONNX Runtime call: a Q/DQ model run exactly keeps every dequantized tensor too, and ORT's
# arena grows to the largest call (32 EfficientNet-Lite0 samples: about 1 GB). Batches of a model whose
# batch size is fixed go through as they come. At most; the validate step lowers it to fit memory_mb.
RUN_CHUNK = 8
# Sets of one chunk's FP32 activations alive while scoring: FP32's arena, and the INT8 model's, which
# holds about twice as many when computed exactly (every dequantized tensor is a float tensor too).
SCORE_COPIES = 3
INPUT_CACHE_BYTES = 512 << 20  # model inputs kept in memory for re-scoring; beyond, the source is read again


def scored_outputs(metric: str, output: str | list[str] | None, names: list[str], where: str) -> tuple[list[str], bool]:
    """The outputs ``metric`` scores, and whether it receives them as {name: array}.

    A dict goes to a custom metric when ``output`` is a list, or null on a multi-output model;
    otherwise the metric receives one array (built-in metrics score the first output, or the one named).
    """
    custom = metric not in evaluation.BUILTIN_METRICS
    if output is None:
        return (list(names), True) if custom and len(names) > 1 else (names[:1], False)
    wanted = [output] if isinstance(output, str) else list(dict.fromkeys(output))
    for name in wanted:
        if name not in names:
            fail(ConfigError, f"{where}.output: the model has no output {name!r}; its outputs are {', '.join(names)}.")
    return wanted, custom and isinstance(output, list)


@dataclass
class Metric:
    """A resolved metric: what it is called, which outputs it reads and how it receives them."""

    spec: str  # as configured: a built-in name or "pkg.mod:fn"
    outputs: list[str]  # the scored outputs; built-in metrics read the first
    as_dict: bool  # a custom metric receives {output name: array} rather than one array
    fn: Callable[..., Any] | None = None  # the custom metric (None: built-in)
    where: str = "steps.validate"  # the config section, for messages

    @property
    def name(self) -> str:
        """The name in metric keys: ``top1``, or a custom metric's function name."""
        return self.spec.rpartition(":")[2]

    def check(self, reference: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        """DataError when a built-in metric cannot score these outputs (no labels, no class scores)."""
        if self.fn is not None:
            return
        primary = self.outputs[0]
        if self.spec in ("top1", "top5") and labels is None:
            fail(
                DataError,
                f"{self.where}.metric {self.spec} needs labels: add a 'labels' array to data.validation, "
                "or use metric: agreement.",
            )
        ref = reference[primary]
        if self.spec in evaluation.CLASS_SCORE_METRICS and evaluation.class_scores(ref) is None:
            fail(
                DataError,
                f"{self.where}.metric {self.spec} needs class scores ([N, C] with C >= 2), but model output "
                f"{primary!r} has shape {list(ref.shape)}. Use metric: cosine (FP32-vs-INT8 output "
                "similarity), or a task metric 'pkg.mod:fn' called as fn(outputs, labels, reference) "
                "(an example for detectors: examples/metrics/detection.py).",
            )

    def score(
        self, outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict[str, np.ndarray]
    ) -> float:
        """The metric of ``outputs`` (for the FP32 score pass ``outputs=reference``); higher is better."""
        primary = self.outputs[0]
        if self.fn is None:
            return evaluation.score(self.spec, outputs[primary], labels, reference[primary])
        if self.as_dict:
            value = evaluation.call_metric(self.fn, outputs, labels, reference)
        else:
            value = evaluation.call_metric(self.fn, outputs[primary], labels, reference[primary])
        try:
            return float(value)
        except (TypeError, ValueError):
            fail(ConfigError, f"{self.where}.metric: {self.spec} returned {value!r}; a metric must return a number.")


def resolve_metric(
    spec: str, output: str | list[str] | None, names: list[str], search_dirs: list[Path], where: str = "steps.validate"
) -> Metric:
    """The metric ``spec`` on a model with outputs ``names``; a custom one is imported now, so a typo
    fails before any inference."""
    scored, as_dict = scored_outputs(spec, output, names, where)
    fn = None
    if spec not in evaluation.BUILTIN_METRICS:
        fn = import_object(spec, search_dirs, f"{where}.metric")
        try:
            evaluation.metric_arity(fn)
        except ValueError as exc:
            fail(ConfigError, f"{where}.metric: {spec} {exc}.")
    return Metric(spec, scored, as_dict, fn, where)


@dataclass
class Scores:
    """One INT8 model scored against the FP32 reference on the first ``samples`` validation samples."""

    metric: Metric
    fp32: float  # the FP32 model's score on the same samples
    int8: float
    outputs: dict[str, np.ndarray]  # the INT8 model's scored outputs
    reference: dict[str, np.ndarray]  # the FP32 model's
    labels: np.ndarray | None

    @property
    def drop(self) -> float:
        """FP32 score - INT8 score: positive when INT8 is worse."""
        return self.fp32 - self.int8

    @property
    def samples(self) -> int:
        return len(self.outputs[self.metric.outputs[0]])

    @property
    def drop_se(self) -> float | None:
        """The standard error of :attr:`drop` over these samples (built-in metrics; a custom metric
        returns one number, so None), see :func:`pipeline.analysis.evaluation.drop_standard_error`."""
        if self.metric.fn is not None:
            return None
        primary = self.metric.outputs[0]
        return evaluation.drop_standard_error(self._hits(self.reference[primary]), self._hits(self.outputs[primary]))

    def gain_se(self, base: Scores) -> float | None:
        """The standard error of ``self.int8 - base.int8``, two models scored on the same samples
        (paired; built-in metrics only, like :attr:`drop_se`)."""
        if self.metric.fn is not None or self.samples != base.samples:
            return None
        primary = self.metric.outputs[0]
        return evaluation.drop_standard_error(self._hits(self.outputs[primary]), self._hits(base.outputs[primary]))

    def _hits(self, outputs: np.ndarray) -> np.ndarray:
        """The built-in metric sample by sample for ``outputs`` of these samples (primary output)."""
        ref = self.reference[self.metric.outputs[0]]
        return evaluation.per_sample(self.metric.spec, outputs, self.labels, ref)

    def cosines(self, name: str | None = None) -> np.ndarray:
        """Per-sample cosine of the INT8 and FP32 values of output ``name`` (default: the primary)."""
        name = name or self.metric.outputs[0]
        return evaluation.cosine_rows(self.reference[name], self.outputs[name])


@dataclass
class _Inputs:
    """Model inputs cached in order, as long as they fit the budget."""

    budget: int
    layout: Layout = field(default_factory=Layout)
    batches: list[data.Batch] = field(default_factory=list)
    samples: int = 0
    nbytes: int = 0
    full: bool = True  # every input seen so far is cached

    def add(self, feeds: data.Batch) -> None:
        size = sum(v.nbytes for v in feeds.values())
        if not self.full or self.nbytes + size > self.budget:
            self.full = False
            return
        self.batches.append(feeds)
        self.nbytes += size
        self.samples += self.layout.count(feeds)


class Scorer:
    """The FP32 reference of a validation set, computed once; INT8 models scored against it.

    ``batches()`` starts the validation source again (labels under ``data.LABELS``); it is called
    once by :meth:`first`, and again only when a model is scored on more samples than the inputs
    cached. ``int8_optimize=False`` runs INT8 models with graph optimisations off (every Q/DQ
    computed in float, TensorRT's arithmetic).

    ``layout`` is the data source's (``batch_axes``, ``constants``): inputs are counted and cut along
    it; outputs are handed to the metric with their samples on the first axis (an output's sample
    axis is the one sharing its symbolic dim with an input's, see :func:`pipeline.graph.layout.output_axes`).
    """

    def __init__(
        self,
        fp32: Any,
        metric: Metric,
        batches: Callable[[], Iterable[data.Batch]],
        int8_optimize: bool = True,
        cache_bytes: int = INPUT_CACHE_BYTES,
        layout: Layout | None = None,
        chunk: int = RUN_CHUNK,
    ):
        self.metric = metric
        self.int8_optimize = int8_optimize
        self.layout = layout or Layout()
        self._fp32 = fp32 if hasattr(fp32, "run") else runtime.session(fp32)
        self._batches = batches
        self._inputs = _Inputs(cache_bytes, self.layout)
        self._out_axes = output_axes(
            {i.name: i.shape for i in self._fp32.get_inputs()},
            {o.name: o.shape for o in self._fp32.get_outputs()},
            self.layout,
        )
        axes = [(i.shape, self.layout.axis(i.name)) for i in self._fp32.get_inputs()]
        fixed = any(a is not None and a < len(shape) and isinstance(shape[a], int) for shape, a in axes)
        self._chunk = None if fixed else chunk
        self._reference: dict[str, np.ndarray] = {}
        self._labels: np.ndarray | None = None
        self._fp32_scores: dict[int, float] = {}  # samples -> FP32 score on the first that many
        self.kept: dict[str, np.ndarray] = {}  # the first SAMPLES samples: input.*, fp32.*, int8.*
        self.names = [o.name for o in self._fp32.get_outputs()]
        # applied to every ModelProto before it runs (recovery's candidates lowered to FP16 regions)
        self.prepare: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None

    @property
    def samples(self) -> int:
        """The validation samples in the reference (0 before :meth:`first`)."""
        return len(self._reference[self.metric.outputs[0]]) if self._reference else 0

    def session(self, model: Any) -> Any:
        """An ONNX Runtime session for an INT8 model: a session, a path, serialized bytes or a ModelProto."""
        if hasattr(model, "run"):
            return model
        if isinstance(model, onnx.ModelProto) and self.prepare is not None:
            model = self.prepare(model)
        return runtime.session(model, optimize=self.int8_optimize)

    def first(self, int8: Any, keep: int = SAMPLES) -> Scores:
        """Run the FP32 model and ``int8`` over the whole validation set: the one pass that reads the
        source and runs FP32. Keeps the reference, the labels and the first ``keep`` samples (inputs
        and every output of both models, in :attr:`kept`); returns ``int8``'s scores."""
        b = self.session(int8)
        scored = self.metric.outputs
        cmp = evaluation.Comparison()
        kept: dict[str, list[np.ndarray]] = {}
        n_kept = 0
        for batch in progress(self._batches(), "validation batches"):
            feeds = {k: v for k, v in batch.items() if k != data.LABELS}
            self._inputs.add(feeds)
            take = keep - n_kept
            fetch = self.names if take > 0 else scored  # every output only while samples are being kept
            a = self._run(self._fp32, fetch, feeds)
            o = self._run(b, fetch, feeds)
            if take > 0:
                n_kept += _keep(kept, feeds, a, o, take, self.layout)
            cmp.add({k: a[k] for k in scored}, {k: o[k] for k in scored}, batch.get(data.LABELS))
        self._reference, outputs, self._labels = cmp.arrays()
        self.kept = {
            k: _stack(v, self.layout.axis(k[len("input.") :]) if k.startswith("input.") else 0) for k, v in kept.items()
        }
        self.metric.check(self._reference, self._labels)
        return self.evaluate(outputs)

    def evaluate(self, outputs: dict[str, np.ndarray]) -> Scores:
        """Scores of INT8 ``outputs`` for the first ``len(outputs)`` validation samples (FP32 score cached)."""
        n = _length(outputs)
        ref = {k: v[:n] for k, v in self._reference.items()}
        labels = None if self._labels is None else self._labels[:n]
        if n not in self._fp32_scores:
            self._fp32_scores[n] = self.metric.score(ref, labels, ref)
        int8 = self.metric.score(outputs, labels, ref)
        return Scores(self.metric, self._fp32_scores[n], int8, outputs, ref, labels)

    def score(self, int8: Any, limit: int | None = None, label: str | None = None) -> Scores:
        """Score another INT8 model against the cached reference, on the first ``limit`` samples
        (default: all); only the INT8 model runs. With ``label``, progress is logged under it (recovery
        scores many models briefly and logs each result instead)."""
        if not self._reference:
            raise RuntimeError("Scorer.score before Scorer.first: there is no FP32 reference yet")
        b = self.session(int8)
        scored = self.metric.outputs
        parts: dict[str, list[np.ndarray]] = {k: [] for k in scored}
        feeds_in = self.inputs(limit)
        if label is not None:
            total = self.samples if limit is None else min(limit, self.samples)
            feeds_in = progress(feeds_in, label, total=total, size=self.layout.count, unit="samples")
        for feeds in feeds_in:
            for k, v in self._run(b, scored, feeds).items():
                parts[k].append(v)
        return self.evaluate({k: np.concatenate(v) for k, v in parts.items()})

    def inputs(self, limit: int | None = None) -> Iterator[data.Batch]:
        """The model inputs of the first ``limit`` validation samples (default: all), from the cache
        when it holds them, else from the source."""
        total = self.samples or None
        n = limit if total is None else (total if limit is None else min(limit, total))
        cache = self._inputs
        source: Iterable[data.Batch]
        if self._reference and (cache.full or (n is not None and cache.samples >= n)):
            source = cache.batches
        else:
            source = ({k: v for k, v in b.items() if k != data.LABELS} for b in self._batches())
        seen = 0
        count = self.layout.count
        it = iter(source)
        try:
            for feeds in it:
                if n is not None and seen >= n:
                    break
                if n is not None and seen + count(feeds) > n:
                    feeds = self.layout.take(feeds, 0, n - seen)
                seen += count(feeds)
                yield feeds
        finally:
            close = getattr(it, "close", None)  # a generator: let the source release its files now
            if close is not None:
                close()

    def kept_outputs(self, int8: Any) -> dict[str, np.ndarray]:
        """:attr:`kept` with the ``int8.*`` outputs recomputed by another INT8 model."""
        names = [k[len("input.") :] for k in self.kept if k.startswith("input.")]
        if not names:
            return dict(self.kept)
        feeds = {n: self.kept[f"input.{n}"] for n in names}
        got = self._run(self.session(int8), self.names, feeds)
        return {k: (got[k[len("int8.") :]] if k.startswith("int8.") else v) for k, v in self.kept.items()}

    def _run(self, sess: Any, names: list[str], feeds: data.Batch) -> dict[str, np.ndarray]:
        """``names`` computed by ``sess`` on ``feeds``, each output's samples on its first axis."""
        if self._chunk is None or self.layout.count(feeds) <= self._chunk:
            return samples_first(dict(zip(names, sess.run(names, feeds))), self._out_axes)
        parts = [self._run(sess, names, chunk) for chunk in self.layout.chunks([feeds], self._chunk)]
        return {n: np.concatenate([p[n] for p in parts]) for n in names}


def _length(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def _keep(
    kept: dict[str, list[np.ndarray]],
    feeds: dict[str, np.ndarray],
    fp32: dict[str, np.ndarray],
    int8: dict[str, np.ndarray],
    take: int,
    layout: Layout,
) -> int:
    """Append up to ``take`` samples' inputs (in the model's layout) and FP32/INT8 outputs (samples
    first) to ``kept``; returns how many. A constant input is kept once."""
    for name, value in layout.take(feeds, 0, take).items():
        key = f"input.{name}"
        if layout.axis(name) is None and key in kept:
            continue
        kept.setdefault(key, []).append(np.array(value))  # a copy
    for prefix, arrays in (("fp32", fp32), ("int8", int8)):
        for name, value in arrays.items():
            kept.setdefault(f"{prefix}.{name}", []).append(np.array(value[:take] if value.ndim else value))
    return min(take, layout.count(feeds))


def _stack(parts: list[np.ndarray], axis: int | None) -> np.ndarray:
    return np.concatenate(parts, axis=axis) if parts[0].ndim and axis is not None else parts[0]
