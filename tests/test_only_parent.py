"""`--only STEP` adds its run to the pipeline run that holds the reused earlier steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.orchestration.cli import main
from tests.conftest import run_args, run_pipeline

pytestmark = pytest.mark.slow  # every test runs the pipeline, then steps of it again


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_only_joins_the_pipeline_run_of_its_reused_steps(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = digits_copy / "pipeline.yaml"
    client = MlflowClient(tracking_uri)
    first = run_pipeline(config, tracking_uri, tmp_path, "steps.benchmark.iterations=10")
    parent = first["run_id"]
    again = []
    for iterations in (20, 30):
        summary = tmp_path / f"only{iterations}.json"
        args = run_args(config, tracking_uri, summary, f"steps.benchmark.iterations={iterations}") + [
            "--only",
            "benchmark",
        ]
        assert main(args) == 0
        again.append(json.loads(summary.read_text()))

    runs = _runs(client, "int8-digits")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [parent]  # one pipeline run, not three
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == len(runs) - 1  # every step run sits under it
    benchmarks = [r.info.run_id for r in children if r.data.tags["int8pipe.step"] == "benchmark"]
    assert benchmarks == [first["steps"]["benchmark"], again[0]["steps"]["benchmark"], again[1]["steps"]["benchmark"]]
    for s in again:
        assert s["run_id"] == parent
        # the earlier steps are the pipeline run's own children, not copies
        assert {k: v for k, v in s["steps"].items() if k != "benchmark"} == {
            k: v for k, v in first["steps"].items() if k not in ("benchmark", "promote")
        }

    # the pipeline run shows the newest benchmark's numbers, and keeps its status
    run = client.get_run(parent)
    newest = client.get_run(again[1]["steps"]["benchmark"])
    assert run.data.metrics["cpu.int8.latency_p50_ms"] == newest.data.metrics["cpu.int8.latency_p50_ms"]
    assert len(client.get_metric_history(parent, "cpu.int8.latency_p50_ms")) == 3
    assert run.info.status == "FINISHED"
    assert run.data.params["steps.benchmark.iterations"] == "10"  # MLflow keeps a param's first value...
    note = run.data.tags["mlflow.note.content"]
    assert (
        "`--only benchmark`" in note and "steps.benchmark.iterations=30 (logged param: 10)" in note
    )  # ...so it is said


def test_only_step_that_fails_marks_the_reopened_run_failed(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    config = digits_copy / "pipeline.yaml"
    client = MlflowClient(tracking_uri)
    config.write_text(
        config.read_text().replace("  benchmark:", "  # benchmark:").replace("  promote:", "  # promote:")
    )
    first = run_pipeline(config, tracking_uri, tmp_path)
    summary = tmp_path / "failed.json"
    # cosine drops a little under INT8; a gate of 0 cannot pass
    over = ("steps.validate.metric=cosine", "steps.validate.max_drop=0")
    assert main(run_args(config, tracking_uri, summary, *over) + ["--only", "validate"]) == 3
    s = json.loads(summary.read_text())
    assert s["run_id"] == first["run_id"] and s["gate"] == "failed"
    assert client.get_run(first["run_id"]).info.status == "FAILED"
    failed = client.get_run(s["steps"]["validate"])
    assert failed.info.status == "FAILED" and failed.data.tags["mlflow.parentRunId"] == first["run_id"]
    assert all(client.get_run(rid).info.status == "FINISHED" for rid in first["steps"].values())


def test_only_opens_a_pipeline_run_when_none_holds_the_earlier_steps(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    """The first `--only export` opens the pipeline run; `--only calibrate` then joins it."""
    config = digits_copy / "pipeline.yaml"
    client = MlflowClient(tracking_uri)
    ids = []
    for step in ("export", "calibrate"):
        summary = tmp_path / f"{step}.json"
        assert main(run_args(config, tracking_uri, summary, "steps.calibrate.method=minmax") + ["--only", step]) == 0
        ids.append(json.loads(summary.read_text()))
    assert ids[0]["run_id"] == ids[1]["run_id"]
    assert ids[1]["steps"]["export"] == ids[0]["steps"]["export"]
    runs = _runs(client, "int8-digits")
    assert [r.data.tags.get("int8pipe.step") for r in runs] == [None, "export", "calibrate"]
    # a different pipeline (another name) never joins it
    summary = tmp_path / "other.json"
    args = run_args(config, tracking_uri, summary, "steps.calibrate.method=minmax", "name=other") + [
        "--only",
        "calibrate",
    ]
    assert main(args) == 0
    assert json.loads(summary.read_text())["run_id"] != ids[0]["run_id"]
