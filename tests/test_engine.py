"""The engine step's numerics, on this machine without TensorRT or a GPU: the inspector JSON parser on
layer information TensorRT recorded on GPUs (tests/data/tensorrt/README.md says where each file comes
from), the latency statistics on known arrays and on recorded trtexec timings, the promote speed
requirement, the availability check and the config errors. Building and timing engines is
tests/test_engine_gpu.py; the step's skip path through a real pipeline is tests/test_engine_pipeline.py.
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import log
from pipeline.analysis import engine_layers, latency
from pipeline.analysis.engine_layers import BINDINGS, IO_TENSORS
from pipeline.errors import ConfigError, GateFailed
from pipeline.execution import tensorrt_engine
from pipeline.orchestration.runner import load_config
from steps.context import StepContext
from steps.engine import SPEED_KEY, require_int8_faster
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "tensorrt"


def recorded(name: str) -> Any:
    """A recorded file's JSON (a .gz decompressed first)."""
    path = DATA / name
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())


# --- the inspector JSON, as TensorRT wrote it ---------------------------------------------------------


def test_recorded_qat_engine_layers_and_precisions() -> None:
    """TREx's QAT ResNet-18 on an A100: INT8 convolutions with FP16 residual branches, the Q/DQ
    conversions TensorRT made reformat layers, and the pooling left in FP32 and FP16."""
    info = engine_layers.parse(recorded("resnet18-qat.A100.graph.json"))
    assert info.schema == BINDINGS and info.detailed
    assert info.counts() == {"total": 37, "reformat": 12, "noop": 2, "int8": 21, "fp8": 0, "fp16": 1, "bf16": 0,
                             "fp32": 1, "other": 0}  # fmt: skip
    by_name = {layer.name: layer for layer in info.layers}
    residual = by_name["layer1.0.conv2.weight + QuantizeLinear_32 + Conv_34 + Add_36 + Relu_37"]
    # an INT8 conv whose skip input and output are FP16: it computes in INT8
    assert (residual.precision, residual.inputs, residual.outputs) == ("int8", ("int8", "fp16"), ("fp16",))
    assert residual.onnx_nodes == ("layer1.0.conv2.weight", "QuantizeLinear_32", "Conv_34", "Add_36", "Relu_37")
    assert by_name["MaxPool_12"].precision == "fp32"
    assert by_name["GlobalAveragePool_246"].precision == "fp16"
    quantize = by_name["QuantizeLinear_2"]  # the input's QuantizeLinear became a reformat
    assert (quantize.role, quantize.origin, quantize.onnx_nodes) == ("reformat", "QDQ", ("QuantizeLinear_2",))
    fc = by_name[next(n for n in by_name if n.startswith("fc.weight"))]
    # TensorRT's own shuffles ("(Unnamed Layer* 306) [Shuffle]", "unsqueeze_node_after_...") are no ONNX nodes
    assert fc.onnx_nodes == ("fc.weight", "QuantizeLinear_255", "Gemm_257", "fc.bias")
    assert (fc.precision, fc.outputs) == ("int8", ("fp32",))
    copy_node = next(x for x in info.layers if x.name.startswith("Reformatting CopyNode for Input Tensor 0 to fc"))
    assert copy_node.role == "noop" and copy_node.onnx_nodes == ()  # a copy TensorRT inserted runs no node
    assert [(t.name, t.mode, t.dtype, t.shape) for t in info.io] == [
        ("input.1", "input", "fp32", (32, 3, 224, 224)),
        ("422", "output", "fp32", (32, 1000)),
    ]


def test_recorded_fp16_engine_is_all_fp16() -> None:
    info = engine_layers.parse(recorded("resnet18-fp16.A100.graph.json"))
    counts = info.counts()
    assert (counts["fp16"], counts["int8"], counts["fp32"], counts["reformat"], counts["noop"]) == (23, 0, 0, 2, 11)


