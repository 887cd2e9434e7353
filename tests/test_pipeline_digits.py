"""The digits pipeline end to end, against a real sqlite MLflow store and real ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from pipeline.calibration import flatbuffers_table, trt_cache
from pipeline.execution import cpu_kernels
from pipeline.orchestration.cli import main
from tests.conftest import DIGITS, run_pipeline

pytestmark = pytest.mark.slow  # the module fixture digits_run runs the whole digits pipeline

STEPS = ["export", "calibrate", "quantize", "validate", "benchmark", "promote"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("digits")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    summary_path = tmp / "s.json"
    code = main(
        [
            "run",
            str(DIGITS / "pipeline.yaml"),
            "--tracking-uri",
            uri,
            "--summary-json",
            str(summary_path),
            "--set",
            "steps.benchmark.iterations=10",
        ]
    )
    assert code == 0
    summary = json.loads(summary_path.read_text())
    client = MlflowClient(uri)
    artifacts = {}
    for step, run_id in summary["steps"].items():
        if step != "promote":
            artifacts[step] = Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp / step), tracking_uri=uri)
            )
    return {"uri": uri, "summary": summary, "client": client, "artifacts": artifacts, "tmp": tmp}


def test_run_tree(digits_run: dict[str, Any]) -> None:
    client, summary = digits_run["client"], digits_run["summary"]
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "digits-int8 (entropy, tensorrt)"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STEPS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["int8pipe.step"] == run.info.run_name
    assert list(summary["steps"]) == STEPS
    assert summary["gate"] == "passed"
    assert parent.data.params["steps.calibrate.method"] == "entropy"
    assert "config/pipeline.resolved.json" in [a.path for a in client.list_artifacts(parent.info.run_id, "config")]


def test_artifacts_and_metrics_follow_design_table(digits_run: dict[str, Any]) -> None:
    art, client, summary = digits_run["artifacts"], digits_run["client"], digits_run["summary"]
    expected = {
        "export": ["model/model.onnx", "model/summary.json"],
        "calibrate": [
            "calibration/ranges.json",
            "calibration/calibration.cache",
            "calibration/calibration.flatbuffers",
            "calibration/ranges_table.json",
            "calibration/histograms.png",
            "calibration/dynamic_ranges.json",
        ],
        "quantize": ["model/model_int8.onnx", "quantize/nodes_table.json"],
        "validate": ["validation/report.json", "validation/layer_errors_table.json", "validation/layer_sqnr.png"],
        "benchmark": ["benchmark/report.json", "benchmark/environment.json", "benchmark/latency.png"],
    }
    for step, files in expected.items():
        for f in files:
            assert (art[step] / f).is_file(), f"{step}: {f} missing"
    metrics = {
        "export": ["num_nodes", "num_params"],
        "calibrate": ["num_samples", "num_tensors", "calibration_seconds"],
        "quantize": ["int8_nodes", "fp_nodes", "size_mb_fp32", "size_mb_int8"],
        "validate": ["fp32_top1", "int8_top1", "accuracy_drop", "cosine_min", "sqnr_db_min"],
        "benchmark": [
            "cpu.fp32.latency_p50_ms",
            "cpu.int8.latency_p50_ms",
            "cpu.fp32.latency_p99_ms",
            "cpu.int8.throughput",
            "cpu.speedup",
            "cpu.int8.bs8.latency_p50_ms",
        ],
    }
    for step, names in metrics.items():
        got = client.get_run(summary["steps"][step]).data.metrics
        for name in names:
            assert name in got, f"{step}: metric {name} missing"
    parent = client.get_run(summary["run_id"]).data.metrics
    for starred in [
        "calibration_seconds",
        "size_mb_fp32",
        "size_mb_int8",
        "fp32_top1",
        "int8_top1",
        "accuracy_drop",
        "cpu.fp32.latency_p50_ms",
        "cpu.int8.latency_p50_ms",
        "cpu.speedup",
    ]:
        assert starred in parent, f"parent run lacks {starred}"
    assert parent["calibration_seconds"] == summary["metrics"]["calibration_seconds"]


def test_export_folds_batchnorm_and_makes_batch_dynamic(digits_run: dict[str, Any]) -> None:
    source = onnx.load(str(DIGITS / "model.onnx"))
    assert any(n.op_type == "BatchNormalization" for n in source.graph.node)  # shipped unfolded
    prepared = onnx.load(str(digits_run["artifacts"]["export"] / "model/model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in prepared.graph.node)
    assert prepared.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    summary = json.loads((digits_run["artifacts"]["export"] / "model/summary.json").read_text())
    assert summary["source_op_counts"]["BatchNormalization"] == 6 and "BatchNormalization" not in summary["op_counts"]


def test_cache_and_flatbuffers_decode_to_ranges(digits_run: dict[str, Any]) -> None:
    cal = digits_run["artifacts"]["calibrate"] / "calibration"
    ranges = json.loads((cal / "ranges.json").read_text())
    assert ranges["method"] == "entropy" and ranges["num_samples"] == 512
    assert len(ranges["model_sha256"]) == 64 and ranges["data_digest"] and ranges["environment"]["onnxruntime"]
    lines = (cal / "calibration.cache").read_text().splitlines()
    assert lines[0] == "TRT-101401-EntropyCalibration2"
    decoded = {}
    for line in lines[1:]:
        name, _, hex8 = line.rpartition(": ")
        decoded[name] = int(hex8, 16)
    assert set(decoded) == set(ranges["tensors"])
    for name, t in ranges["tensors"].items():
        scale = np.frombuffer(decoded[name].to_bytes(4, "big"), dtype=">f4")[0]
        assert float(scale) * 127 == pytest.approx(t["amax"], rel=1e-6), name
        assert t["amax"] <= t["minmax_amax"] + 1e-9
    table = flatbuffers_table.read(cal / "calibration.flatbuffers")
    assert table == pytest.approx({k: v["amax"] for k, v in ranges["tensors"].items()})
    assert trt_cache.read(cal / "calibration.cache").algorithm == "EntropyCalibration2"
    # the real net has tensors whose entropy threshold clips their outliers
    assert sum(t["amax"] < 0.9 * t["minmax_amax"] for t in ranges["tensors"].values()) >= 1


def test_qdq_model_structure(digits_run: dict[str, Any]) -> None:
    qdq = onnx.load(str(digits_run["artifacts"]["quantize"] / "model/model_int8.onnx"))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}
    compute = [n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == 7
    assert digits_run["summary"]["metrics"]["int8_nodes"] == 7  # the 6 Conv and the Gemm
    table = json.loads((digits_run["artifacts"]["quantize"] / "quantize/nodes_table.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    # the residual Adds: their skip input shares the Conv input's DequantizeLinear, the other is float
    assert [r["precision"] for r in rows if r["op_type"] == "Add"] == ["partial", "partial"]
    for node in compute:
        assert producer[node.input[0]].op_type == "DequantizeLinear", node.name
        dq_w = producer[node.input[1]]
        assert dq_w.op_type == "DequantizeLinear"
        scale = onnx.numpy_helper.to_array(inits[dq_w.input[1]])
        assert scale.ndim == 1 and scale.size > 1  # per output channel
        if len(node.input) > 2:
            # a float bias, in the layer's FP16 (target tensorrt's default float regions)
            assert node.input[2] in inits and inits[node.input[2]].data_type == onnx.TensorProto.FLOAT16


def test_accuracy_and_registry(digits_run: dict[str, Any]) -> None:
    summary, client = digits_run["summary"], digits_run["client"]
    m = summary["metrics"]
    assert m["fp32_top1"] > 0.97
    assert m["accuracy_drop"] <= 0.01 and m["int8_top1"] > 0.96
    reg = summary["registered_model"]
    assert reg["name"] == "digits-int8" and reg["alias"] == "candidate"
    version = client.get_model_version_by_alias("digits-int8", "candidate")
    assert str(version.version) == reg["version"]
    assert version.tags["int8pipe.calibration_method"] == "entropy"
    assert f"calibrate `{summary['steps']['calibrate']}`" in version.description
    assert "accuracy drop" in version.description
    mlflow.set_tracking_uri(digits_run["uri"])
    model = mlflow.pyfunc.load_model("models:/digits-int8@candidate")
    x = np.load(DIGITS / "data/validation.npz")["input"][:4]
    out = model.predict(x)
    logits = out["logits"] if isinstance(out, dict) else np.asarray(out)
    assert np.asarray(logits).shape == (4, 10)


def test_second_identical_run_reuses(digits_run: dict[str, Any]) -> None:
    uri, client = digits_run["uri"], digits_run["client"]
    s2 = digits_run["tmp"] / "s2.json"
    assert (
        main(
            [
                "run",
                str(DIGITS / "pipeline.yaml"),
                "--tracking-uri",
                uri,
                "--summary-json",
                str(s2),
                "--set",
                "steps.benchmark.iterations=10",
            ]
        )
        == 0
    )
    second = json.loads(s2.read_text())
    first = digits_run["summary"]
    export = client.get_run(second["steps"]["export"])
    assert export.data.tags["int8pipe.reused"] == "true"
    assert export.data.tags["int8pipe.reused_from"] == first["steps"]["export"]
    assert client.get_run(second["steps"]["promote"]).data.tags.get("int8pipe.reused") is None
    # promote ran again, and found the same model passing the same gate: its version, not a copy
    assert second["registered_model"]["version"] == first["registered_model"]["version"]
    assert second["metrics"]["accuracy_drop"] == first["metrics"]["accuracy_drop"]


def test_onnxruntime_target_uses_asymmetric_uint8_activations(tmp_path: Path) -> None:
    """target: onnxruntime quantizes activations to uint8 over their observed range (ORT's own default),
    validates through ORT's int8 kernels, and its per-layer errors read the values consumers see."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["steps.quantize.target=onnxruntime", "steps.benchmark.iterations=5", "steps.promote.alias=null"]
    summary = run_pipeline(DIGITS / "pipeline.yaml", uri, tmp_path, *overrides)
    m = summary["metrics"]
    assert m["accuracy_drop"] <= 0.01
    folder = Path(mlflow.artifacts.download_artifacts(run_id=summary["steps"]["quantize"], tracking_uri=uri))
    qdq = onnx.load(str(folder / "model/model_int8.onnx"))
    inits = {i.name: i for i in qdq.graph.initializer}
    zero_points = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)
    assert any(onnx.numpy_helper.to_array(z) != 0 for z in zero_points)  # signed tensors get a real zero point
    report = mlflow.artifacts.download_artifacts(
        run_id=summary["steps"]["validate"], artifact_path="validation/report.json", tracking_uri=uri
    )
    report_json = json.loads(Path(report).read_text())
    layers = report_json["layers"]
    assert {r["int8_value"] for r in layers} == {"dequantized", "float"}
    assert min(r["sqnr_db"] for r in layers) > 10  # no layer compared against a renamed, unclipped tensor
    # the default fleet (every CPU): weights ORT's kernels cannot saturate, so this CPU's kernels
    # compute the exact arithmetic, whatever its ISA, and the gate reads the kernels
    w = next(inits[n.input[0]] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
             and len(inits[n.input[0]].dims) == 4)  # fmt: skip
    assert w.data_type == onnx.TensorProto.INT8 and np.abs(onnx.numpy_helper.to_array(w).astype(int)).max() == 64
    assert m["int8_top1_exact"] == m["int8_top1_kernels"] == m["int8_top1"]
    assert m["kernel_departing_layers"] == 0 and report_json["kernel_fidelity"]["gated_on"] == "kernels"
    client = MlflowClient(uri)
    cap = cpu_kernels.this_machine()
    for step in ("validate", "benchmark"):
        tags = client.get_run(summary["steps"][step]).data.tags
        assert tags["int8pipe.cpu.isa"] == cap["isa"] and tags["int8pipe.onnxruntime"] == cap["onnxruntime"]
    version = client.get_model_version(summary["registered_model"]["name"], summary["registered_model"]["version"])
    assert f"**Validated on** {cpu_kernels.describe(cap)}; INT8 numerics kernels" in version.description
    fleet = next(line for line in version.description.splitlines() if line.startswith("- **CPU fleet**"))
    assert fleet.startswith(f"- **CPU fleet** all, weight scheme {cpu_kernels.PORTABLE}:")
    assert "on every CPU of the fleet" in fleet
    # served by ORT's CPU kernels: the logged model declares that provider, so loading it warns of no CUDA
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
    assert info.flavors["onnx"]["providers"] == ["CPUExecutionProvider"]


