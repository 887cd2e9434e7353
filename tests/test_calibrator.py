"""The calibration engine on real ONNX Runtime sessions: tensor selection, passes, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.calibration import histogram
from pipeline.calibration.calibrator import calibrate
from pipeline.transforms.quantization import quantized_activations
from tests.models import build


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(build("conv_relu_gemm"), str(path))
    return path


def batches(n: int = 40, size: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).laplace(size=(n, 2, 4, 4)).astype(np.float32)
    return lambda: ({"x": x[i : i + size]} for i in range(0, n, size))


def test_minmax_ranges_equal_numpy(model_path: Path) -> None:
    import onnxruntime

    cal = calibrate(model_path, batches(), "minmax")
    x = np.concatenate(list(b["x"] for b in batches()()))
    sess = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    t = cal.ranges.tensors
    assert t["x"].min == x.min() and t["x"].max == x.max()
    assert t["y"].amax == pytest.approx(float(np.abs(y).max()), rel=1e-6)
    assert cal.ranges.num_samples == 40 and set(t) == {"x", "conv", "relu", "gap", "flat", "y"}
    assert cal.ranges.environment["histogram_kernel"] == histogram.KERNEL  # which path built the histograms


def test_histogram_only_on_quantized_tensors(model_path: Path) -> None:
    chosen = quantized_activations(build("conv_relu_gemm"), "tensorrt")
    assert chosen == ["x", "flat"]
    cal = calibrate(model_path, batches(), "entropy", histogram_tensors=chosen)
    methods = {k: v.method for k, v in cal.ranges.tensors.items()}
    assert methods == {
        "x": "minmax",
        "conv": "minmax",
        "relu": "minmax",
        "gap": "minmax",
        "flat": "entropy",
        "y": "minmax",
    }  # x: graph inputs keep their full range
    assert set(cal.histograms) == {"flat"}
    every = calibrate(model_path, batches(), "entropy", minmax_inputs=False)
    assert set(every.histograms) == {"x", "conv", "relu", "gap", "flat", "y"}
    assert every.ranges.tensors["x"].amax < every.ranges.tensors["x"].minmax_amax  # Laplace input gets clipped


def test_two_pass_does_not_depend_on_batch_size(model_path: Path) -> None:
    a = calibrate(model_path, batches(size=8), "entropy", minmax_inputs=False)
    b = calibrate(model_path, batches(size=40), "entropy", minmax_inputs=False)
    assert a.ranges.data_digest == b.ranges.data_digest  # same samples, same order
    for name in a.ranges.tensors:
        assert a.ranges.tensors[name].amax == pytest.approx(b.ranges.tensors[name].amax, rel=1e-6), name


def test_source_is_read_once_and_replayed(model_path: Path) -> None:
    """Pass 2 replays pass 1's inputs from disk: a source that would not repeat itself still works."""
    calls = iter(range(10))
    cal = calibrate(model_path, lambda: batches(seed=next(calls))(), "entropy", minmax_inputs=False)
    assert next(calls) == 1  # the source was called once
    ref = calibrate(model_path, batches(seed=0), "entropy", minmax_inputs=False)
    assert cal.ranges.data_digest == ref.ranges.data_digest
    assert cal.ranges.amax() == ref.ranges.amax()
    one_pass = calibrate(model_path, batches(), "entropy", passes=1)
    assert one_pass.ranges.params["passes"] == 1


@pytest.mark.parametrize("passes", [1, 2])
def test_non_finite_activations_are_refused_by_name(tmp_path: Path, passes: int) -> None:
    from onnx import TensorProto, helper

    from pipeline.errors import CalibrationError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("inverse", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Reciprocal", ["x"], ["inverse"])], "g", [x], [y])
    path = tmp_path / "reciprocal.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = np.ones((16, 4), np.float32)
    data[9, 2] = 0.0  # 1/0 = inf in one sample of the second batch
    with pytest.raises(CalibrationError, match=r"1 tensor\(s\) took NaN or infinite values .*'inverse'"):
        calibrate(path, lambda: ({"x": data[i : i + 8]} for i in (0, 8)), "entropy", passes=passes)
    fine = calibrate(path, lambda: iter([{"x": data[:8]}]), "entropy", passes=passes)
    assert fine.ranges.tensors["inverse"].max == 1.0


def test_derived_ranges_equal_measured_ones(tmp_path: Path) -> None:
    """Relu/Clip/Flatten ranges follow from the Conv's without being exposed, and equal the real ones."""
    import onnxruntime

    from pipeline.calibration.collect import CHUNK, expose
    from pipeline.calibration.derived import derivable

    model = build("clip_chain")
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    tensors = ["x", "conv", "relu6", "relu", "flat", "y", "top", "clipped"]
    derived = derivable(model, tensors, measure=set())
    assert {k: v.source for k, v in derived.items()} == {"relu6": "conv", "relu": "conv", "flat": "conv"}
    partial = derivable(model, tensors, measure={"relu"})  # a histogram tensor is measured, and can be a source
    assert {k: v.source for k, v in partial.items()} == {"relu6": "conv", "flat": "relu"}

    x = (np.random.default_rng(0).normal(size=(24, 2, 4, 4)) * 3).astype(np.float32)
    cal = calibrate(path, lambda: ({"x": x[i : i + 8]} for i in range(0, 24, 8)), "minmax")
    sess = onnxruntime.InferenceSession(expose(model, tensors), providers=["CPUExecutionProvider"])
    # ReduceMax spans a whole batch, so the reference runs the chunks the calibrator runs
    runs = [sess.run(tensors, {"x": x[i : i + CHUNK]}) for i in range(0, 24, CHUNK)]
    for k, name in enumerate(tensors):
        got = cal.ranges.tensors[name]
        assert got.min == min(float(r[k].min()) for r in runs), name
        assert got.max == max(float(r[k].max()) for r in runs), name
    assert cal.ranges.tensors["conv"].max > 6.0 and cal.ranges.tensors["relu6"].max == 6.0  # the clip was real
    assert cal.ranges.tensors["conv"].min < 0.0 and cal.ranges.tensors["relu"].min == 0.0


def test_numpy_fallback_gives_the_same_ranges_and_says_so(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An install without a C compiler: same ranges, a warning, and ranges.json records the path."""
    from pipeline import log

    log.configure()
    compiled = calibrate(model_path, batches(), "entropy", minmax_inputs=False)
    monkeypatch.setattr(histogram, "_compiled_abs_histogram", None)
    monkeypatch.setattr(histogram, "KERNEL", "numpy")
    capsys.readouterr()
    fallback = calibrate(model_path, batches(), "entropy", minmax_inputs=False)
    assert "compiled histogram kernel is not built" in capsys.readouterr().err
    assert fallback.ranges.environment["histogram_kernel"] == "numpy"
    assert fallback.ranges.amax() == compiled.ranges.amax()