def test_node_names_keep_only_the_models_nodes() -> None:
    """With the ONNX model's node names, initializer names in a fused layer's name drop out."""
    info = engine_layers.parse(
        recorded("resnet18-qat.A100.graph.json"), onnx_nodes={"QuantizeLinear_32", "Conv_34", "Add_36", "Relu_37"}
    )
    layer = next(layer for layer in info.layers if "Conv_34" in layer.name)
    assert layer.onnx_nodes == ("QuantizeLinear_32", "Conv_34", "Add_36", "Relu_37")
    assert info.node_precisions()["Conv_34"] == ["int8"]
    assert info.not_int8(["Conv_34", "Gemm_257"]) == ["Gemm_257"]  # not among the given nodes: no layer runs it


def test_pointwise_fusions_are_unwrapped() -> None:
    """TREx's own test input: ``PWN(Clip_13)`` names a node inside a pointwise fusion."""
    info = engine_layers.parse(recorded("mobilenet_v2_residuals.qat.graph.json"))
    first = info.layers[1]
    assert first.name == "features.0.0.weight + QuantizeLinear_7 + Conv_9 + PWN(Clip_13)"
    assert first.onnx_nodes == ("features.0.0.weight", "QuantizeLinear_7", "Conv_9", "Clip_13")
    assert info.counts()["int8"] == 53
    assert engine_layers.name_parts("PWN(PWN(relu_1), add_1)") == ["relu_1", "add_1"]
    assert engine_layers.name_parts("a + b || c") == ["a", "b", "c"]
    assert engine_layers.name_parts("{ForeignNode[/stem/Conv.../head/Gemm]}") == ["/stem/Conv", "/head/Gemm"]


def test_table_has_a_row_per_layer() -> None:
    info = engine_layers.parse(recorded("resnet18-qat.A100.graph.json"))
    rows = info.table()
    assert len(rows) == 37 and rows[1]["precision"] == "int8" and rows[1]["onnx_nodes"].endswith("Conv_9")
    assert set(rows[0]) == {"index", "layer", "type", "role", "precision", "onnx_nodes", "inputs", "outputs",
                            "weights", "origin", "tactic"}  # fmt: skip
    json.dumps(rows)  # an MLflow table: plain values only


def test_tensorrt_11_io_tensors_schema() -> None:
    """TensorRT 11 replaced ``"Bindings"`` (a list of names) by ``"I/O Tensors"`` (objects with Name,
    IOMode, DataType, Dimensions, Location, IsShapeInferenceIO, ProfileInfo), as documented in
    "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"
    (https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html).
    No JSON written by TensorRT 11 was found to record, so this test takes the recorded TensorRT 10-schema
    file and changes only that: ``"Bindings"`` is removed and ``"I/O Tensors"`` written in the documented
    form, each tensor's type and dimensions copied from the recorded layers that read or write it (the
    documented example's values for the rest). ``"Layers"`` is left as recorded."""
    doc = recorded("resnet18-qat.A100.graph.json")
    v11 = copy.deepcopy(doc)
    names = v11.pop("Bindings")
    sides = (("Input", "Inputs"), ("Output", "Outputs"))
    tensors = {t["Name"]: (mode, t) for layer in doc["Layers"] for mode, side in sides for t in layer[side]}
    v11["I/O Tensors"] = [
        {
            "Name": name,
            "IOMode": tensors[name][0],
            "DataType": "Float",
            "Dimensions": tensors[name][1]["Dimensions"],
            "Location": "Device",
            "IsShapeInferenceIO": False,
            "ProfileInfo": [
                {
                    "MinShape": tensors[name][1]["Dimensions"],
                    "OptShape": tensors[name][1]["Dimensions"],
                    "MaxShape": tensors[name][1]["Dimensions"],
                    "Format": "Row major linear FP32 format (kLINEAR)",
                }
            ],
        }
        for name in names
    ]
    old, new = engine_layers.parse(doc), engine_layers.parse(json.dumps(v11))
    assert (old.schema, new.schema) == (BINDINGS, IO_TENSORS)
    assert new.layers == old.layers and new.io == old.io and new.counts() == old.counts()