def test_a_vnni_only_fleet_gets_full_8_bit_weights_and_says_so(tmp_path: Path) -> None:
    """Where every CPU of the fleet sums in int32 the weights keep 8 bits; a CPU that saturates them
    (this one, if it has no VNNI) is then no witness: the gate reads the exact arithmetic."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["steps.quantize.target=onnxruntime", "steps.quantize.cpu_fleet=[avx512_vnni, amx_int8]",
                 "steps.promote.alias=null"]  # fmt: skip
    summary = run_pipeline(DIGITS / "pipeline.yaml", uri, tmp_path, *overrides, "steps.benchmark.iterations=5")
    client = MlflowClient(uri)
    saturates = cpu_kernels.this_machine()["u8s8_saturates"]
    tags = client.get_run(summary["steps"]["validate"]).data.tags
    assert tags["int8pipe.int8_numerics"] == ("exact" if saturates else "kernels")
    m = summary["metrics"]
    assert m["int8_top1"] == (m["int8_top1_exact"] if saturates else m["int8_top1_kernels"])
    # on a CPU that saturates the kernels depart from the first Conv on (the stem sees the whole input range)
    assert (m["kernel_departing_layers"] > 0) is saturates
    if saturates:
        folder = mlflow.artifacts.download_artifacts(run_id=summary["steps"]["validate"], tracking_uri=uri)
        fidelity = json.loads((Path(folder) / "validation/report.json").read_text())["kernel_fidelity"]
        assert fidelity["gated_on"] == "exact" and fidelity["departing"][0] == "/features/features.0/Conv"
        table = json.loads((Path(folder) / "validation/kernel_fidelity_table.json").read_text())
        assert len(table["data"]) >= 9 and "share_off_by_more_than_1_lsb" in table["columns"]
    assert m["accuracy_drop"] <= 0.01
    version = client.get_model_version(summary["registered_model"]["name"], summary["registered_model"]["version"])
    fleet = next(line for line in version.description.splitlines() if line.startswith("- **CPU fleet**"))
    assert ", weight scheme int8:" in fleet and "do not serve it there" in fleet
    assert ("Validated only on int32 (VNNI-class)" in fleet) is not saturates


def test_placement_note_names_why_tensorrt_placed_int8_is_slow_on_ort_cpu() -> None:
    from steps.benchmark import placement_note

    note = placement_note("cpu", "tensorrt", 0.25)
    assert note is not None and "0.25x" in note and "target: onnxruntime" in note
    assert placement_note("cpu", "tensorrt", 1.3) is None  # faster: nothing to explain
    assert placement_note("cpu", "onnxruntime", 0.8) is None  # ORT's own placement: not this cause
    assert placement_note("cuda", "tensorrt", 0.8) is None
    assert placement_note("cpu", None, 0.8) is None  # dynamic mode: no placement


def test_benchmark_report_explains_a_slow_int8_model(digits_run: dict[str, Any]) -> None:
    """Whichever way this machine's timing fell, the report's note and warning follow the speedup."""
    report = json.loads((digits_run["artifacts"]["benchmark"] / "benchmark/report.json").read_text())
    cpu = report["providers"]["cpu"]
    speedup = digits_run["client"].get_run(digits_run["summary"]["steps"]["benchmark"]).data.metrics["cpu.speedup"]
    assert ("note" in cpu) is (speedup < 1.0)
    if speedup < 1.0:
        assert "target: tensorrt places Q/DQ on layer inputs only" in cpu["note"]


def test_the_public_recipe_builds_what_the_step_shipped(digits_run: dict[str, Any]) -> None:
    """pipeline.transforms.recipe.quantize_static, called outside any pipeline on the step's inputs (the exported
    model, ranges.json, the calibration samples) gives the quantize step's model, weight for weight:
    what a benchmark measures through it is what ships."""
    from pipeline.calibration.ranges import Ranges
    from pipeline.graph import model as onnx_model
    from pipeline.graph.layout import Layout
    from pipeline.orchestration.runner import load_config as load
    from pipeline.sources import data
    from pipeline.transforms import recipe, roles

    cfg = load(DIGITS / "pipeline.yaml", [])
    art = digits_run["artifacts"]
    fp32 = onnx.load(str(art["export"] / "model/model.onnx"))
    ranges = Ranges.read(art["calibrate"] / "calibration/ranges.json")
    src = cfg.data.calibration
    assert src is not None
    specs, dirs = onnx_model.input_specs(fp32), data.search_dirs(cfg.base_dir)
    samples = recipe.Samples(lambda: data.batches(src, cfg.facts.batch_size, specs, dirs, "data.calibration"),
                             Layout.of(src), cfg.facts.memory_mb)  # fmt: skip
    chosen = cfg.steps["quantize"].for_graph(roles.graph_kind(fp32))  # what auto became, as the step decides it
    built = recipe.quantize_static(fp32, ranges, chosen.as_recipe(cfg.facts), samples)
    shipped = onnx.load(str(art["quantize"] / "model/model_int8.onnx"))
    ours = {i.name: onnx.numpy_helper.to_array(i) for i in built.model.graph.initializer}
    theirs = {i.name: onnx.numpy_helper.to_array(i) for i in shipped.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert built.counts["bias_corrected_nodes"] > 0 and built.float_model is None


def test_the_experiment_and_the_pipeline_run_are_model_development(digits_run: dict[str, Any]) -> None:
    """The experiment kind tag (MLflow UIs before 3.17's layout switch read it), and the pipeline run's
    model output: MLflow 3's UI counts a run with one as a training run, without as an evaluation."""
    client, summary = digits_run["client"], digits_run["summary"]
    run = client.get_run(summary["run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    reg = summary["registered_model"]
    version = client.get_model_version(reg["name"], str(reg["version"]))
    model_id = version.model_id or version.source[len("models:/") :]  # the version's source is its logged model
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert client.get_logged_model(model_id).source_run_id == summary["steps"]["promote"]


def test_gate_scores_have_metric_independent_names(digits_run: dict[str, Any]) -> None:
    parent = digits_run["client"].get_run(digits_run["summary"]["run_id"]).data.metrics
    assert parent["gate_fp32"] == parent["fp32_top1"] and parent["gate_int8"] == parent["int8_top1"]
    assert parent["accuracy_drop"] == pytest.approx(parent["gate_fp32"] - parent["gate_int8"])


def test_the_cache_has_a_copy_the_ui_previews(digits_run: dict[str, Any]) -> None:
    folder = digits_run["artifacts"]["calibrate"] / "calibration"
    cache = (folder / "calibration.cache").read_text()
    assert cache.startswith("TRT-") and (folder / "calibration.cache.txt").read_text() == cache


def test_written_models_carry_no_dead_initializers(digits_run: dict[str, Any]) -> None:
    """ORT warns 'Removing initializer ... not used' on every load of a model that has some."""
    for step, path in (("export", "model/model.onnx"), ("quantize", "model/model_int8.onnx")):
        model = onnx.load(str(digits_run["artifacts"][step] / path))
        used = {i for n in model.graph.node for i in n.input}
        assert [i.name for i in model.graph.initializer if i.name not in used] == [], step


def test_the_pipeline_run_links_its_registered_version(digits_run: dict[str, Any]) -> None:
    summary = digits_run["summary"]
    tags = digits_run["client"].get_run(summary["run_id"]).data.tags
    reg = summary["registered_model"]
    assert tags["int8pipe.registered_version"] == f"models:/{reg['name']}/{reg['version']}"


def test_quantize_records_the_graph_kind_and_what_auto_became(digits_run: dict[str, Any]) -> None:
    tags = digits_run["client"].get_run(digits_run["summary"]["steps"]["quantize"]).data.tags
    assert tags["int8pipe.graph_kind"] == "convolutional"
    assert tags["int8pipe.auto_choices"] == (
        "shift_activations=on, bias_correction=on, smoothing=off, depthwise_scales=on"
    )
