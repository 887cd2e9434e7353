"""The one place that talks to MLflow tracking: parent and child runs, metrics, artifacts, reuse."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.log import logger

STEP_TAG = "int8pipe.step"
KEY_TAG = "int8pipe.cache_key"
OUTPUTS_TAG = "int8pipe.outputs"
REUSED_TAG = "int8pipe.reused"
REUSED_FROM_TAG = "int8pipe.reused_from"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)


class StepTracker:
    """Reporting for one child run, handed to a step through its context."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        columns: dict[str, list[Any]] = {k: [] for k in (rows[0] if rows else {})}
        for row in rows:
            for k in columns:
                columns[k].append(row.get(k))
        with warnings.catch_warnings():
            # MLflow's table logging trips pandas 3's string-dtype migration warning; not ours to fix
            warnings.filterwarnings("ignore", message=".*select_dtypes.*")
            mlflow.log_table(columns, artifact_file=artifact_file, run_id=self.run_id)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def download_onnx(self, uri: str, dst: Path) -> Path:
        return download_onnx(uri, dst, mlflow.get_tracking_uri())

    def promote(self, **kwargs: Any) -> dict[str, Any]:
        from pipeline.registry import promote_model

        return promote_model(self.client, self.run_id, **kwargs)


class Tracker:
    """Opens the pipeline's parent run and its nested step runs."""

    def __init__(self, tracking_uri: str | None, experiment: str):
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(self.uri)
        self.outer_run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
        if self.outer_run_id:
            # `mlflow run` already created our parent run in its experiment; children must sit beside it.
            self.experiment_id = self.client.get_run(self.outer_run_id).info.experiment_id
        else:
            exp = mlflow.set_experiment(experiment)
            self.experiment_id = exp.experiment_id

    @contextmanager
    def parent_run(self, name: str, resolved_config: dict[str, Any]) -> Iterator[str]:
        if self.outer_run_id:
            run = mlflow.start_run(run_id=self.outer_run_id)
        else:
            run = mlflow.start_run(run_name=name, experiment_id=self.experiment_id)
        run_id = run.info.run_id
        self.client.set_tag(run_id, "int8pipe.pipeline", name)
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = Path(tmp) / "pipeline.resolved.json"
            cfg_path.write_text(json.dumps(resolved_config, indent=2))
            self.client.log_artifact(run_id, str(cfg_path), "config")
        params: dict[str, str] = {}
        _flatten("", resolved_config, params)
        mlflow.log_params({key: value[:6000] for key, value in params.items()})
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            mlflow.end_run(status=status)

    @contextmanager
    def child_run(self, step: str, cache_key: str) -> Iterator[StepTracker]:
        parent = mlflow.active_run()
        assert parent is not None
        # Created explicitly: under `mlflow run`, start_run() without a run id would resume the
        # outer run named by MLFLOW_RUN_ID instead of creating a child.
        created = self.client.create_run(
            self.experiment_id,
            run_name=step,
            tags={STEP_TAG: step, KEY_TAG: cache_key, "mlflow.parentRunId": parent.info.run_id},
        )
        run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        status = "FAILED"
        try:
            yield StepTracker(self.client, run.info.run_id)
            status = "FINISHED"
        finally:
            mlflow.end_run(status=status)

    def find_reusable(self, step: str, cache_key: str) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{cache_key}' and tags.`{STEP_TAG}` = '{step}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def restore(self, prior: Run, workdir: Path) -> dict[str, Path]:
        """Download a finished run's artifacts into ``workdir`` and return its hand-offs."""
        mlflow.artifacts.download_artifacts(run_id=prior.info.run_id, dst_path=str(workdir), tracking_uri=self.uri)
        outputs = json.loads(prior.data.tags.get(OUTPUTS_TAG, "{}"))
        return {name: workdir / rel for name, rel in outputs.items()}

    def log_outputs(self, tracker: StepTracker, workdir: Path, outputs: dict[str, Path]) -> None:
        if any(workdir.iterdir()):
            self.client.log_artifacts(tracker.run_id, str(workdir))
        rel = {name: str(path.relative_to(workdir)) for name, path in outputs.items()}
        tracker.set_tags({OUTPUTS_TAG: json.dumps(rel)})

    def log_parent_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        if metrics:
            logger.debug("copied to the pipeline run: %s", ", ".join(sorted(metrics)))


def download_onnx(uri: str, dst: Path, tracking_uri: str) -> Path:
    """Download an ONNX-flavour MLflow model (models:/ or runs:/) and return its .onnx file."""
    import yaml

    from pipeline.errors import ModelError, fail

    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
        )
    except Exception as exc:  # MlflowException for unknown names/versions/aliases
        fail(ModelError, f"model.mlflow: cannot fetch {uri!r}: {str(exc).splitlines()[0]}")
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {})
        if "onnx" not in flavors:
            fail(ModelError, f"model.mlflow: {uri!r} is not an ONNX-flavour model (flavours: {', '.join(flavors)}).")
        return local / flavors["onnx"]["data"]
    found = sorted(local.rglob("*.onnx"))
    if not found:
        fail(ModelError, f"model.mlflow: {uri!r} holds no .onnx file.")
    return found[0]