def test_metadata_names_the_onnx_nodes() -> None:
    """TensorRT 8.6+ lists a layer's ONNX nodes in ``Metadata``. The value below is verbatim what
    TensorRT 10.1 wrote for one ResNet-18 layer (https://github.com/NVIDIA/TensorRT/issues/4020), items
    separated by U+001E; later 10.x releases separate them by U+001F (TREx's parser, trex/parser.py)."""
    metadata = (
        "[ONNX Layer: resnetv15_stage1_conv1_fwd]\u001e[ONNX Layer: resnetv15_stage1_batchnorm1_fwd]\u001e"
        "[ONNX Layer: resnetv15_stage1__plus0]\u001e[ONNX Layer: resnetv15_stage1_activation0]"
    )
    expected = (
        "resnetv15_stage1_conv1_fwd",
        "resnetv15_stage1_batchnorm1_fwd",
        "resnetv15_stage1__plus0",
        "resnetv15_stage1_activation0",
    )
    name = " + ".join(expected)
    assert engine_layers.node_names({"Name": name, "Metadata": metadata}) == expected
    assert engine_layers.node_names({"Name": "fused", "Metadata": metadata.replace("\u001e", "\u001f")}) == expected
    # the first layer of the same engine: a reformat TensorRT inserted, with empty Metadata
    reformat = {
        "Name": "Reformatting CopyNode for Input Tensor 0 to resnetv15_conv0_fwd + resnetv15_batchnorm0_fwd + "
        "resnetv15_relu0_fwd + resnetv15_pool0_fwd",
        "LayerType": "Reformat",
        "Inputs": [
            {
                "Name": "data",
                "Location": "Device",
                "Dimensions": [1, 3, 224, 224],
                "Format/Datatype": "Row major linear FP32",
            }
        ],
        "Outputs": [
            {
                "Name": "Reformatted Input Tensor 0 to resnetv15_conv0_fwd + resnetv15_batchnorm0_fwd + "
                "resnetv15_relu0_fwd + resnetv15_pool0_fwd",
                "Location": "Device",
                "Dimensions": [1, 3, 224, 224],
                "Format/Datatype": "Row major Int8 format",
            }
        ],
        "ParameterType": "Reformat",
        "Origin": "REFORMAT",
        "TacticValue": "0x00000000000003e8",
        "StreamId": 0,
        "Metadata": "",
    }
    info = engine_layers.parse(reformat)  # get_layer_information(i, JSON): one layer
    assert [(x.role, x.onnx_nodes, x.outputs) for x in info.layers] == [("reformat", (), ("int8",))]


def test_layer_names_only() -> None:
    """An engine built without detailed verbosity lists names only (verbatim from the same issue)."""
    doc = {
        "Layers": [
            "Reformatting CopyNode for Input Tensor 0 to resnetv15_conv0_fwd + resnetv15_batchnorm0_fwd + "
            "resnetv15_relu0_fwd + resnetv15_pool0_fwd",
            "resnetv15_conv0_fwd + resnetv15_batchnorm0_fwd + resnetv15_relu0_fwd + resnetv15_pool0_fwd",
        ],
        "Bindings": ["data", "resnetv15_dense0_fwd"],
    }
    info = engine_layers.parse(doc)
    assert not info.detailed and [x.role for x in info.layers] == ["reformat", "compute"]
    assert info.layers[1].precision == "unknown" and info.layers[1].onnx_nodes[0] == "resnetv15_conv0_fwd"
    assert info.counts()["other"] == 1


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("Thirty-two wide channel vectorized row major Int8 format", "int8"),
        ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Row major linear FP32", "fp32"),
        ("Row major linear FP32 format (kLINEAR)", "fp32"),  # TensorRT 11's ProfileInfo Format
        ("Float", "fp32"),  # TensorRT 10's bare data type names (samples/sampleEditableTimingCache/README.md)
        ("Half", "fp16"),
        ("Int8", "int8"),
        ("FP8", "fp8"),
        ("BFloat16", "bf16"),
        ("Int32", "int32"),
        ("", "unknown"),
    ],
)
def test_type_words(text: str, word: str) -> None:
    assert engine_layers.type_of(text) == word


