"""What a user reads while a step works and in its plots: progress in samples, tensor names in full."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import log
from pipeline.analysis import plots
from pipeline.calibration.calibrator import calibrate
from tests.models import build


@pytest.fixture
def int8pipe_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """int8pipe's INFO lines, with a progress line after every item."""
    monkeypatch.setattr(log, "EVERY_S", 0.0)
    log.logger.addHandler(caplog.handler)  # the CLI's configure() stops propagation to the root logger
    level = log.logger.level
    log.logger.setLevel(logging.INFO)  # setLevel, not .level =: an earlier test's cached "INFO is off" stays
    yield caplog
    log.logger.setLevel(level)
    log.logger.removeHandler(caplog.handler)


def test_calibration_progress_counts_samples(tmp_path: Path, int8pipe_log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(build("conv_relu_gemm"), str(path))
    x = np.random.default_rng(0).normal(size=(40, 2, 4, 4)).astype(np.float32)
    # batches of 5 samples; the calibrator feeds ONNX Runtime chunks of up to 8
    calibrate(path, lambda: ({"x": x[i : i + 5]} for i in range(0, 40, 5)), "entropy", passes=2)
    lines = [r.getMessage() for r in int8pipe_log.records if r.getMessage().startswith("calibration pass")]
    assert "calibration pass 1/2: done, 40 samples in" in "\n".join(lines)
    assert "calibration pass 2/2: done, 40 samples in" in "\n".join(lines)
    # pass 2 replays recorded samples, so it knows the total; counts only grow, ending at 40/40
    second = [int(m.group(1)) for m in map(re.compile(r"calibration pass 2/2: (\d+)/40 samples \(").match, lines) if m]
    assert second and second == sorted(second) and second[-1] == 40
    first = [m.group(1) for m in map(re.compile(r"calibration pass 1/2: (\d+) samples \(").match, lines) if m]
    assert first and first[-1] == "40"  # pass 1 reads a stream of unknown length: no total


@pytest.mark.slow
def test_bias_correction_progress_counts_the_samples_calibration_saw(
    tmp_path: Path, int8pipe_log: pytest.LogCaptureFixture
) -> None:
    """40 calibration samples and bias_correction_samples 64 (the default): it measures on the 40
    and says so, rather than counting towards 64; and a cap under the data ends with its line too."""
    import yaml

    from pipeline.orchestration.cli import main

    onnx.save(build("conv_relu_gemm"), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).normal(size=(40, 2, 4, 4)).astype(np.float32))
    config = {
        "name": "bc-progress",
        "model": {"onnx": "m.onnx"},
        "data": {"calibration": {"npz": "cal.npz"}},
        "steps": {"export": {}, "calibrate": {"batch_size": 5}, "quantize": {}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    lines = [r.getMessage() for r in int8pipe_log.records if r.getMessage().startswith("bias correction")]
    counts = [int(m.group(1)) for m in map(re.compile(r"bias correction: (\d+)/40 samples \(").match, lines) if m]
    assert counts and counts == sorted(counts) and counts[-1] == 40, lines
    assert "bias correction: done, 40 samples in" in "\n".join(lines)

    int8pipe_log.clear()
    config["steps"]["quantize"] = {"bias_correction_samples": 12}  # 12 of the 40: the last batch is cut
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    lines = [r.getMessage() for r in int8pipe_log.records if r.getMessage().startswith("bias correction")]
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        "bias correction: 5/12 samples",
        "bias correction: 10/12 samples",
        "bias correction: 12/12 samples",
    ]
    assert lines[-1].startswith("bias correction: done, 12 samples in"), lines


def test_layer_plot_labels_fit_and_tell_long_names_apart() -> None:
    plt = plots._pyplot()
    tail = "/attention/multi_head/query_projection/MatMul_output_0_DequantizeLinear_Output"
    names = [f"/backbone/stage{i}/block{i}{tail}" for i in (1, 2)] + ["short", "/head/" + "x" * 300]
    fig = plots.bar_figure(plt, names, [10.0, 12.0, 30.0, 5.0], "per tensor", "SQNR (dB)")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ticks = fig.axes[0].get_yticklabels()
        labels = [t.get_text() for t in ticks]
        assert len(set(labels)) == len(names)  # two names alike in their last 50 characters stay apart
        for name, label in zip(names, labels):
            head, _, end = label.partition("…")
            assert name.startswith(head) and name.endswith(end or head)  # only the middle is left out
        assert labels[0].startswith("/backbone/stage1") and labels[0].endswith("DequantizeLinear_Output")
        box = fig.bbox
        for t in ticks:
            extent = t.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
    finally:
        plt.close(fig)


def test_saved_layer_plot_has_a_margin_around_its_longest_label(tmp_path: Path) -> None:
    import matplotlib.image

    name = "/backbone/stage1/block1/attention/multi_head/query_projection/MatMul_output_0_DequantizeLinear_Output"
    assert plots.bars([name, "b"], [1.0, 2.0], tmp_path / "p.png", "per tensor", "SQNR (dB)")
    pixels = matplotlib.image.imread(str(tmp_path / "p.png"))
    ink = np.where((pixels[..., :3].sum(-1) < 2.5).any(axis=0))[0]
    assert ink.min() > 2 and ink.max() < pixels.shape[1] - 3  # nothing drawn against the left or right edge


def test_layer_comparison_progress_counts_samples(tmp_path: Path, int8pipe_log: pytest.LogCaptureFixture) -> None:
    """The per-layer comparison ran for minutes without a line on a large network: it counts samples
    towards layer_samples, and stops there even when the data holds more."""
    from pipeline.analysis import layers
    from pipeline.transforms.quantization import QuantizeOptions, quantize

    fp32 = build("conv_relu_gemm")
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).normal(size=(10, 2, 4, 4)).astype(np.float32)
    ranges = calibrate(tmp_path / "m.onnx", lambda: [{"x": x}], "minmax").ranges
    int8 = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
    int8pipe_log.clear()
    layers.layer_errors(fp32, int8, lambda: ({"x": x[i : i + 3]} for i in range(0, 10, 3)), 8, False, chunk=2)
    lines = [r.getMessage() for r in int8pipe_log.records if r.getMessage().startswith("validate: comparing layers")]
    count = re.compile(r"validate: comparing layers: (\d+)/8 samples \(")
    counts = [int(m.group(1)) for m in map(count.match, lines) if m]
    assert counts and counts == sorted(counts) and counts[-1] == 8, lines
    assert lines[-1].startswith("validate: comparing layers: done, 8 samples in"), lines


def test_tradeoff_plot_counts_nodes_in_integers_and_marks_recovered_trials() -> None:
    plt = plots._pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig = plots.tradeoff_figure(
        plt, ["mse", "entropy", "minmax"], [49.0, 50.0, 50.0], [0.01, 0.03, 0.02], [True, False, False], [1, 0, 0]
    )
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["as quantized", "after recovery"]
    assert [a.get_text() for a in ax.texts] == ["mse (1 kept float)", "entropy", "minmax"]
    plt.close(fig)
