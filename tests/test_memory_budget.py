"""Calibration memory follows a budget in bytes: chunks sized from the activation bytes per sample."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.collect import COPIES, chunk_for
from tests.conftest import ROOT, npz_pipeline


def wide_conv(channels: int = 128) -> onnx.ModelProto:
    """x[N,4,128,128] -> Conv(channels) -> Relu -> GlobalAveragePool: 8 MB of activations per sample."""
    w = np.random.default_rng(0).normal(size=(channels, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 1, 1])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_chunk_for() -> None:
    assert chunk_for(1000, None) == 8 and chunk_for(0, 10) == 8  # no budget or nothing measured
    assert chunk_for(1000, 1000 * COPIES * 3) == 3
    assert chunk_for(1000, 1) == 1  # never below one sample
    assert chunk_for(1, 1 << 30) == 8  # never above the tuned maximum


PROBE = """
import json, sys
import numpy as np
from pipeline.calibration.calibrator import calibrate
model, data, memory_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.load(data)
cal = calibrate(model, lambda: ({"x": x[i : i + 32]} for i in range(0, len(x), 32)), "minmax", memory_mb=memory_mb)
# VmHWM, not ru_maxrss: a child inherits its parent's peak at fork, and pytest's may be large
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"chunk": cal.chunk, "sample_bytes": cal.sample_bytes, "peak": peak,
                  "amax": {k: v.amax for k, v in cal.ranges.tensors.items()}}))