def test_precision_rules() -> None:
    """The rule itself, on type lists (not recorded layers): weights decide; else the narrowest input,
    except in a generated pointwise kernel, where an INT8 input beside a float one is dequantized."""
    assert engine_layers.compute_precision("int8", ["fp16"], ["fp16"]) == "int8"
    assert engine_layers.compute_precision(None, ["int8", "fp16"], ["fp16"]) == "int8"
    assert engine_layers.compute_precision(None, ["int8", "fp16"], ["fp16"], pointwise=True) == "fp16"
    assert engine_layers.compute_precision(None, ["int32", "fp32"], ["fp32"]) == "fp32"  # an index input aside
    assert engine_layers.compute_precision(None, ["int64"], ["int64"]) == "int64"  # shape arithmetic
    assert engine_layers.compute_precision(None, [], ["fp16"]) == "fp16"
    assert engine_layers.compute_precision(None, ["unknown"], []) == "unknown"


def test_not_layer_information_is_an_error() -> None:
    with pytest.raises(ValueError, match="Layers"):
        engine_layers.parse({"Engine": 1})


# --- latency statistics ----------------------------------------------------------------------------------


def test_latency_statistics_of_known_arrays() -> None:
    stats = latency.summarize([[1.0, 2.0, 3.0, 4.0, 5.0], np.array([2.0, 3.0, 4.0, 5.0, 6.0])], batch=8)
    every = np.array([1, 2, 3, 4, 5, 2, 3, 4, 5, 6], dtype=float)
    assert stats.p50_ms == 3.5 and stats.mean_ms == 3.5 and stats.samples == 10
    assert stats.p99_ms == pytest.approx(np.percentile(every, 99)) == pytest.approx(5.91)
    assert stats.iqr_rel == pytest.approx((4.75 - 2.25) / 3.5)
    assert stats.repeat_medians_ms == (3.0, 4.0) and stats.repeat_spread == pytest.approx(1 / 3.5)
    assert stats.throughput == pytest.approx(8 * 1000 / 3.5)
    steady = latency.summarize([[2.0] * 10, [2.0] * 10], batch=1)
    assert (steady.p50_ms, steady.iqr_rel, steady.repeat_spread, steady.throughput) == (2.0, 0.0, 0.0, 500.0)
    assert set(stats.metrics("engine.int8")) == {
        "engine.int8.latency_p50_ms", "engine.int8.latency_p99_ms", "engine.int8.throughput",
        "engine.int8.latency_iqr_rel", "engine.int8.repeat_spread"}  # fmt: skip
    assert latency.speedup(steady, stats) == pytest.approx(2.0 / 3.5)


@pytest.mark.parametrize("bad", [[], [[]], [[1.0, -1.0]], [[1.0, float("nan")]]])
def test_latency_statistics_refuse_what_is_no_timing(bad: list[list[float]]) -> None:
    with pytest.raises(ValueError):
        latency.summarize(bad, batch=1)


def recorded_timing(name: str) -> tuple[latency.LatencyStats, float]:
    """Our statistics of a recorded trtexec --exportTimes file, and trtexec's own median of it."""
    times = [row["latencyMs"] for row in recorded(f"resnet18-{name}.A100.timing.json.gz")]
    summary = recorded(f"resnet18-{name}.A100.profile.metadata.json")["performance_summary"]
    return latency.summarize([times], batch=32), summary["GPU Compute Time"][3]  # min, max, mean, median, p99


def test_recorded_timings_int8_slower_than_fp16() -> None:
    """trtexec's timings of TREx's QAT and FP16 ResNet-18 engines on one A100: our median is trtexec's
    own median of the same inferences, and the INT8 engine is the slower one (0.8826 ms against
    0.8622 ms at batch 32): the case the promote requirement exists for."""
    int8, int8_median = recorded_timing("qat")
    fp16, fp16_median = recorded_timing("fp16")
    assert (int8.p50_ms, fp16.p50_ms) == (int8_median, fp16_median) == (0.882568, 0.862183)
    assert (int8.samples, fp16.samples) == (3614, 3698)
    assert latency.speedup(fp16, int8) == pytest.approx(0.9769, abs=1e-4)
    assert 0 < int8.iqr_rel < 0.01 and int8.repeat_spread == 0.0  # one recorded run: no spread across runs


