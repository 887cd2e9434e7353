"""Hostile and odd input (fault report, issue 9): each ends in a clear error or simply works.

Real parts throughout: ONNX models built in code (tests/models), ONNX Runtime sessions, the CLI
in-process against a sqlite MLflow store, subprocesses where memory is measured.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from pipeline.calibration import methods
from pipeline.calibration.calibrator import calibrate
from pipeline.calibration.collect import expose
from pipeline.errors import CalibrationError, ConfigError, DataError, ModelError
from pipeline.execution import runtime
from pipeline.graph import model as onnx_model
from pipeline.graph.subgraphs import control_flow_report
from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import load_config as load
from pipeline.sources import data
from pipeline.sources.spec import DataSource
from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize, quantized_activations
from tests.conftest import ROOT, npz_pipeline, run_args, run_pipeline
from tests.models import build


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float activation tensor of ``model`` on ``feeds``, computed by ONNX Runtime."""
    names = onnx_model.activation_tensors(model)
    return dict(zip(names, runtime.session(expose(model, names)).run(names, feeds)))


# 1. billion laughs ---------------------------------------------------------------------------------


def laughs(indent: str) -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) strings once expanded."""
    lines = [f"{indent}a: &a [{', '.join(['lol'] * 9)}]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_yaml_is_refused_fast(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (digits_copy / "pipeline.yaml").read_text()
    bomb = '  calibration:\n    python: "digits_source:batches"\n    args:\n' + laughs("      ")
    path = digits_copy / "pipeline.yaml"
    path.write_text(
        text.replace("  calibration:\n    npz: data/calibration.npz    # the training split\n    limit: 512\n", bomb)
    )
    assert "&i" in path.read_text()
    start = time.perf_counter()
    code, err = run_cli(["run", str(path), "--tracking-uri", tracking_uri], capsys)
    assert time.perf_counter() - start < 2.0
    assert code == 2 and "Traceback" not in err
    assert "excessive aliasing" in err and str(path) in err
    assert not (digits_copy / "mlflow.db").exists()


def test_billion_laughs_in_a_set_override_is_refused(digits_copy: Path) -> None:
    args = "{" + ", ".join(line.strip() for line in laughs("").splitlines()) + "}"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"--set 'data.calibration=.*excessive aliasing"):
        load(digits_copy / "pipeline.yaml", [f'data.calibration={{python: "digits_source:batches", args: {args}}}'])
    assert time.perf_counter() - start < 2.0


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nmodel: &m {onnx: [*m]}\n")
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load(path)


def test_yaml_with_a_few_anchors_still_loads(digits_copy: Path) -> None:
    path = digits_copy / "pipeline.yaml"
    path.write_text(
        "name: digits-int8\n"
        "model: {onnx: model.onnx}\n"
        "data:\n"
        "  calibration: &cal {npz: data/calibration.npz, limit: 64}\n"
        "  validation: {<<: *cal, npz: data/validation.npz}\n"
        "steps:\n"
        "  export: {}\n"
        "  calibrate: {method: minmax, batch_size: &bs 16}\n"
        "  quantize: {}\n"
        "  validate: {batch_size: *bs}\n"
    )
    cfg = load(path)
    assert cfg.data.calibration is not None and cfg.data.validation is not None
    assert cfg.data.validation.limit == 64 and cfg.data.validation.npz == str(digits_copy / "data" / "validation.npz")
    assert cfg.steps["calibrate"].batch_size == 16 and cfg.steps["validate"].batch_size == 16


# 2. a python: source next to a file named like a library -------------------------------------------

LAZY_STDLIB = ["colorsys", "tabnanny", "netrc", "pyclbr", "sched", "wave", "fileinput", "mailbox"]


def test_python_source_leaves_sys_path_alone_and_shadows_nothing(tmp_path: Path) -> None:
    """The YAML folder holds the data module, helpers it imports (at its top level and lazily), and
    a file named like a standard library module imported only later in the run: that later import
    must get the library."""
    shadowed = next(n for n in LAZY_STDLIB if n not in sys.modules)
    marker = tmp_path / "shadow-imported"
    (tmp_path / f"{shadowed}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    helper, lazy = f"helper_{uuid.uuid4().hex}", f"lazy_{uuid.uuid4().hex}"
    module = f"source_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("SHAPE = (4, 3)\n")
    (tmp_path / f"{lazy}.py").write_text("OFFSET = 10.0\n")
    (tmp_path / f"{module}.py").write_text(
        f"import numpy as np\nfrom {helper} import SHAPE\n\n"
        "def batches(n):\n"
        f"    from {lazy} import OFFSET  # a sibling imported lazily, after import_object returned\n"
        "    for i in range(n):\n"
        "        yield {'x': np.full(SHAPE, OFFSET + i, np.float32)}\n"
    )
    specs: data.Specs = {"x": (["batch", 3], np.dtype(np.float32))}
    before = list(sys.path)
    try:
        got = list(data.batches(DataSource(python=f"{module}:batches", args={"n": 3}), 4, specs, [tmp_path], "data"))
        assert [float(b["x"][0, 0]) for b in got] == [10.0, 11.0, 12.0]
        assert sys.path == before
        library = importlib.import_module(shadowed)  # a library imported lazily, after the source
        assert Path(library.__file__ or "").parent != tmp_path
        assert not marker.exists()
    finally:
        if marker.exists():  # the old behaviour: drop the shadow so no other test sees it
            sys.modules.pop(shadowed, None)
        sys.path[:] = before


# 3. npz / npy files that are not what they claim ----------------------------------------------------


def _object_npz(path: Path) -> None:
    ragged = np.empty(2, dtype=object)  # samples of two sizes, as a list of arrays saves
    ragged[0], ragged[1] = np.zeros((1, 16, 16), np.float32), np.zeros((1, 8, 8), np.float32)
    np.savez(path, input=ragged)


def _pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"input": [1, 2, 3]}))


def _npy_as_npz(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 1, 16, 16), np.float32))


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (_object_npz, "array 'input' holds Python objects"),
        (_pickle, "is not an .npz archive"),
        (_npy_as_npz, "is a single .npy array"),
    ],
)
def test_bad_npz_files_are_data_errors(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], write, expected: str
) -> None:  # type: ignore[no-untyped-def]
    bad = digits_copy / "data" / "calibration.npz"
    write(bad)
    code, err = run_cli(run_args(digits_copy / "pipeline.yaml", tracking_uri, tmp_path / "s.json"), capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert expected in err and str(bad) in err and "np.savez" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"PK\x03\x04 truncated zip", "is not a readable .npz archive"),
        (b"", "is not an .npz archive"),
        (b"just some text\n", "is not an .npz archive"),
    ],
)
def test_corrupt_npz_bytes_are_data_errors(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    specs: data.Specs = {"x": (["batch", 3], np.dtype(np.float32))}
    with pytest.raises(DataError, match=expected) as info:
        list(data.batches(DataSource(npz=str(path)), 4, specs, [], "data.calibration"))
    assert str(path) in str(info.value)


def test_scalar_npz_member_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.float32(1.0))
    specs: data.Specs = {"x": (["batch", 3], np.dtype(np.float32))}
    with pytest.raises(DataError, match=r"array 'x' is a single value"):
        list(data.batches(DataSource(npz=str(path)), 4, specs, [], "data.calibration"))


@pytest.mark.parametrize("kind", ["object", "npz", "text"])
def test_bad_npy_files_are_data_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.npy"
    if kind == "object":
        np.save(path, np.array([None, 1], dtype=object), allow_pickle=True)
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, x=np.zeros((2, 3), np.float32))
    else:
        path.write_text("1 2 3\n")
    specs: data.Specs = {"x": (["batch", 3], np.dtype(np.float32))}
    with pytest.raises(DataError, match="np.save") as info:
        list(data.batches(DataSource(npy={"x": str(path)}), 4, specs, [], "data.calibration"))
    assert str(path) in str(info.value) and "'x'" in str(info.value)


# 4. benchmark of a model with symbolic height and width --------------------------------------------


def _dynamic_hw_pipeline(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    cal, val = (rng.normal(size=(n, 3, 12, 10)).astype(np.float32) for n in (16, 6))
    steps = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {},
        "benchmark": {"batch_sizes": [1, 4], "iterations": 3, "warmup": 1},
    }
    return npz_pipeline(folder, build("dynamic_hw_conv"), {"x": cal}, {"x": val}, steps, name="dynamic-hw")


def _benchmark_report(tracking_uri: str, summary: dict, dst: Path) -> dict:
    run_id = summary["steps"]["benchmark"]
    local = MlflowClient(tracking_uri).download_artifacts(run_id, "benchmark/report.json", str(dst))
    return json.loads(Path(local).read_text())


@pytest.mark.slow
def test_benchmark_takes_image_size_from_the_data_or_shapes(tmp_path: Path, tracking_uri: str) -> None:
    config = _dynamic_hw_pipeline(tmp_path / "p")
    summary = run_pipeline(config, tracking_uri, tmp_path)
    report = _benchmark_report(tracking_uri, summary, tmp_path / "a")
    assert report["inputs"] == {"x": {"shape": ["batch", 3, 12, 10], "from": "data.validation"}}
    rows = report["providers"]["cpu"]["results"]
    assert {(r["batch_size"], tuple(r["shapes"]["x"])) for r in rows} == {(1, (1, 3, 12, 10)), (4, (4, 3, 12, 10))}

    summary = run_pipeline(config, tracking_uri, tmp_path, "steps.benchmark.shapes={x: [1, 3, 20, 24]}")
    report = _benchmark_report(tracking_uri, summary, tmp_path / "b")
    assert report["inputs"] == {"x": {"shape": ["batch", 3, 20, 24], "from": "steps.benchmark.shapes"}}
    rows = report["providers"]["cpu"]["results"]
    assert {(r["batch_size"], tuple(r["shapes"]["x"])) for r in rows} == {(1, (1, 3, 20, 24)), (4, (4, 3, 20, 24))}


def test_benchmark_shapes_that_cannot_be_resolved_are_config_errors() -> None:
    from steps.benchmark import benchmark_feeds, input_shapes

    specs = onnx_model.input_specs(build("dynamic_hw_conv"))
    with pytest.raises(ConfigError, match=r"input 'x'.*steps\.benchmark\.shapes"):
        input_shapes(specs, {}, None, None)
    with pytest.raises(ConfigError, match=r"steps\.benchmark\.shapes\.x: \[3, 8, 8\] does not fit"):
        input_shapes(specs, {"x": [3, 8, 8]}, None, None)
    with pytest.raises(ConfigError, match=r"steps\.benchmark\.shapes\.y: the model has no input 'y'"):
        input_shapes(specs, {"y": [1, 3, 8, 8]}, None, None)
    shapes = input_shapes(specs, {"x": [1, 3, 8, 6]}, None, None)
    assert benchmark_feeds(specs, shapes, 5)["x"].shape == (5, 3, 8, 6)
    fixed = onnx_model.input_specs(build("conv_relu_gemm"))  # every dim but the batch fixed: no data needed
    assert input_shapes(fixed, {}, None, None) == {"x": ([2, 4, 4], "model")}
    sample = {"x": np.arange(3 * 32, dtype=np.float32).reshape(3, 2, 4, 4)}
    feeds = benchmark_feeds(fixed, input_shapes(fixed, {}, sample, "data.validation"), 8, sample)
    assert feeds["x"].shape == (8, 2, 4, 4) and np.array_equal(feeds["x"][3:6], sample["x"])  # real values


# 5. calibration when the only histogrammed tensor is a graph input ---------------------------------


@pytest.mark.parametrize("passes", [1, 2])
def test_calibrate_single_matmul_histograms_its_input(tmp_path: Path, passes: int) -> None:
    model = build("single_matmul")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4096, 4)).astype(np.float32)
    x[:4] *= 12.0  # a few outliers: the entropy threshold clips them
    histogram_tensors = quantized_activations(model, "tensorrt")
    assert histogram_tensors == ["x"]
    cal = calibrate(
        path,
        lambda: iter([{"x": x[:1000]}, {"x": x[1000:]}]),
        "entropy",
        passes=passes,
        minmax_inputs=False,
        histogram_tensors=histogram_tensors,
    )
    r = cal.ranges.tensors["x"]
    assert (r.min, r.max) == (float(x.min()), float(x.max()))
    maxabs = float(np.abs(x).max())
    assert r.method == "entropy" and r.minmax_amax == maxabs
    assert 0 < r.amax < 0.9 * maxabs  # a real threshold, not the max
    if passes == 2:  # exactly TensorRT's histogram over [0, max |x|]
        counts, _ = np.histogram(np.abs(x), bins=2048, range=(0.0, maxabs))
        assert r.amax == pytest.approx(methods.entropy_amax(counts, maxabs / 2048), rel=1e-3)
    y = x @ onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert cal.ranges.tensors["y"].max == pytest.approx(float(y.max()), rel=1e-5)


# 6. calibration caches: a huge line, millions of tensors -------------------------------------------


@pytest.mark.parametrize("header", ["", "TRT-101401-EntropyCalibration2\n"])
def test_cache_show_of_a_huge_line_quotes_little(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: str
) -> None:
    path = tmp_path / "garbage.cache"
    with open(path, "w") as f:
        f.write(header)
        f.write("x" * (20 << 20))  # 20 MB, no newline
    code, err = run_cli(["cache", "show", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and "xxxxxxxx" in err
    assert len(err) < 500, len(err)
    with pytest.raises(CalibrationError):
        from pipeline.calibration import trt_cache

        trt_cache.read(path)


MEMORY_PROBE = """
import sys
from pipeline.orchestration.cli import main
from pipeline.calibration import trt_cache  # imported before the baseline: only the work is measured

