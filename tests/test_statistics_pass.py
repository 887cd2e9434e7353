"""The shared statistics pass: what the fold sees is numpy's answer on the same samples, whatever the
chunking the memory budget picks, cut at the sample count, with its progress line."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import log
from pipeline.graph.model import append_reduce
from pipeline.transforms import statistics_pass

SCALE = np.array([1.0, -2.0, 3.0], np.float32)


def scaled_relu() -> onnx.ModelProto:
    """x[N,3] -> Mul by (1, -2, 3) -> y -> Relu -> z (the output)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["y"], name="mul"),
            helper.make_node("Relu", ["y"], ["z"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(SCALE, "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


# small integers: every sum below is exact in float32 and float64, so any chunking gives equal bits
X = np.random.default_rng(3).integers(-4, 5, size=(20, 3)).astype(np.float32)


def batches() -> list[dict[str, np.ndarray]]:
    return [{"x": X[i : i + 7]} for i in range(0, len(X), 7)]  # 7 + 7 + 6: under 8 a chunk is a batch


def means(tensor: str, samples: int, memory_mb: int) -> tuple[np.ndarray, list[int], int]:
    """Mean of ``tensor`` per channel as a fold sums it, the chunk sizes it saw and the samples counted."""
    total, sizes = np.zeros(3, np.float64), []

    def fold(values: dict[str, np.ndarray], n: int) -> None:
        nonlocal total
        assert len(values[tensor]) == n
        total = total + values[tensor].astype(np.float64).sum(axis=0)
        sizes.append(n)

    seen = statistics_pass.run(scaled_relu(), [tensor], batches(), samples, fold, label="stats", copies=2,
                               memory_mb=memory_mb)  # fmt: skip
    return total / seen, sizes, seen


def test_mean_of_an_intermediate_tensor_is_numpys_whatever_the_chunking() -> None:
    expected = (X.astype(np.float64) * SCALE).mean(axis=0)
    roomy, roomy_sizes, seen = means("y", 20, memory_mb=512)
    tight, tight_sizes, tight_seen = means("y", 20, memory_mb=0)  # no budget at all: one sample per call
    assert seen == tight_seen == 20
    assert roomy_sizes == [7, 7, 6] and tight_sizes == [1] * 20
    np.testing.assert_array_equal(roomy, expected)
    np.testing.assert_array_equal(tight, roomy)


def test_stops_at_the_sample_count_inside_a_batch() -> None:
    got, sizes, seen = means("y", 11, memory_mb=512)
    assert seen == 11 and sizes == [7, 4]
    np.testing.assert_array_equal(got, (X[:11].astype(np.float64) * SCALE).mean(axis=0))


def test_no_samples_no_fold() -> None:
    def fold(values: dict[str, np.ndarray], n: int) -> None:
        raise AssertionError("folded without samples")

    assert statistics_pass.run(scaled_relu(), ["y"], [], 5, fold, label="stats", copies=2) == 0


def test_graph_inputs_come_from_the_feeds() -> None:
    """A tensor that is a graph input (a stem Conv's input, for GPTQ) is the chunk's feed itself."""
    for tensors in (["x", "z"], ["x"]):  # ["x"] alone: no session, the feeds are the values
        got: list[dict[str, np.ndarray]] = []
        statistics_pass.run(scaled_relu(), tensors, batches(), 20, lambda v, n, got=got: got.append(v),
                            label="s", copies=2)  # fmt: skip
        assert [sorted(v) for v in got] == [sorted(tensors)] * 3  # one per batch: 7, 7, 6
        np.testing.assert_array_equal(np.concatenate([v["x"] for v in got]), X)
        if "z" in tensors:
            np.testing.assert_array_equal(np.concatenate([v["z"] for v in got]), np.maximum(X * SCALE, 0))


def test_statistics_reduced_in_a_graph_built_on_the_model() -> None:
    """``graph``: per-chunk maxima computed by ONNX Runtime (as smoothing does), folded to numpy's."""
    model = scaled_relu()
    reducing = onnx.ModelProto()
    reducing.CopyFrom(model)
    append_reduce(reducing.graph, "ReduceMax", "y", "y_max", [0], 17)
    reducing.graph.output.append(helper.make_tensor_value_info("y_max", TensorProto.FLOAT, None))
    found: list[np.ndarray] = []

    def fold(values: dict[str, np.ndarray], n: int) -> None:
        found.append(values["y_max"])

    for memory_mb in (0, 512):
        found.clear()
        statistics_pass.run(model, ["y_max"], batches(), 20, fold, label="stats", copies=2, memory_mb=memory_mb,
                            graph=reducing)  # fmt: skip
        assert len(found) == (20 if memory_mb == 0 else 3)
        np.testing.assert_array_equal(np.max(found, axis=0), (X * SCALE).max(axis=0))


def test_progress_counts_samples_under_the_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "EVERY_S", 0.0)  # a line after every chunk
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]  # int8pipe's logger only, whatever propagates
    level = log.logger.level
    log.logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also drops logging's enabled-cache
    log.logger.addHandler(handler)
    try:
        means("y", 12, memory_mb=512)
    finally:
        log.logger.removeHandler(handler)
        log.logger.setLevel(level)
    lines = [r.getMessage().split(" (")[0] for r in records if r.getMessage().startswith("stats")]
    assert lines[:-1] == ["stats: 7/12 samples", "stats: 12/12 samples"]
    assert lines[-1].startswith("stats: done, 12 samples in")


def test_calibrate_new_returns_the_new_tensors_ranges_only() -> None:
    ranges = statistics_pass.calibrate_new(scaled_relu(), ["y"], batches, "minmax", 99.99, 512, None, "test")
    assert list(ranges) == ["y"]
    assert ranges["y"].amax == pytest.approx(float(np.abs(X * SCALE).max()))
    assert (ranges["y"].min, ranges["y"].max) == (float((X * SCALE).min()), float((X * SCALE).max()))
