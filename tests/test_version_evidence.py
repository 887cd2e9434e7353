"""The registered INT8 version names its FP32 parent and links its evidence, from the version page."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import onnx
import pytest
import yaml
from mlflow import MlflowClient

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


def test_version_tags_resolve_to_the_evidence(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    s = run_pipeline(_without_benchmark(digits_copy), tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    reg = s["registered_model"]
    mv = client.get_model_version(reg["name"], reg["version"])
    tags = mv.tags
    source = str((digits_copy / "model.onnx").resolve())
    assert tags["int8pipe.fp32_source"] == source  # the file's absolute path, not the YAML's bare "model.onnx"
    assert "int8pipe.fp32_version" not in tags  # a file has no registry version

    cal, val = s["steps"]["calibrate"], s["steps"]["validate"]
    assert tags["int8pipe.evidence.calibration_cache"] == f"runs:/{cal}/calibration/calibration.cache"
    assert tags["int8pipe.evidence.ranges"] == f"runs:/{cal}/calibration/ranges.json"
    assert tags["int8pipe.evidence.gate_report"] == f"runs:/{val}/validation/report.json"
    assert tags["int8pipe.evidence.layer_errors"] == f"runs:/{val}/validation/layer_errors_table.json"

    cache = _fetch(tags["int8pipe.evidence.calibration_cache"], tracking_uri, tmp_path / "a").read_text()
    assert cache.splitlines()[0].startswith("TRT-") and cache.splitlines()[0].endswith("EntropyCalibration2")
    ranges = json.loads(_fetch(tags["int8pipe.evidence.ranges"], tracking_uri, tmp_path / "b").read_text())
    assert ranges["method"] == "entropy" and ranges["model_sha256"] == tags["int8pipe.fp32_sha256"]
    gate = json.loads(_fetch(tags["int8pipe.evidence.gate_report"], tracking_uri, tmp_path / "c").read_text())
    assert gate["passed"] is True and gate["metric"] == "top1"
    table = json.loads(_fetch(tags["int8pipe.evidence.layer_errors"], tracking_uri, tmp_path / "d").read_text())
    assert "tensor" in table["columns"] and table["data"]

    # the same files travel with the model itself: its page lists evidence/, and a version URI reaches them
    assert mv.source.startswith("models:/m-")  # the version's source is its logged model
    listed = {a.path for a in client.list_logged_model_artifacts(mv.source[len("models:/") :], "evidence")}
    assert listed == {
        f"evidence/{f}" for f in ("calibration.cache", "ranges.json", "layer_errors.json", "gate_report.json")
    }
    copy = _fetch(f"models:/{reg['name']}/{reg['version']}/evidence/calibration.cache", tracking_uri, tmp_path / "e")
    assert copy.read_text() == cache
    for uri in tags.values():
        if uri.startswith("runs:/"):
            assert uri in mv.description
    assert f"FP32 parent: `{source}`" in mv.description and ranges["model_sha256"] in mv.description


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
    assert mv.tags["int8pipe.fp32_source"] == "models:/digits-fp32@champion"
    assert mv.tags["int8pipe.fp32_version"] == "models:/digits-fp32/1"
    assert "`models:/digits-fp32@champion` (models:/digits-fp32/1)" in mv.description


def test_version_latency_is_the_targets_own(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """A tensorrt model timed on ORT's CPU provider gets no latency on its version, and says why; an
    onnxruntime model gets its CPU latency with the CPU it was timed on."""
    fast = ("steps.benchmark.iterations=3", "steps.benchmark.warmup=1", "steps.benchmark.batch_sizes=[1]")
    client = MlflowClient(tracking_uri)
    config = digits_copy / "pipeline.yaml"
    s = run_pipeline(config, tracking_uri, tmp_path, *fast)
    tags = client.get_model_version(s["registered_model"]["name"], s["registered_model"]["version"]).tags
    assert "cpu.speedup" in s["metrics"]  # measured, and kept on the benchmark run
    assert "int8pipe.cpu.speedup" not in tags and "int8pipe.cpu.int8.latency_p50_ms" not in tags
    assert tags["int8pipe.latency_measured_on"].startswith("not on the target: target tensorrt runs on tensorrt")
    assert tags["int8pipe.precision"] == "int8"

    s = run_pipeline(config, tracking_uri, tmp_path, *fast, "steps.quantize.target=onnxruntime")
    tags = client.get_model_version(s["registered_model"]["name"], s["registered_model"]["version"]).tags
    assert float(tags["int8pipe.cpu.speedup"]) == float(f"{s['metrics']['cpu.speedup']:.6g}")
    from pipeline.execution import environment

    assert tags["int8pipe.latency_measured_on"].startswith(environment.cpu()["model"])
    assert "avx2" in tags["int8pipe.latency_measured_on"] or "avx2" not in environment.cpu()["flags"]