def peak_rss():  # this process's own high-water mark (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

before = peak_rss()
with open(sys.argv[2], "w") as out:
    sys.stdout = out
    code = main(["cache", "show", sys.argv[1], "--json"])
    sys.stdout = sys.__stdout__
print(code, peak_rss() - before)
"""


@pytest.mark.slow  # peak memory of subprocesses, measured
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc/self/status")
def test_cache_show_json_streams(tmp_path: Path) -> None:
    """300,000 tensors: 15 MB of cache, 27 MB of JSON. Building the dict and the string took ~400 MB
    more than an idle interpreter; streamed, the peak grows by well under a megabyte. The bound is the
    cache's own size: no copy of the whole content, in any form, may be held."""
    path = tmp_path / "big.cache"
    n = 300_000
    with open(path, "w") as f:
        f.write("TRT-101401-EntropyCalibration2\n")
        for i in range(n):
            f.write(f"/model/block_{i // 100}/conv_{i % 100}/Conv_output_0: {'0' if i == 7 else '3c010a14'}\n")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    code, grown = (int(v) for v in proc.stdout.split())
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["version"] == "10.14.1" and doc["algorithm"] == "EntropyCalibration2"
    assert len(doc["tensors"]) == n
    assert doc["tensors"]["/model/block_0/conv_7/Conv_output_0"] == {"scale": None, "amax": None}
    assert doc["tensors"]["/model/block_0/conv_1/Conv_output_0"]["amax"] == pytest.approx(1.00024, rel=1e-5)
    assert grown < path.stat().st_size, f"peak RSS grew by {grown / 1e6:.1f} MB"


