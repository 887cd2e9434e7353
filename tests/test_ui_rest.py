"""What the MLflow UI shows for two pipelines, read through the server's REST API as the UI reads it."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DIGITS, run_pipeline

QUICK = ("steps.benchmark.iterations=5", "steps.benchmark.batch_sizes=[1]")


def _get(server: str, endpoint: str, **query: str) -> Any:
    url = f"{server}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


def _post(server: str, path: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{server}{path}", json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _tags(entity: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.mark.slow
def test_two_pipelines_as_the_ui_shows_them(mlflow_server: str, tmp_path: Path) -> None:
    runs = {
        method: run_pipeline(
            DIGITS / "pipeline.yaml", mlflow_server, tmp_path, f"steps.calibrate.method={method}", *QUICK
        )
        for method in ("entropy", "minmax")
    }
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="int8-digits")["experiment"]
    found = _post(
        mlflow_server,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`int8pipe.pipeline` = 'digits-int8'"},
    )["runs"]
    parents = {r["info"]["run_id"]: r for r in found if "mlflow.parentRunId" not in _tags(r["data"])}
    assert set(parents) == {s["run_id"] for s in runs.values()}  # two pipeline runs, nothing stacked

    for method, s in runs.items():
        run = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=s["run_id"])["run"]
        tags = _tags(run["data"])
        # the runs table tells them apart by name, tag and description
        assert run["info"]["run_name"] == f"digits-int8 ({method}, tensorrt)"
        assert tags["int8pipe.method"] == method and tags["int8pipe.gate"] == "passed"
        assert f"Calibration: {method}." in tags["mlflow.note.content"]
        # the numbers people compare, on the pipeline run, once each
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        for key in ("fp32_top1", "int8_top1", "accuracy_drop", "size_mb_fp32", "size_mb_int8", "int8_nodes"):
            assert key in metrics, key
        assert metrics["int8_nodes"] == s["metrics"]["int8_nodes"] > 0
        assert metrics["size_mb_int8"] < metrics["size_mb_fp32"]
        assert "cpu.speedup" in metrics and "cpu.bs1.speedup" not in metrics
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["steps.calibrate.method"] == method and "null" not in params.values()
        # the Dataset column: calibration and validation data with digests and sample counts
        inputs = {d["dataset"]["name"]: d for d in run["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"calibration", "validation"}
        for name, d in inputs.items():
            assert len(d["dataset"]["digest"]) >= 8
            assert d["dataset"]["source"] and _tags(d)["mlflow.data.context"] == name
        assert json.loads(inputs["calibration"]["dataset"]["profile"])["num_samples"] == 512

    # the same calibration data has the same digest in both, the validation data too
    digests = [
        {d["dataset"]["name"]: d["dataset"]["digest"] for d in _get(
            mlflow_server, "/api/2.0/mlflow/runs/get", run_id=s["run_id"])["run"]["inputs"]["dataset_inputs"]}
        for s in runs.values()
    ]  # fmt: skip
    assert digests[0] == digests[1]

    # the registry: two versions, each linked to its logged model, evidence and FP32 parent
    versions = _get(mlflow_server, "/api/2.0/mlflow/model-versions/search", filter="name = 'digits-int8'")[
        "model_versions"
    ]
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    models = {
        m["info"]["model_id"]: m
        for m in _post(
            mlflow_server, "/api/2.0/mlflow/logged-models/search", {"experiment_ids": [exp["experiment_id"]]}
        )["models"]
    }
    for v in versions:
        assert len(_tags(v)) <= 8  # the few people filter on; the rest is in the description
        assert f"FP32 parent: `{(DIGITS / 'model.onnx').resolve()}`" in v["description"]  # absolute
        assert "- calibration_cache: `runs:/" in v["description"]
        model_id = v["source"].removeprefix("models:/")
        model = models[model_id]
        assert model["info"]["source_run_id"] == v["run_id"]
        metrics = {m["key"] for m in model["data"].get("metrics", [])}
        assert {"int8_top1", "accuracy_drop"} <= metrics  # the model page shows the validated numbers
        # the model's files, through the server's artifact proxy: MLmodel names its input example
        location = model["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")
        files = {f["path"] for f in _get(mlflow_server, "/api/2.0/mlflow-artifacts/artifacts", path=location)["files"]}
        assert {"MLmodel", "model.onnx", "input_example.json", "evidence"} <= files
        mlmodel = _get(mlflow_server, f"/api/2.0/mlflow-artifacts/artifacts/{location}/MLmodel")
        assert "saved_input_example_info" in mlmodel and "input_example.json" in mlmodel
        example = json.loads(_get(mlflow_server, f"/api/2.0/mlflow-artifacts/artifacts/{location}/input_example.json"))
        assert example  # one real sample
        evidence = {
            f["path"]
            for f in _get(mlflow_server, "/api/2.0/mlflow-artifacts/artifacts", path=f"{location}/evidence")["files"]
        }
        assert "calibration.cache" in evidence
        cache = _get(mlflow_server, f"/api/2.0/mlflow-artifacts/artifacts/{location}/evidence/calibration.cache")
        assert cache.startswith("TRT-")


def test_the_logged_ui_link_opens_the_run_in_the_model_training_layout() -> None:
    """MLflow 3.17's UI lays an experiment out by a per-browser switch (GenAI in a new browser), read
    from the URL parameter workflowType first: the link int8pipe logs sets it to the training layout."""
    import mlflow

    from pipeline.mlflow_io.tracking import ui_line, ui_link

    on_server = ui_link("http://me:secret@10.0.0.5:5000/", "3", "abc")  # the browser asks for credentials
    assert on_server == "http://10.0.0.5:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert "secret" not in ui_line("postgresql://me:secret@db/mlflow", "3", "abc")
    local = ui_line("sqlite:///mlflow.db", "1", "abc")
    assert "`mlflow ui --backend-store-uri sqlite:///mlflow.db`" in local
    assert local.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning")
    # the installed UI still reads that parameter and knows that value (its bundle, as the browser gets it)
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    main = next(bundle.glob("main.*.js"), None)
    if main is None:
        pytest.skip("this MLflow has no bundled UI")
    code = main.read_text(errors="replace")
    assert 'get("workflowType")' in code and 'MACHINE_LEARNING="machine_learning"' in code
