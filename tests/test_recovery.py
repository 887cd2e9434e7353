"""Accuracy recovery (steps.validate.recover): a model with one layer that INT8 breaks, recovered by
keeping exactly that layer in float; the recovered model is the one handed on; the limits stop it.

Real models, real ONNX Runtime sessions and a real sqlite MLflow store throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from pipeline.analysis import evaluation, layers, recovery, scoring
from pipeline.execution import runtime
from pipeline.graph import model
from pipeline.mlflow_io import registry
from pipeline.orchestration.cli import main
from pipeline.sources import data
from pipeline.transforms.quantization import node_table
from tests.conftest import npz_pipeline, run_args, run_pipeline
from tests.models import build

MAX_DROP = 0.05


def _write_outlier_pipeline(folder: Path) -> Path:
    """outlier_mlp (fc2's input has one channel at ~1000: per-tensor INT8 wipes the rest) with
    minmax calibration, so the gate fails by a wide margin unless fc2 stays float."""
    rng = np.random.default_rng(5)
    cal, val = rng.normal(size=(128, 8)).astype(np.float32), rng.normal(size=(200, 8)).astype(np.float32)
    steps = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {},
        "validate": {"metric": "agreement", "max_drop": MAX_DROP, "batch_size": 64, "recover": {}},
        "benchmark": {"iterations": 5, "warmup": 1, "batch_sizes": [1]},
        "promote": {"registered_model": "outlier-int8"},
    }
    model = build("outlier_mlp")
    return npz_pipeline(folder, model, {"x": cal}, {"x": val}, steps, name="outlier", experiment="outlier")


def _artifacts(run_id: str, uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst), tracking_uri=uri))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("outlier")
    config = _write_outlier_pipeline(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    s = run_pipeline(config, uri, folder)
    art = {
        step: _artifacts(s["steps"][step], uri, folder / "art" / step) for step in ("export", "quantize", "validate")
    }
    return {"folder": folder, "config": config, "uri": uri, "summary": s, "art": art}


@pytest.mark.slow
def test_recovery_keeps_exactly_the_broken_layer_float_and_passes_the_gate(outlier: dict[str, Any]) -> None:
    s, art = outlier["summary"], outlier["art"]
    assert s["gate"] == "passed"
    rec = json.loads((art["validate"] / "validation/recovery.json").read_text())
    assert rec["reverted"] == ["fc2"] and rec["passed"] is True and rec["stopped"] == "gate passed"
    first, last = rec["iterations"]
    assert first["reverted"] == [] and first["metric"] < 0.5  # the quantized model as built: broken
    assert last["reverted"] == ["fc2"] and last["metric"] >= 1.0 - MAX_DROP
    # the drop's standard error over the 200 samples: binary misses p, sample variance n/(n-1) p(1-p)
    p = 1.0 - first["metric"]
    assert first["drop_se"] == pytest.approx(np.sqrt(p * (1 - p) / 199), rel=1e-9)
    assert rec["candidates"][0]["node"] == "fc2"  # ranked first by its measured gain
    assert rec["candidates"][0]["gain"] > 0.5
    assert all(c["gain"] <= 0.02 for c in rec["candidates"][1:])  # the other layers are harmless

    client = MlflowClient(outlier["uri"])
    metrics = client.get_run(s["steps"]["validate"]).data.metrics
    assert metrics["recovered_fp_nodes"] == 1
    assert metrics["int8_agreement"] == last["metric"]  # the step's metrics describe the recovered model
    assert metrics["accuracy_drop"] == pytest.approx(1.0 - last["metric"]) and metrics["accuracy_drop"] <= MAX_DROP
    assert metrics["accuracy_drop_se"] == last["drop_se"]
    assert (metrics["int8_nodes"], metrics["fp_nodes"]) == (2, 2)  # fc2 moved from INT8 to float
    quantized = client.get_run(s["steps"]["quantize"]).data.metrics
    assert (quantized["int8_nodes"], quantized["fp_nodes"]) == (3, 1)
    parent = client.get_run(s["run_id"]).data.metrics
    assert parent["recovered_fp_nodes"] == 1 and parent["accuracy_drop"] == metrics["accuracy_drop"]
    assert (parent["int8_nodes"], parent["fp_nodes"]) == (2, 2)

    history = client.get_metric_history(s["steps"]["validate"], "recovery_agreement")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, first["metric"]),
        (1, last["metric"]),
    ]
    report = json.loads((art["validate"] / "validation/report.json").read_text())
    assert report["recovery"]["reverted"] == ["fc2"] and report["metrics"]["int8_agreement"] == last["metric"]
    assert "fc2" not in [r["node"] for r in report["quantized_nodes"]]  # the recovered model's ranking


@pytest.mark.slow
def test_recovered_model_computes_the_layer_in_float(outlier: dict[str, Any]) -> None:
    art = outlier["art"]
    path = art["validate"] / "model/model_int8.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    recovered = onnx.load(str(path))
    fp32 = onnx.load(str(art["export"] / "model/model.onnx"))
    table = {r["node"]: r["precision"] for r in node_table(fp32, recovered)}
    assert table["fc2"] == "fp32" and table["fc3"] == "int8"
    logged = json.loads((art["validate"] / "validation/nodes_table.json").read_text())
    # reverted to float: FP16 in target tensorrt's default float regions
    assert {r[0]: dict(zip(logged["columns"], r)) for r in logged["data"]}["fc2"]["precision"] == "fp16"
    fc2 = next(n for n in recovered.graph.node if n.name == "fc2")
    producer = {o: n for n in recovered.graph.node for o in n.output}
    inits = {i.name: i for i in recovered.graph.initializer}
    activation, weight = fc2.input
    assert producer[activation].op_type == "Gemm"  # the float output of fc1, no QuantizeLinear/DequantizeLinear
    # the FP32 weights, not INT8 + DequantizeLinear: in FP16, target tensorrt's default float regions
    assert inits[weight].data_type == onnx.TensorProto.FLOAT16
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(inits[weight]),
        onnx.numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "w2")).astype(np.float16),
    )
    # the recovered model scores what recovery.json says, run as validate runs it (Q/DQ exact in float)
    x = np.load(outlier["folder"] / "val.npz")["x"]
    want = runtime.session(art["export"] / "model/model.onnx").run(None, {"x": x})[0]
    got = runtime.session(path, optimize=False).run(None, {"x": x})[0]
    rec = json.loads((art["validate"] / "validation/recovery.json").read_text())
    assert evaluation.score("agreement", got, None, want) == rec["iterations"][-1]["metric"]


@pytest.mark.slow
def test_benchmark_and_promote_receive_the_recovered_model(outlier: dict[str, Any]) -> None:
    s, art, uri = outlier["summary"], outlier["art"], outlier["uri"]
    recovered = model.sha256(art["validate"] / "model/model_int8.onnx")
    assert recovered != model.sha256(art["quantize"] / "model/model_int8.onnx")
    client = MlflowClient(uri)
    version = client.get_model_version("outlier-int8", s["registered_model"]["version"])
    assert registry.facts(version.tags)["int8_sha256"] == recovered  # promote registered the recovered model
    assert "**INT8 model**: 2 INT8 nodes, " in version.description
    mlflow.set_tracking_uri(uri)
    registered = mlflow.onnx.load_model(f"models:/outlier-int8/{version.version}")
    assert {r["node"]: r["precision"] for r in node_table(build("outlier_mlp"), registered)}["fc2"] == "fp32"
    # validate's hand-offs name its own model file, which is what the later steps were given
    outputs = json.loads(client.get_run(s["steps"]["validate"]).data.tags["int8pipe.outputs"])
    assert outputs["int8_model"] == "model/model_int8.onnx"


def _fail(config: Path, uri: str, folder: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[str, Any]:
    summary = folder / "s.json"
    assert main(run_args(config, uri, summary, *overrides)) == 3  # the gate failed
    s = json.loads(summary.read_text())
    assert s["gate"] == "failed" and "promote" not in s["steps"]
    return capsys.readouterr().err, s


@pytest.mark.slow
def test_without_recover_nothing_is_reverted(
    outlier: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err, s = _fail(outlier["config"], outlier["uri"], tmp_path, capsys, "steps.validate.recover=null")
    message = next(line for line in err.splitlines() if line.startswith("int8pipe: "))
    what_ran = message.split(" By what this run measured")[0]  # then what would pass: it may name recover
    assert message.startswith("int8pipe: accuracy gate failed: agreement dropped") and "recover" not in what_ran
    run = MlflowClient(outlier["uri"]).get_run(s["steps"]["validate"])
    assert run.data.metrics["recovered_fp_nodes"] == 0 and "int8_nodes" not in run.data.metrics
    art = _artifacts(run.info.run_id, outlier["uri"], tmp_path / "art")
    assert not (art / "validation/recovery.json").exists() and not (art / "model").exists()


@pytest.mark.slow
def test_max_fp_nodes_zero_stops_before_reverting_and_fails_the_gate(
    outlier: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err, s = _fail(outlier["config"], outlier["uri"], tmp_path, capsys, "steps.validate.recover.max_fp_nodes=0")
    assert "accuracy gate failed after recovery" in err
    assert "steps.validate.recover.max_fp_nodes=0 before reverting any node" in err
    assert 'steps.quantize.exclude.nodes: ["fc2"' in err  # still the worst node by SQNR, ready to paste
    art = _artifacts(s["steps"]["validate"], outlier["uri"], tmp_path / "art")
    rec = json.loads((art / "validation/recovery.json").read_text())
    assert (rec["reverted"], rec["passed"], rec["stopped"], len(rec["iterations"])) == ([], False, "max_fp_nodes", 1)
    assert not (art / "model").exists()  # nothing recovered: quantize's model stays the hand-off
    assert MlflowClient(outlier["uri"]).get_run(s["steps"]["validate"]).data.metrics["recovered_fp_nodes"] == 0


@pytest.mark.slow
def test_time_budget_stops_recovery_on_digits(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Percentile 50 clips half of every activation: top1 collapses; a spent budget stops recovery."""
    overrides = (
        "steps.calibrate.method=percentile",
        "steps.calibrate.percentile=50",
        "steps.validate.recover.time_budget_s=0",
    )
    err, s = _fail(digits_copy / "pipeline.yaml", tracking_uri, tmp_path, capsys, *overrides)
    assert "Recovery stopped at its time budget, steps.validate.recover.time_budget_s=0.0" in err
    art = _artifacts(s["steps"]["validate"], tracking_uri, tmp_path / "art")
    rec = json.loads((art / "validation/recovery.json").read_text())
    assert (rec["reverted"], rec["passed"], rec["stopped"]) == ([], False, "time budget")
    assert rec["iterations"][0]["metric"] < 0.5


@pytest.mark.slow
def test_recover_config_is_checked(outlier: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for override, says in [
        ("steps.validate.recover.max_fp_nodes=-1", "steps.validate.recover.max_fp_nodes: expected >= 0"),
        ("steps.validate.recover.ranking_samples=0", "steps.validate.recover.ranking_samples: expected >= 1"),
        ("steps.validate.recover.sensitivity_samples=0", "steps.validate.recover.sensitivity_samples: expected >= 1"),
        ("steps.validate.recover.budget=3", "unknown key 'budget'"),
    ]:
        assert main(run_args(outlier["config"], outlier["uri"], tmp_path / "s.json", override)) == 2
        assert says in capsys.readouterr().err


# --- the numerics without the pipeline: scorer and recovery on the artifacts of the run above ------


def _scorer(outlier: dict[str, Any], calls: list[int], cache_bytes: int = scoring.INPUT_CACHE_BYTES) -> Any:
    x = np.load(outlier["folder"] / "val.npz")["x"]
    fp32 = outlier["art"]["export"] / "model/model.onnx"

    def batches() -> Any:
        calls.append(1)
        return ({"x": x[i : i + 64]} for i in range(0, len(x), 64))

    metric = scoring.resolve_metric("agreement", None, ["y"], [])
    return scoring.Scorer(fp32, metric, batches, int8_optimize=False, cache_bytes=cache_bytes)


@pytest.mark.slow
def test_scorer_scores_other_int8_models_against_the_cached_reference(outlier: dict[str, Any]) -> None:
    art, calls = outlier["art"], []
    scorer = _scorer(outlier, calls)
    quantized, recovered = art["quantize"] / "model/model_int8.onnx", art["validate"] / "model/model_int8.onnx"
    first = scorer.first(quantized)
    rec = json.loads((art["validate"] / "validation/recovery.json").read_text())
    assert (first.fp32, first.int8, first.samples) == (1.0, rec["iterations"][0]["metric"], 200)
    again = scorer.score(recovered)
    assert again.int8 == rec["iterations"][1]["metric"] and again.fp32 == 1.0
    subset = scorer.score(recovered, limit=50)
    assert subset.samples == 50 and subset.reference["y"].shape == (50, 10)
    assert calls == [1]  # the source was read once: FP32 never ran again, inputs came from the cache
    assert scorer.kept["input.x"].shape == (scoring.SAMPLES, 8)

    streamed_calls: list[int] = []
    streamed = _scorer(outlier, streamed_calls, cache_bytes=0)  # nothing fits: re-read the source
    streamed.first(quantized)
    assert streamed.score(recovered).int8 == again.int8 and streamed_calls == [1, 1]


@pytest.mark.slow
def test_time_budget_is_checked_before_each_evaluation(outlier: dict[str, Any]) -> None:
    """A clock that advances 1 s per reading and a 3 s budget: one candidate is ranked, then the
    budget is spent; nothing is reverted and the unranked candidates say so."""
    art = outlier["art"]
    fp32 = onnx.load(str(art["export"] / "model/model.onnx"))
    qdq = onnx.load(str(art["quantize"] / "model/model_int8.onnx"))
    scorer = _scorer(outlier, [])
    baseline = scorer.first(qdq)
    ranked = layers.layer_errors(fp32, qdq, lambda: scorer.inputs(64), 64, int8_optimize=False).candidates
    assert [r["node"] for r in ranked][0] == "fc2"
    ticks = iter(range(100))
    seen: list[int] = []
    result = recovery.recover(
        qdq,
        fp32,
        scorer,
        baseline,
        ranked,
        MAX_DROP,
        time_budget_s=3,
        on_iteration=lambda k, it: seen.append(k),
        clock=lambda: float(next(ticks)),
    )
    assert (result.stopped, result.reverted, result.passed, result.model) == ("time budget", [], False, None)
    assert [c["gain"] is None for c in result.candidates] == [False, True, True]
    assert seen == [0]

    full = recovery.recover(qdq, fp32, scorer, baseline, ranked, MAX_DROP, max_fp_nodes=1)
    assert (full.stopped, full.reverted) == ("gate passed", ["fc2"])
    assert data.LABELS not in next(scorer.inputs(1))


def test_recovery_hands_on_the_best_model_scored_not_the_last(tmp_path: Path) -> None:
    """Keeping one of two cancelling MatMuls float makes the output worse: with room for one node,
    recovery must hand on the quantized model unchanged; with room for both, the pair."""
    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import QuantizeOptions, quantize
    from tests.models import build

    fp32 = build("cancelling_matmuls")
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(5).normal(size=(128, 8)).astype(np.float32)
    cal = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax")
    qdq = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt", per_channel=False))
    metric = scoring.resolve_metric("cosine", None, ["y"], [])
    scorer = scoring.Scorer(tmp_path / "m.onnx", metric, lambda: iter([{"x": x}]), int8_optimize=False)
    baseline = scorer.first(qdq)
    pair = [{"node": n, "op_type": "MatMul", "added_sqnr_db": 1.0} for n in ("big", "counter")]
    one = recovery.recover(qdq, fp32, scorer, baseline, pair, 0.0, max_fp_nodes=1)
    assert len(one.iterations) == 2 and one.iterations[1].scores.drop > baseline.drop  # the revert hurt
    assert (one.chosen, one.reverted, one.model, one.stopped) == (0, [], None, "max_fp_nodes")
    assert one.scores.int8 == baseline.int8 and one.to_json()["chosen"] == 0
    both = recovery.recover(qdq, fp32, scorer, baseline, pair, 0.0, max_fp_nodes=2)
    assert both.chosen == 2 and sorted(both.reverted) == ["big", "counter"] and both.model is not None
    assert both.scores.drop < baseline.drop


def test_preselection_finds_the_node_whose_error_reaches_the_output(tmp_path: Path) -> None:
    """The node whose own quantization adds the least error (b9, best local SQNR of ten) is the one
    whose error dominates the output; nine nodes with worse local SQNR barely reach it. Ranked by
    added SQNR alone, b9 is tenth and outside the eight candidates; by sensitivity it is first."""
    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import QuantizeOptions, quantize

    fp32 = build("loud_and_quiet_branches")
    onnx.save(fp32, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(5).normal(size=(128, 80)).astype(np.float32)
    cal = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax")
    qdq = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt"))
    metric = scoring.resolve_metric("cosine", None, ["y"], [])
    scorer = scoring.Scorer(tmp_path / "m.onnx", metric, lambda: iter([{"x": x}]), int8_optimize=False)
    baseline = scorer.first(qdq)
    ranked = layers.layer_errors(fp32, qdq, lambda: scorer.inputs(64), 64, int8_optimize=False).candidates
    assert [r["node"] for r in ranked][-1] == "b9" and len(ranked) == 10 > recovery.MIN_CANDIDATES
    max_drop = 1e-4
    assert baseline.drop > 2 * max_drop

    result = recovery.recover(qdq, fp32, scorer, baseline, ranked, max_drop, max_fp_nodes=1)
    assert (result.reverted, result.stopped) == (["b9"], "gate passed")
    assert result.sensitivity_samples == recovery.SENSITIVITY_SAMPLES
    assert len(result.candidates) == recovery.MIN_CANDIDATES
    first, *rest = result.candidates
    assert first["node"] == "b9" and all(first["sensitivity"] > 10 * abs(c["sensitivity"]) for c in rest)
    assert result.scores.drop < max_drop / 10


def test_ranking_counts_a_gain_within_noise_as_a_tie(tmp_path: Path) -> None:
    """On 64 samples a top-1 agreement gain of one sample is not significant (a two-sided 5% test
    over the two candidates: 2.24 standard errors), so "common" (a large error that never flips a
    top-1) ranks before "split" (a small error, one flip) by the gain in output cosine. With twelve
    flips of 64, split's gain is significant and ranks first although its cosine gain is the smaller."""
    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import QuantizeOptions, quantize

    fp32 = build("tied_scores")
    path = tmp_path / "m.onnx"
    onnx.save(fp32, str(path))
    cal_x = np.random.default_rng(5).normal(size=(256, 8)).astype(np.float32)
    cal = calibrate(path, lambda: iter([{"x": cal_x}]), "minmax")
    qdq = quantize(fp32, cal.ranges.amax(), QuantizeOptions(target="tensorrt"))
    pool = np.random.default_rng(6).normal(size=(20000, 8)).clip(-3, 3).astype(np.float32)
    fp, q = (
        runtime.run(runtime.session(m.SerializeToString(), "cpu", optimize=False), {"x": pool}, ["y"])[0]
        for m in (fp32, qdq)
    )
    margin_fp, margin_q = fp[:, 0] - fp[:, 1], q[:, 0] - q[:, 1]
    flips = pool[np.sign(margin_fp) != np.sign(margin_q)]  # INT8 picks the other class
    sure = pool[np.abs(margin_fp) > 3 * np.abs(margin_fp - margin_q).max()]
    assert len(flips) >= 12 and len(sure) >= 64

    def ranked(flipped: int) -> list[dict[str, Any]]:
        x = np.concatenate([flips[:flipped], sure[: 64 - flipped]])
        metric = scoring.resolve_metric("agreement", None, ["y"], [])
        scorer = scoring.Scorer(path, metric, lambda: iter([{"x": x}]), int8_optimize=False)
        pair = [{"node": n, "op_type": "MatMul", "added_sqnr_db": 1.0} for n in ("split", "common")]
        return recovery.recover(qdq, fp32, scorer, scorer.first(qdq), pair, 0.0, max_fp_nodes=1).candidates

    one = ranked(1)
    by_node = {c["node"]: c for c in one}
    split, common = by_node["split"], by_node["common"]
    assert split["gain"] == pytest.approx(1 / 64) and common["gain"] == 0.0
    z = recovery.noise_z(2)
    assert z == pytest.approx(2.2414, abs=1e-4) and recovery.noise_z(1) == pytest.approx(1.96, abs=1e-3)
    assert split["gain"] <= z * split["gain_se"]  # one sample of 64: noise
    assert common["cosine_gain"] > split["cosine_gain"] > 0
    assert [c["node"] for c in one] == ["common", "split"]  # by metric gain alone, split would lead

    twelve = ranked(12)
    assert [c["node"] for c in twelve] == ["split", "common"]
    assert twelve[0]["gain"] == pytest.approx(12 / 64) and twelve[0]["gain"] > z * twelve[0]["gain_se"]
    assert twelve[1]["cosine_gain"] > twelve[0]["cosine_gain"]