# 7. per-channel quantization of a Gemm whose bias is [1, N] ----------------------------------------


@pytest.mark.parametrize(
    ("target", "activations"), [("tensorrt", "symmetric"), ("onnxruntime", "symmetric"), ("onnxruntime", "asymmetric")]
)
def test_int32_input_classifier_quantizes_per_channel(tmp_path: Path, target: str, activations: str) -> None:
    model = build("int32_gemm_classifier")
    ids = np.random.default_rng(4).integers(0, 16, size=(32, 8)).astype(np.int32)
    values = measure(model, {"ids": ids})
    amax = {k: float(np.abs(v).max()) for k, v in values.items()}
    observed = {k: (float(v.min()), float(v.max())) for k, v in values.items()}
    qdq = quantize(model, amax, QuantizeOptions(target=target, per_channel=True, activations=activations), observed)
    path = tmp_path / "q.onnx"
    onnx_model.save_checked(qdq, path)  # sorted, then onnx.checker.check_model(full_check=True)
    rows = {r["node"]: r for r in node_table(model, qdq)}
    assert rows["fc"]["precision"] == "int8" and rows["fc"]["weights"] == "per-channel"
    (y,) = runtime.session(path, optimize=target != "tensorrt").run(None, {"ids": ids})
    assert np.abs(y - values["y"]).max() < 0.05 * np.abs(values["y"]).max()
    if target == "tensorrt":  # biases stay float, so weight scales stay max |w| / 127 exactly
        fc = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc"))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
        producer = {o: n for n in qdq.graph.node for o in n.output}
        gemm = next(n for n in qdq.graph.node if n.name == "fc")
        scale = inits[producer[gemm.input[1]].input[1]]  # the weights' DequantizeLinear scale
        np.testing.assert_allclose(scale, np.abs(fc).max(axis=0) / 127, rtol=1e-6)


