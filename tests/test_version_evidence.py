"""The registered INT8 version: a handful of tags people filter on, and a description that names its
FP32 parent, links its evidence and runs and states the rest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.execution import cpu_kernels, environment
from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow  # every test runs the digits pipeline


def _without_benchmark(folder: Path, **model: str) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    if model:
        cfg["model"] = model
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fetch(uri: str, tracking_uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))


def _evidence(description: str) -> dict[str, str]:
    """name -> runs:/ URI, as the description's Evidence list gives them."""
    return dict(re.findall(r"^- (\w+): `(runs:/[^`]+)`$", description, re.MULTILINE))


def test_the_description_links_the_evidence(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    s = run_pipeline(_without_benchmark(digits_copy), tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    reg = s["registered_model"]
    mv = client.get_model_version(reg["name"], reg["version"])
    source = str((digits_copy / "model.onnx").resolve())
    # the file's absolute path, not the YAML's bare "model.onnx"; a file has no registry version
    assert f"FP32 parent: `{source}`, SHA-256" in mv.description

    cal, val = s["steps"]["calibrate"], s["steps"]["validate"]
    links = _evidence(mv.description)
    assert links == {
        "calibration_cache": f"runs:/{cal}/calibration/calibration.cache",
        "ranges": f"runs:/{cal}/calibration/ranges.json",
        "layer_errors": f"runs:/{val}/validation/layer_errors_table.json",
        "gate_report": f"runs:/{val}/validation/report.json",
    }
    cache = _fetch(links["calibration_cache"], tracking_uri, tmp_path / "a").read_text()
    assert cache.splitlines()[0].startswith("TRT-") and cache.splitlines()[0].endswith("EntropyCalibration2")
    ranges = json.loads(_fetch(links["ranges"], tracking_uri, tmp_path / "b").read_text())
    assert ranges["method"] == "entropy" and f"model `{ranges['model_sha256']}`" in mv.description
    gate = json.loads(_fetch(links["gate_report"], tracking_uri, tmp_path / "c").read_text())
    assert gate["passed"] is True and gate["metric"] == "top1"
    table = json.loads(_fetch(links["layer_errors"], tracking_uri, tmp_path / "d").read_text())
    assert "tensor" in table["columns"] and table["data"]

    # the same files travel with the model itself: its page lists evidence/, and a version URI reaches them
    assert mv.source.startswith("models:/m-")  # the version's source is its logged model
    listed = {a.path for a in client.list_logged_model_artifacts(mv.source[len("models:/") :], "evidence")}
    assert listed == {
        f"evidence/{f}" for f in ("calibration.cache", "ranges.json", "layer_errors.json", "gate_report.json")
    }
    copy = _fetch(f"models:/{reg['name']}/{reg['version']}/evidence/calibration.cache", tracking_uri, tmp_path / "e")
    assert copy.read_text() == cache


def test_registry_source_is_recorded_with_the_version_its_alias_named(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fp32")
    client = MlflowClient(tracking_uri)
    for _ in range(2):  # two versions; the alias names the first, so "latest" would be wrong
        with mlflow.start_run():
            mlflow.onnx.log_model(
                onnx.load(str(digits_copy / "model.onnx")), name="m", registered_model_name="digits-fp32"
            )
    client.set_registered_model_alias("digits-fp32", "champion", "1")
    config = _without_benchmark(digits_copy, mlflow="models:/digits-fp32@champion")
    s = run_pipeline(config, tracking_uri, tmp_path)
    mv = client.get_model_version("digits-int8", s["registered_model"]["version"])
    assert "FP32 parent: `models:/digits-fp32@champion` (models:/digits-fp32/1)" in mv.description


# what a person filters the version list on; everything else is in the description
FILTERED = {"int8pipe.gate", "int8pipe.metric", "int8pipe.metric_value", "int8pipe.target", "int8pipe.precision"}
FILTERED |= {"int8pipe.calibration_method"}
# what the promotion logic reads (one JSON tag) and writes (why the alias stands where it does)
PROMOTION = {"int8pipe.promotion", "int8pipe.alias_decision"}


def test_a_version_carries_a_handful_of_tags_and_describes_the_rest(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    """The digits pipeline's version: the tags people filter on, and its description holds the facts
    that were tags before (sizes, node counts, samples, where it was validated, runs, latency)."""
    fast = ("steps.benchmark.iterations=3", "steps.benchmark.warmup=1", "steps.benchmark.batch_sizes=[1]")
    client = MlflowClient(tracking_uri)
    s = run_pipeline(digits_copy / "pipeline.yaml", tracking_uri, tmp_path, *fast)
    m, reg = s["metrics"], s["registered_model"]
    mv = client.get_model_version(reg["name"], reg["version"])
    assert set(mv.tags) == FILTERED | PROMOTION and len(mv.tags) <= 8
    assert {k: mv.tags[k] for k in FILTERED} == {
        "int8pipe.gate": "passed",
        "int8pipe.metric": "top1",
        "int8pipe.metric_value": repr(m["int8_top1"]),
        "int8pipe.target": "tensorrt",
        "int8pipe.precision": "int8",
        "int8pipe.calibration_method": "entropy",
    }
    promotion = json.loads(mv.tags["int8pipe.promotion"])
    assert promotion["alias"] == "candidate" and promotion["policy"] == "better"
    # a person's filter finds it by the short names
    found = client.search_model_versions(
        "name = 'digits-int8' and tags.`int8pipe.gate` = 'passed' and tags.`int8pipe.target` = 'tensorrt' "
        "and tags.`int8pipe.calibration_method` = 'entropy' and tags.`int8pipe.metric` = 'top1'"
    )
    assert [v.version for v in found] == [mv.version]

    text = mv.description
    assert f"**Gate** passed on top1: INT8 {m['int8_top1']:.6g}, FP32 {m['fp32_top1']:.6g}" in text
    assert f"on {m['validation_samples']:.0f} validation samples" in text
    assert f"validation data SHA-256 `{promotion['validation_digest']}`" in text
    nodes = f"**INT8 model**: {m['int8_nodes']:.0f} INT8 nodes, {m['fp_nodes']:.0f} float nodes"
    assert f"{nodes}, SHA-256 `{promotion['int8_sha256']}`" in text
    assert f"**Validated on** {cpu_kernels.describe(cpu_kernels.this_machine())}; INT8 numerics exact" in text
    steps = ", ".join(f"{k} `{v}`" for k, v in s["steps"].items() if k != "promote")
    assert f"**Runs** of pipeline 'digits-int8': {steps}" in text
    # a tensorrt model timed on ORT's CPU provider: no latency on its version, and why
    assert "cpu.speedup" in m  # measured, and kept on the benchmark run
    bench = s["steps"]["benchmark"]
    assert f"**Latency**: not timed where target tensorrt runs it (tensorrt); the benchmark run `{bench}`" in text
    assert "p50" not in text and "p99" not in text


def test_version_latency_is_the_targets_own_with_its_spread(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    """An onnxruntime model's CPU latency: p50 beside p99 and the machine, never p99 alone."""
    fast = ("steps.benchmark.iterations=5", "steps.benchmark.warmup=1", "steps.benchmark.batch_sizes=[1]")
    client = MlflowClient(tracking_uri)
    s = run_pipeline(digits_copy / "pipeline.yaml", tracking_uri, tmp_path, *fast, "steps.quantize.target=onnxruntime")
    m = s["metrics"]
    mv = client.get_model_version(s["registered_model"]["name"], s["registered_model"]["version"])
    assert set(mv.tags) == FILTERED | PROMOTION  # the fleet's facts are described, not tagged
    assert "**CPU fleet** all, weight scheme int7: " in mv.description
    line = next(x for x in mv.description.splitlines() if x.startswith("- **Latency**"))
    int8 = f"INT8 p50 {m['cpu.int8.latency_p50_ms']:.3g} ms, p99 {m['cpu.int8.latency_p99_ms']:.3g} ms"
    fp32 = f"FP32 p50 {m['cpu.fp32.latency_p50_ms']:.3g} ms, p99 {m['cpu.fp32.latency_p99_ms']:.3g} ms"
    run = s["steps"]["benchmark"]
    assert line.startswith(f"- **Latency** (benchmark run `{run}`, first batch size): {int8}; {fp32}")
    assert f"INT8 at {m['cpu.speedup']:.2f}x FP32's speed (p50)" in line
    cpu = environment.cpu()
    assert f"timed on {cpu['model']} (" in line and ("avx2" in line or "avx2" not in cpu["flags"])