"""


def _probe(model: Path, data: Path, memory_mb: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), str(data), str(memory_mb)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow  # peak memory of subprocesses, measured
def test_budget_bounds_peak_memory_and_keeps_the_ranges(tmp_path: Path) -> None:
    model, data = tmp_path / "wide.onnx", tmp_path / "x.npy"
    onnx.save(wide_conv(), str(model))
    np.save(data, np.random.default_rng(1).normal(size=(64, 4, 128, 128)).astype(np.float32))
    roomy, tight = _probe(model, data, 4096), _probe(model, data, 16)
    per_sample = 4 * 128 * 128 * 4 + 2 * 128 * 128 * 128 * 4  # x, conv output, relu output... as exposed
    assert roomy["chunk"] == 8 and tight["chunk"] == 1
    assert tight["sample_bytes"] <= per_sample  # measured, not guessed: derived Relu is not exposed
    # seven samples fewer per call: at least ~2 buffer sets of 7 x 8 MB less at the peak
    assert roomy["peak"] - tight["peak"] > 2 * 7 * 8 * 2**20, (roomy["peak"], tight["peak"])
    assert roomy["amax"] == tight["amax"]  # chunking changes memory, never results


VALIDATE_PROBE = """
import json, sys
from pipeline.orchestration.cli import main
config, uri, memory_mb, summary = sys.argv[1:5]
code = main(["run", config, "--tracking-uri", uri, "--only", "validate", "--summary-json", summary,
             "--set", f"steps.calibrate.memory_mb={memory_mb}"])
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak": peak}))
"""


@pytest.mark.slow
def test_validation_follows_the_memory_budget_and_scores_the_same(tmp_path: Path) -> None:
    """The validate step sizes its ONNX Runtime calls (scoring and the layer comparison) from one
    sample's activation bytes and steps.calibrate.memory_mb, as calibration does."""
    import yaml

    from pipeline.orchestration.cli import main

    rng = np.random.default_rng(2)
    cal, val = (rng.normal(size=(n, 4, 128, 128)).astype(np.float32) for n in (16, 32))
    steps = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {"bias_correction": False},
        "validate": {
            "metric": "cosine",
            "max_drop": 1.0,
            "batch_size": 16,
            "layer_samples": 8,
            "layer_report": "always",
        },
    }
    path = npz_pipeline(tmp_path, wide_conv(), {"x": cal}, {"x": val}, steps, name="validate-budget")
    # the steps before validate once; then validate alone, each time on a copy of that store
    config, before = yaml.safe_load(path.read_text()), tmp_path / "before.yaml"
    steps_before = {k: v for k, v in config["steps"].items() if k != "validate"}
    before.write_text(yaml.safe_dump({**config, "steps": steps_before}))
    assert main(["run", str(before), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    runs = {}
    for memory_mb in (4096, 16):
        summary, store = tmp_path / f"{memory_mb}.json", tmp_path / f"{memory_mb}.db"
        shutil.copy(tmp_path / "mlflow.db", store)
        out = subprocess.run(
            [sys.executable, "-c", VALIDATE_PROBE, str(path), f"sqlite:///{store}", str(memory_mb), str(summary)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        runs[memory_mb] = {**json.loads(out.stdout.splitlines()[-1]), "log": out.stderr}
        runs[memory_mb]["metrics"] = json.loads(summary.read_text())["metrics"]
    roomy, tight = runs[4096], runs[16]
    assert roomy["code"] == tight["code"] == 0
    assert "8 sample(s) per call while scoring, 2 while comparing layers" in roomy["log"]
    # 6 copies of x, c, r and y (4 + 8 + 8 MB + 512 B) exceed 16 MB: each of the 4 tensors in its own group
    assert "1 sample(s) per call while scoring, 1 while comparing layers in 4 groups of tensors" in tight["log"]
    assert "comparing layers in 4 passes over the data" in tight["log"]
    # 7 samples fewer per scoring call: at least two sets of 7 x 8 MB of activations less at the peak
    assert roomy["peak"] - tight["peak"] > 2 * 7 * 8 * 2**20, (roomy["peak"], tight["peak"])
    for name in ("int8_cosine", "cosine_min", "sqnr_db_min"):  # chunking changes memory, not results
        assert tight["metrics"][name] == pytest.approx(roomy["metrics"][name], rel=1e-6), name


def deep_conv(layers: int = 6, channels: int = 16) -> onnx.ModelProto:
    """x[N,16,128,128] -> (Conv -> Relu) x ``layers``: 1 MB per tensor per sample, 12 MB in all."""
    rng = np.random.default_rng(3)
    nodes, inits, t = [], [], "x"
    for i in range(layers):
        w = rng.normal(scale=0.1, size=(channels, channels, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [t, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        t = f"r{i}"
    shape = ["batch", channels, 128, 128]
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


LAYERS_PROBE = """
import json, sys
import numpy as np, onnx
from pipeline.analysis import layers
from pipeline.calibration.collect import activation_sizes
from pipeline.graph.layout import Layout
fp32, int8, x, budget = onnx.load(sys.argv[1]), onnx.load(sys.argv[2]), np.load(sys.argv[3]), int(sys.argv[4])
groups = layers.tensor_groups(activation_sizes(fp32, {"x": x[:1]}, Layout()), budget) if budget else None
errors = layers.layer_errors(fp32, int8, lambda: ({"x": x[i : i + 1]} for i in range(len(x))), len(x), False,
                             chunk=1, groups=groups)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "groups": len(groups or [0]), "rows": errors.rows,
                  "ranked": [r["node"] for r in errors.candidates]}))
"""


@pytest.mark.slow  # peak memory of subprocesses, measured
def test_layer_comparison_in_groups_bounds_memory_and_measures_the_same(tmp_path: Path) -> None:
    """Comparing every tensor of both models holds all of them for a sample; in groups of tensors, one
    pass over the data per group, only a group's are alive, and every number stays the same."""
    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import QuantizeOptions, quantize

    fp32 = deep_conv()
    x = np.random.default_rng(4).normal(size=(4, 16, 128, 128)).astype(np.float32)
    paths = {name: tmp_path / f"{name}.onnx" for name in ("fp32", "int8")}
    onnx.save(fp32, str(paths["fp32"]))
    cal = calibrate(paths["fp32"], lambda: [{"x": x}], "minmax")
    onnx.save(quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt")), str(paths["int8"]))
    np.save(tmp_path / "x.npy", x)

    def probe(budget: int) -> dict:
        args = [sys.executable, "-c", LAYERS_PROBE, str(paths["fp32"]), str(paths["int8"]), str(tmp_path / "x.npy")]
        out = subprocess.run([*args, str(budget)], capture_output=True, text=True, check=True, cwd=ROOT)
        return json.loads(out.stdout.splitlines()[-1])

    at_once, grouped = probe(0), probe(2 * 2**20)  # two 1 MB tensors per group
    assert grouped["groups"] == 7 and at_once["groups"] == 1  # x and 12 tensors of 1 MB, two per group
    assert grouped["rows"] == at_once["rows"] and grouped["ranked"] == at_once["ranked"]
    assert len(at_once["rows"]) == 13
    # all at once: 12 FP32 tensors and, on the INT8 side, 12 more plus the 6 float values its quantizers
    # read, each inside ONNX Runtime and again as arrays; in groups, at most a sixth of that (and the
    # one-sample measurement of every tensor's size, two sets of 12 MB)
    assert at_once["peak"] - grouped["peak"] > 24 * 2**20, (at_once["peak"], grouped["peak"])