def test_quantizer_failure_names_the_node_and_the_way_around() -> None:
    """A Gemm bias that differs per row ([2, 5]) is beyond ORT's per-channel bias code: a ModelError
    naming the node and both options, keeping ORT's own words; per_channel: false then works."""
    rng = np.random.default_rng(5)
    fc = rng.normal(size=(6, 5)).astype(np.float32)
    fb = rng.normal(size=(2, 5)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "fc", "fb"], ["y"], name="fc")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [onnx.numpy_helper.from_array(fc, "fc"), onnx.numpy_helper.from_array(fb, "fb")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    amax, observed = {"x": 3.0, "y": 10.0}, {"x": (-3.0, 3.0), "y": (-10.0, 10.0)}
    with pytest.raises(ModelError) as info:
        quantize(model, amax, QuantizeOptions(target="onnxruntime", per_channel=True), observed)
    message = str(info.value)
    assert "node 'fc'" in message and 'exclude.nodes: ["fc"]' in message and "per_channel: false" in message
    assert "ValueError" in message  # ORT's own error text is kept
    quantize(model, amax, QuantizeOptions(target="onnxruntime", per_channel=False), observed)


# 8. computation inside If/Loop subgraphs ------------------------------------------------------------


def test_control_flow_report_counts_the_hidden_nodes() -> None:
    model = build("if_branches")
    x = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    (y,) = runtime.session(model.SerializeToString()).run(None, {"x": x})
    assert y.shape == (3, 2)
    report = control_flow_report(model)
    assert report is not None
    assert "If 'branch' (1 in else_branch, 3 in then_branch)" in report
    assert "hold 4 of the model's 7 nodes" in report and "main graph's 3 node(s)" in report
    assert "stays FP32" in report
    assert control_flow_report(build("conv_relu_gemm")) is None


# 9. integer tensors are not "missing a range" -------------------------------------------------------


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged() -> list[str]:
    handler = Captured()
    logger = logging.getLogger("int8pipe")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_integer_tensors_need_no_range(warnings_logged: list[str]) -> None:
    model = build("gather_shape_matmul")
    ids = np.random.default_rng(7).integers(0, 10, size=(5, 4)).astype(np.int64)
    values = measure(model, {"ids": ids})
    assert set(values) == {"e", "flat", "y"}  # the float tensors: all have a range
    amax = {k: float(np.abs(v).max()) for k, v in values.items()}
    observed = {k: (float(v.min()), float(v.max())) for k, v in values.items()}
    qdq = quantize(model, amax, QuantizeOptions(target="onnxruntime"), observed)
    assert not [m for m in warnings_logged if "stay FP32" in m], warnings_logged
    rows = {r["node"]: r["precision"] for r in node_table(model, qdq)}
    assert rows["mm"] == "int8"
    (y,) = runtime.session(qdq.SerializeToString()).run(None, {"ids": ids})
    assert np.abs(y - values["y"]).max() < 0.05 * np.abs(values["y"]).max()


def test_unranged_warning_lists_what_it_counts(warnings_logged: list[str]) -> None:
    model = build("relu_chain")
    quantize(model, {}, QuantizeOptions(target="onnxruntime"), {})
    (message,) = [m for m in warnings_logged if "stay FP32" in m]
    assert message.startswith("quantize: 10 node(s) stay FP32")
    assert "relu0, relu1, relu2, relu3, relu4, relu5, relu6, relu7 (the first 8 of 10)" in message
    warnings_logged.clear()
    few = {f"a{i}": 1.0 for i in range(8)}  # no range for x (relu0), a8 (relu8, relu9) and y (relu9)
    quantize(model, few, QuantizeOptions(target="onnxruntime"), {k: (-1.0, 1.0) for k in few})
    (message,) = [m for m in warnings_logged if "stay FP32" in m]
    assert message.startswith("quantize: 3 node(s)") and message.endswith("relu0, relu8, relu9")


@pytest.mark.slow
def test_export_says_when_the_network_sits_in_subgraphs(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.orchestration.cli import main

    onnx.save(build("if_branches"), str(tmp_path / "model.onnx"))
    (tmp_path / "p.yaml").write_text("name: flow\nmodel: {onnx: model.onnx}\nsteps: {export: {}}\n")
    assert main(["run", str(tmp_path / "p.yaml"), "--tracking-uri", tracking_uri]) == 0
    err = capsys.readouterr().err
    assert "WARNING export:" in err and "hold 4 of the model's 7 nodes" in err
