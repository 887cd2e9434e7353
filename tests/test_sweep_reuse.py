"""One calibration pass serves every method: thresholds recomputed from stored histograms."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.calibration.trt_cache import ALGORITHMS
from pipeline.settings.config import AUTO_SEARCH
from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow  # every test runs the digits pipeline or a sweep of it


def _up_to_calibrate(folder: Path) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"] = {k: v for k, v in cfg["steps"].items() if k in ("export", "calibrate")}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ranges(uri: str, run_id: str) -> dict:
    mlflow.set_tracking_uri(uri)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="calibration/ranges.json", tracking_uri=uri)
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("method", ["percentile", "mse", "minmax"])
def test_method_change_reuses_the_measurements_bit_for_bit(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(tracking_uri)
    config = _up_to_calibrate(digits_copy)
    run_pipeline(config, tracking_uri, tmp_path)  # entropy: the default
    capsys.readouterr()
    over = (f"steps.calibrate.method={method}", "steps.calibrate.percentile=99.9")
    reused = run_pipeline(config, tracking_uri, tmp_path, *over)
    # the log says what happened, not "same config"
    now = "percentile 99.9" if method == "percentile" else method
    assert f"same inputs and measurements; its entropy thresholds are replaced by {now}'s" in capsys.readouterr().err
    run = client.get_run(reused["steps"]["calibrate"])
    assert run.data.tags["int8pipe.reused"] == "true" and run.data.tags["int8pipe.thresholds_from"] == "entropy"
    fresh_uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    fresh = run_pipeline(config, fresh_uri, tmp_path, *over)
    a, b = _ranges(tracking_uri, reused["steps"]["calibrate"]), _ranges(fresh_uri, fresh["steps"]["calibrate"])
    assert a["method"] == b["method"] == method
    assert a["tensors"] == b["tensors"]  # every min, max, amax and clipped fraction, exactly
    cache = mlflow.artifacts.download_artifacts(
        run_id=reused["steps"]["calibrate"], artifact_path="calibration", tracking_uri=tracking_uri
    )
    header = (Path(cache) / "calibration.cache").read_text().splitlines()[0]
    assert header.endswith(ALGORITHMS[method])


METHODS = ["minmax", "entropy", "percentile", "mse"]


def _sweep_config(folder: Path, methods: list[str] = METHODS, **sweep: object) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    cfg["steps"]["validate"] = {"metric": "cosine", "max_drop": 0.5}
    cfg["sweep"] = {"grid": {"steps.calibrate.method": methods}, **sweep}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("parallel", [1, 2])
def test_method_sweep_calibrates_once_and_promotes_only_the_best(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, parallel: int
) -> None:
    methods = METHODS if parallel == 1 else ["minmax", "percentile"]  # processes cost start-up time
    s = run_pipeline(_sweep_config(digits_copy, methods, parallel=parallel), tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    trials = s["trials"]
    assert [t["overrides"]["steps.calibrate.method"] for t in trials] == methods
    assert all(t["gate"] == "passed" for t in trials)
    best = min(trials, key=lambda t: (-t["metrics"]["int8_nodes"], t["metrics"]["accuracy_drop"]))
    assert s["best"] == best["run_id"]
    # trials nest under the sweep run, their steps under them
    for t in trials:
        assert client.get_run(t["run_id"]).data.tags["mlflow.parentRunId"] == s["run_id"]
    calibrations = [client.get_run(t["steps"]["calibrate"]) for t in trials]
    measured = [r for r in calibrations if r.data.tags.get("int8pipe.reused") != "true"]
    if parallel == 1:  # in order, minmax measures once and the histogram methods share one two-pass run
        assert len(measured) == 2
    else:
        assert len(measured) == 2  # at once: each measures
    # only the best is promoted, and the registry says so
    versions = client.search_model_versions("name = 'digits-int8'")
    assert len(versions) == 1 and s["registered_model"]["alias"] == "candidate"
    promote_run = client.get_run(s["steps"]["promote"])
    assert client.get_run(promote_run.data.tags["mlflow.parentRunId"]).data.tags["mlflow.parentRunId"] == s["run_id"]
    tags = versions[0].tags
    assert tags["int8pipe.calibration_method"] == best["overrides"]["steps.calibrate.method"]
    files = {a.path for a in client.list_artifacts(s["run_id"], "sweep")}
    assert {"sweep/trials_table.json", "sweep/tradeoff.png"} <= files
    # the table carries each drop's standard error, so a user can tell a real difference from a tie
    table_path = client.download_artifacts(s["run_id"], "sweep/trials_table.json", str(tmp_path))
    table = json.loads(Path(table_path).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    for t, row in zip(trials, rows):
        validate = client.get_run(t["steps"]["validate"]).data.metrics
        assert t["metrics"]["accuracy_drop_se"] == validate["accuracy_drop_se"] > 0
        assert row["accuracy_drop_se"] == pytest.approx(validate["accuracy_drop_se"], rel=1e-4)  # the table rounds


def test_sweep_time_budget_keeps_what_finished(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.orchestration.cli import main
    from tests.conftest import run_args

    config = _sweep_config(digits_copy, time_budget_s=0)
    assert main(run_args(config, tracking_uri, tmp_path / "s.json")) == 3
    s = json.loads((tmp_path / "s.json").read_text())
    assert [t["gate"] for t in s["trials"]] == ["skipped"] * len(METHODS) and s["best"] is None
    assert "no trial passed the accuracy gate" in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    assert client.get_run(s["run_id"]).info.status == "FAILED"
    assert "sweep/trials_table.json" in {a.path for a in client.list_artifacts(s["run_id"], "sweep")}


def test_auto_method_chooses_by_the_validate_metric(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    from pipeline.orchestration.runner import load_config as load

    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    cfg["steps"]["calibrate"]["method"] = "auto"
    cfg["steps"]["validate"] = {"metric": "cosine", "max_drop": 0.5}
    path.write_text(yaml.safe_dump(cfg))
    s = run_pipeline(path, tracking_uri, tmp_path)
    # the search, in order, until a trial passes: the defaults (mse) pass a 0.5 cosine drop at once
    assert [t["overrides"] for t in s["trials"]] == AUTO_SEARCH
    assert [t["gate"] for t in s["trials"]] == ["passed"] + ["skipped"] * (len(AUTO_SEARCH) - 1)
    assert s["best"] == s["trials"][0]["run_id"]
    table = MlflowClient(tracking_uri).download_artifacts(s["run_id"], "sweep/trials_table.json", str(tmp_path))
    why = _table_column(Path(table), "why")
    assert why[0] == "selected: the first trial to pass the gate" and set(why[1:]) == {
        "not run: an earlier trial passed the gate (stop_at_first_pass)"
    }
    # with a grid of the user's, method: auto adds the four methods to it and the metric decides
    cfg["sweep"] = {"grid": {"steps.validate.max_drop": [0.5]}}
    path.write_text(yaml.safe_dump(cfg))
    s = run_pipeline(path, tracking_uri, tmp_path)
    assert [t["overrides"]["steps.calibrate.method"] for t in s["trials"]] == METHODS
    best = max(s["trials"], key=lambda t: t["metrics"]["int8_cosine"])  # equal coverage: the metric decides
    assert s["best"] == best["run_id"]
    # a sweep section saying only how the trials run (no grid, no trials) keeps the search
    cfg["sweep"] = {"parallel": 2, "time_budget_s": 600}
    path.write_text(yaml.safe_dump(cfg))
    loaded = load(path)
    assert loaded.sweep is not None and (loaded.sweep.parallel, loaded.sweep.time_budget_s) == (2, 600)
    assert loaded.sweep.stop_at_first_pass and [overrides for overrides, _ in loaded.trials] == AUTO_SEARCH
    cfg.pop("sweep")
    # without a validate step there is nothing to choose by: the default method
    cfg["steps"] = {k: v for k, v in cfg["steps"].items() if k in ("export", "calibrate", "quantize")}
    path.write_text(yaml.safe_dump(cfg))
    loaded = load(path)
    assert loaded.sweep is None and loaded.steps["calibrate"].method == "mse"


def _table_column(path: Path, name: str) -> list[object]:
    """Column ``name`` of an MLflow table artifact, row by row."""
    table = json.loads(path.read_text())
    col = table["columns"].index(name)
    return [row[col] for row in table["data"]]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"grid": {"steps.calibrate.method": ["mse"]}, "trials": [{"steps.calibrate.method": "mse"}]}, "not both"),
        ({"trials": [{}]}, "sweep.trials: expected a list of non-empty mappings"),
        ({"trials": [{"name": "other"}]}, "sweep.trials: name: a trial cannot change"),
        ({}, "sweep.grid: give at least one key"),
    ],
)
def test_sweep_trials_errors(digits_copy: Path, sweep: dict, message: str) -> None:
    from pipeline.errors import ConfigError
    from pipeline.orchestration.runner import load_config

    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["sweep"] = sweep
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_sweep_trials_run_in_order(digits_copy: Path) -> None:
    from pipeline.orchestration.runner import load_config

    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    order = [{"steps.calibrate.method": "minmax"}, {"steps.calibrate.method": "mse", "steps.validate.max_drop": 0.5}]
    cfg["sweep"] = {"trials": order, "stop_at_first_pass": True}
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert [overrides for overrides, _ in loaded.trials] == order
    second = loaded.trials[1][1]
    assert second.steps["calibrate"].method == "mse" and second.steps["validate"].max_drop == 0.5
    assert "steps.validate.max_drop=0.5" in second.overrides  # what a trial process rebuilds it from


def test_processes_stop_starting_trials_once_one_passed(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """parallel: 2 with stop_at_first_pass: the two running trials finish, the third never starts."""
    path = _sweep_config(digits_copy, parallel=2)
    cfg = yaml.safe_load(path.read_text())
    methods = ["minmax", "percentile", "entropy"]
    cfg["sweep"] = {"trials": [{"steps.calibrate.method": m} for m in methods], "parallel": 2,
                    "stop_at_first_pass": True}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    s = run_pipeline(path, tracking_uri, tmp_path)
    assert [t["gate"] for t in s["trials"]] == ["passed", "passed", "skipped"]
    assert s["best"] in {s["trials"][0]["run_id"], s["trials"][1]["run_id"]}