# --- promote's speed requirement ------------------------------------------------------------------------


def _ctx(tmp_path: Path, report: dict[str, Any] | None) -> StepContext:
    inputs = {}
    if report is not None:
        path = tmp_path / "report.json"
        path.write_text(json.dumps(report))
        inputs["engine_report"] = path
    return StepContext(None, tmp_path, inputs, {}, {}, None)  # type: ignore[arg-type]


def test_promote_refuses_an_int8_engine_slower_than_fp16(tmp_path: Path) -> None:
    int8, _ = recorded_timing("qat")
    fp16, _ = recorded_timing("fp16")
    report = {
        "status": "built",
        "device": "NVIDIA A100 80GB PCIe (sm_80)",
        "tensorrt": "8.4",
        "batch_size": 32,
        "engines": {"int8": {"latency": int8.to_json()}, "fp16": {"latency": fp16.to_json()}},
        "int8_vs_fp16_speedup": latency.speedup(fp16, int8),
    }
    with pytest.raises(GateFailed, match=r"not faster .* p50 0\.883 ms against 0\.862 ms \(0\.98x"):
        require_int8_faster(_ctx(tmp_path, report))
    report["int8_vs_fp16_speedup"] = 1.3
    require_int8_faster(_ctx(tmp_path, report))  # faster: promotion goes on


def test_promote_requirement_is_off_and_says_so_without_an_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log.configure()  # int8pipe's log to stderr, as the CLI sends it
    reason = "tensorrt not importable (no module named 'tensorrt'); no CUDA device (nvidia-smi lists no GPU)"
    require_int8_faster(_ctx(tmp_path, {"status": "skipped", "reason": reason}))
    err = capsys.readouterr().err
    assert f"WARNING promote: {SPEED_KEY} is off for this run" in err and reason in err


# --- availability and configuration -----------------------------------------------------------------------


def test_importing_the_engine_modules_imports_no_backend() -> None:
    code = (
        "import sys, steps.engine, pipeline.execution.tensorrt_engine, pipeline.analysis.engine_layers; "
        "print(sorted(m for m in ('tensorrt', 'torch', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(tensorrt_engine.availability().ok, reason="TensorRT and a GPU are here: nothing to skip")
def test_availability_says_what_is_missing() -> None:
    here = tensorrt_engine.availability()
    assert not here.ok and here.reasons
    assert any(r.startswith((tensorrt_engine.NOT_IMPORTABLE, tensorrt_engine.NO_DEVICE)) for r in here.reasons)


def _config(digits_copy: Path, *overrides: str) -> None:
    load_config(digits_copy / "pipeline.yaml", list(overrides))


def test_engine_needs_a_tensorrt_target(digits_copy: Path) -> None:
    _config(digits_copy, "steps.engine={}")
    with pytest.raises(ConfigError, match="steps.engine builds TensorRT engines.*steps.quantize.target: tensorrt"):
        _config(digits_copy, "steps.engine={}", "steps.quantize.target=onnxruntime")
    with pytest.raises(ConfigError, match="steps.engine: batch_size"):
        _config(digits_copy, "steps.engine={repeats: 0}")


def test_the_speed_requirement_needs_the_engine_step(digits_copy: Path) -> None:
    with pytest.raises(ConfigError, match="require_int8_faster_than_fp16 needs steps.engine"):
        _config(digits_copy, "steps.promote.require_int8_faster_than_fp16=true")
    _config(digits_copy, "steps.promote.require_int8_faster_than_fp16=true", "steps.engine={}")


@pytest.mark.skipif(tensorrt_engine.availability().ok, reason="TensorRT and a GPU are here: gpu_check would measure")
def test_gpu_check_says_why_it_cannot_run_and_exits_non_zero() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gpu_check: cannot run on this machine, nothing was measured: ")
    assert tensorrt_engine.availability().reason in done.stderr
