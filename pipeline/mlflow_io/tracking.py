"""The one place that talks to MLflow tracking: parent and child runs, metrics, artifacts, reuse."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.log import logger
from pipeline.mlflow_io.store import (
    adopt_credentials,
    alive,
    check_reachable,
    closing,
    owner_tags,
    quiet_when_full,
    redacted,
    same_pid_namespace,
    sqlite_init_lock,
    without_credentials,
)
from pipeline.tag_names import (
    CLOSED_BY_TAG,
    ERROR_TAG,
    HEARTBEAT_TAG,
    HOST_TAG,
    KEY_TAG,
    OUTPUTS_TAG,
    PID_TAG,
    PIPELINE_TAG,
    STEP_TAG,
)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a run on another host whose heartbeat is this old belongs to a dead process

# How long one tracking request may take before the server counts as gone, unless the user set these
# themselves. MLflow's defaults (7 retries with backoff, 120 s per try) wait about 4 minutes for a server
# that refuses connections and up to 16 for one that hangs (frozen, or a host that stopped routing: the
# kernel still accepts the connection, nothing ever answers). Each try waits the timeout for *silence*,
# not for the whole transfer: an upload of any size stays within it as long as the server takes data
# and answers within 30 s of the last byte. 30 s is the margin for a server that proxies artifacts to
# object storage (it answers only once S3 has the file: a few hundred MB on a slow link) or runs a
# search on a busy database. One retry covers a connection a proxy dropped or a server restarting; more
# tries do not help a hung server, each costs another 30 s. So a hung server ends the run about a
# minute (2 x 30 s) after int8pipe's next request, a stopped one within seconds (README, Reliability).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # one tqdm bar per artifact download (restores, evidence) buried the log: a sweep printed 19
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def flatten_params(prefix: str, value: Any, out: dict[str, str]) -> None:
    """Nested config -> MLflow params; unset (null) keys are left out rather than logged as 'null'."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten_params(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is not None:
        out[prefix] = json.dumps(value) if isinstance(value, (list, bool)) else str(value)


def log_dataset(
    client: MlflowClient, run_ids: list[str], name: str, source: str, digest: str, samples: int | None
) -> None:
    """Record a data source as an MLflow dataset input (the runs table's Dataset column)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class _Counted(MetaDataset):
        @property
        def profile(self) -> Any:
            return {"num_samples": samples} if samples is not None else None

        def to_dict(self) -> dict[str, str]:
            out = super().to_dict()
            if samples is not None:  # what the run page shows under the dataset
                out["profile"] = json.dumps({"num_samples": samples})
            return out

    if ":" in source and not Path(source).exists():  # a python: source
        src: Any = CodeDatasetSource({"python": source})
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            src = resolve_dataset_source(Path(source).resolve().as_uri())
    entity = _Counted(src, name=name, digest=digest[:16])._to_mlflow_entity()
    for run_id in run_ids:
        inputs = [DatasetInput(entity, tags=[InputTag("mlflow.data.context", name)])]
        try:
            client.log_inputs(run_id, datasets=inputs)
        except Exception as exc:
            # MLflow's SQL store looks the dataset up, then inserts it: two runs (a parallel sweep's
            # trials) logging the same data at once can both miss it, and the second insert fails.
            # By then the row exists, so logging again links the run to it.
            if "UNIQUE constraint failed: datasets" not in str(exc) and "Duplicate entry" not in str(exc):
                raise
            client.log_inputs(run_id, datasets=inputs)


class StepTracker:
    """Reporting for one child run, handed to a step through its context."""

    def __init__(self, client: MlflowClient, run_id: str, parent_run_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=step)

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

    def log_dataset(self, name: str, source: str, digest: str, samples: int | None) -> None:
        """The data source as an MLflow dataset input of this run and of its pipeline run."""
        runs = [self.run_id, *([self.parent_run_id] if self.parent_run_id else [])]
        log_dataset(self.client, runs, name, source, digest, samples)

    def promote(self, **kwargs: Any) -> dict[str, Any]:
        """Register the model (see :func:`pipeline.mlflow_io.registry.promote_model`)."""
        from pipeline.mlflow_io.registry import promote_model

        return promote_model(self.client, self.run_id, **kwargs)


class DeferredStepTracker(StepTracker):
    """Holds what a step reports before its run exists, to be replayed onto that run.

    An ``--only`` call restores the earlier steps before deciding which pipeline run they belong to;
    a restored step's metrics and tags wait here until a run records them (or one already does)."""

    def __init__(self) -> None:
        super().__init__(None, "")  # type: ignore[arg-type]  # never talks to MLflow itself
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(("log_metrics", (dict(metrics), step)))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.calls.append(("log_table", (rows, artifact_file)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.calls.append(("set_tags", (dict(tags),)))

    def replay(self, target: StepTracker) -> None:
        for method, args in self.calls:
            getattr(target, method)(*args)


# the experiment tag MLflow 3's UI read to choose its layout, and its value for training-style work
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
# MLflow 3.17's UI ignores that tag: it lays every experiment out by a switch of its own (GenAI or
# Model training, remembered per browser, GenAI in a new one), which this URL parameter sets
UI_LAYOUT = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told otherwise


def _logged_model_of(version: Any) -> str | None:
    """The id of the logged model a registry version was made from: its ``model_id`` when the
    registry recorded one, else the ``models:/m-...`` source it was created from."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(version.source or "")
    return source[len("models:/") :] if source.startswith("models:/m-") else None


def _is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training layout: on the tracking server itself
    (no credentials in the link), else where `mlflow ui` serves by default."""
    base = without_credentials(tracking_uri).rstrip("/") if _is_server(tracking_uri) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_LAYOUT}"


def ui_line(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """For the log: where the run is in the MLflow UI, and how to start one on a store without a server
    (a database URI's password shown as ***)."""
    start = "" if _is_server(tracking_uri) else f" (`mlflow ui --backend-store-uri {redacted(tracking_uri)}`)"
    return f"in the MLflow UI{start}: {ui_link(tracking_uri, experiment_id, run_id)}"


def _set_experiment(name: str) -> str:
    """``mlflow.set_experiment``, safe when several pipelines create the same experiment at once."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            return str(mlflow.set_experiment(name).experiment_id)
        except MlflowException as exc:  # another process created it between MLflow's get and create
            if "already exists" not in str(exc).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")


class Tracker:
    """Opens the pipeline's parent run and its nested step runs."""

    def __init__(self, tracking_uri: str | None, experiment: str, under: str | None = None):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        given = tracking_uri or mlflow.get_tracking_uri()
        self.uri = adopt_credentials(given)  # an http(s) password goes to MLflow's settings, not into logs
        if tracking_uri or self.uri != given:
            mlflow.set_tracking_uri(self.uri)
        check_reachable(self.uri)
        quiet_when_full()
        with sqlite_init_lock(self.uri):
            self.client = MlflowClient(self.uri)
            self.client.search_experiments(max_results=1)  # creates or migrates the store, under the lock
        # set by `mlflow run`; a run nested ``under`` another (a sweep's trial) is always created anew
        self.outer_run_id = None if under else os.environ.get("MLFLOW_RUN_ID")
        self.under = under
        if under:
            self.experiment_id = self.client.get_run(under).info.experiment_id
        elif self.outer_run_id:
            # `mlflow run` already created our parent run in its experiment; children must sit beside it.
            self.experiment_id = self.client.get_run(self.outer_run_id).info.experiment_id
        else:
            self.experiment_id = _set_experiment(experiment)
        self._mark_experiment()
        self._stop_heartbeat = threading.Event()

    def _mark_experiment(self) -> None:
        """Tell MLflow 3's UI this experiment is model development, not GenAI: without the tag it opens
        on a traces overview and lists pipeline runs as evaluations. A kind already set is kept."""
        from mlflow.exceptions import MlflowException

        if EXPERIMENT_KIND in self.client.get_experiment(self.experiment_id).tags:
            return
        try:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
        except MlflowException:  # a pipeline started at the same moment set it first (sqlite: UNIQUE failed)
            if EXPERIMENT_KIND not in self.client.get_experiment(self.experiment_id).tags:
                raise

    def registered_version(self, uri: str) -> tuple[str, str] | None:
        """(name, version) a ``models:/`` URI names in the registry now; None for another URI.

        ``models:/name/3``, ``models:/name@alias`` and ``models:/name/latest``; a logged model
        (``models:/m-...``) or a ``runs:/`` URI is no registry version."""
        from mlflow.exceptions import MlflowException

        if not uri.startswith("models:/"):
            return None
        name, _, rest = uri[len("models:/") :].partition("/")
        try:
            if "@" in name:
                name, _, alias = name.partition("@")
                return name, str(self.client.get_model_version_by_alias(name, alias).version)
            version = rest.split("/", 1)[0]
            if version.isdigit():
                return name, version
            if version == "latest":
                found = self.client.search_model_versions(f"name = '{name}'")
                return (name, str(max(int(mv.version) for mv in found))) if found else None
        except MlflowException:
            return None  # download_onnx says what is wrong with the URI
        return None

    def step_tracker(self, run_id: str) -> StepTracker:
        return StepTracker(self.client, run_id)

    def close_abandoned(self) -> list[str]:
        """Close the runs of this experiment left RUNNING by an int8pipe process that is gone.

        A run whose process lives in this PID namespace of this host is checked directly (pid and
        start time); any other (another host, or another container with the same hostname) is
        abandoned when its pipeline's heartbeat is older than ``STALE_AFTER_S``. Returns the run ids
        closed (as KILLED).
        """
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        )
        by_id = {r.info.run_id: r for r in runs}
        host, now, closed = socket.gethostname(), time.time(), []
        for run in runs:
            tags = run.data.tags
            if HOST_TAG not in tags or run.info.run_id == self.outer_run_id:
                continue
            if same_pid_namespace(tags):
                gone = not alive(tags.get(PID_TAG, ""))
            else:
                parent = by_id.get(tags.get("mlflow.parentRunId", ""), run)
                beat = float(parent.data.tags.get(HEARTBEAT_TAG, tags.get(HEARTBEAT_TAG, "0")))
                gone = now - beat > STALE_AFTER_S
            if gone:
                self.client.set_tag(run.info.run_id, CLOSED_BY_TAG, f"{host}:{os.getpid()} (owner gone)")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        if closed:
            logger.warning("closed %d run(s) left RUNNING by an int8pipe process that is gone: %s", len(closed), closed)
        return closed

    def _heartbeat(self, run_id: str) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                self.client.set_tag(run_id, HEARTBEAT_TAG, repr(time.time()))
            except Exception:  # an outage: the run itself reports it; the heartbeat just skips a beat
                logger.debug("heartbeat for run %s failed", run_id)

    @contextmanager
    def parent_run(self, name: str, resolved_config: dict[str, Any], run_name: str | None = None) -> Iterator[str]:
        """The pipeline's run (or a sweep's), nested under ``self.under`` when set; ``name`` is the
        pipeline's name (tag ``int8pipe.pipeline``), ``run_name`` what the runs table shows."""
        if self.under:
            created = self.client.create_run(
                self.experiment_id, run_name=run_name or name, tags={"mlflow.parentRunId": self.under}
            )
            run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        elif self.outer_run_id:
            run = mlflow.start_run(run_id=self.outer_run_id)
            self.client.set_tag(run.info.run_id, "mlflow.runName", run_name or name)
        else:
            run = mlflow.start_run(run_name=run_name or name, experiment_id=self.experiment_id)
        run_id = run.info.run_id
        try:
            # from here on a signal or error ends the run (KILLED/FAILED), even while it is being set up
            with closing(lambda status: mlflow.end_run(status=status)):
                self.client.set_tag(run_id, PIPELINE_TAG, name)
                for key, value in owner_tags().items():
                    self.client.set_tag(run_id, key, value)
                threading.Thread(target=self._heartbeat, args=(run_id,), daemon=True).start()
                with tempfile.TemporaryDirectory() as tmp:
                    cfg_path = Path(tmp) / "pipeline.resolved.json"
                    cfg_path.write_text(json.dumps(resolved_config, indent=2))
                    self.client.log_artifact(run_id, str(cfg_path), "config")
                params: dict[str, str] = {}
                flatten_params("", resolved_config, params)
                mlflow.log_params({key: value[:6000] for key, value in params.items()})
                yield run_id
        finally:
            self._stop_heartbeat.set()

    @contextmanager
    def reopen_parent(self, run_id: str, resolved_config: dict[str, Any]) -> Iterator[str]:
        """An earlier pipeline run, resumed to take one more step run (``--only``).

        Its status is put back as it was when the block ends normally, FAILED if the block fails
        (KILLED on a signal). Params it lacks are added; MLflow keeps a logged param's first value.
        """
        before = self.client.get_run(run_id)
        run = mlflow.start_run(run_id=run_id)
        try:
            with closing(lambda status: mlflow.end_run(status=before.info.status if status == "FINISHED" else status)):
                for key, value in owner_tags().items():
                    self.client.set_tag(run.info.run_id, key, value)
                threading.Thread(target=self._heartbeat, args=(run_id,), daemon=True).start()
                params: dict[str, str] = {}
                flatten_params("", resolved_config, params)
                new = {k: v[:6000] for k, v in params.items() if k not in before.data.params}
                if new:
                    mlflow.log_params(new)
                yield run_id
        finally:
            self._stop_heartbeat.set()

    def finished_runs(self, step: str, cache_key: str, max_results: int = 10) -> list[Run]:
        """Finished runs of ``step`` with ``cache_key``, newest first."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{cache_key}' and tags.`{STEP_TAG}` = '{step}' "
            "and attributes.status = 'FINISHED'",
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )

    def finished_children(self, parent: str) -> dict[tuple[str, str], str]:
        """(step, cache key) -> run id of the finished step runs under ``parent`` (newest wins)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        return {(r.data.tags[STEP_TAG], r.data.tags[KEY_TAG]): r.info.run_id for r in runs if STEP_TAG in r.data.tags}

    @contextmanager
    def child_run(self, step: str, cache_key: str) -> Iterator[StepTracker]:
        parent = mlflow.active_run()
        assert parent is not None
        # Created explicitly: under `mlflow run`, start_run() without a run id would resume the
        # outer run named by MLFLOW_RUN_ID instead of creating a child.
        created = self.client.create_run(
            self.experiment_id,
            run_name=step,
            tags={STEP_TAG: step, KEY_TAG: cache_key, "mlflow.parentRunId": parent.info.run_id, **owner_tags()},
        )
        run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        with closing(lambda status: mlflow.end_run(status=status)):
            yield StepTracker(self.client, run.info.run_id, parent.info.run_id)

    def find_reusable(self, step: str, cache_key: str) -> Run | None:
        runs = self.finished_runs(step, cache_key, max_results=1)
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

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def link_version_model(self, run_id: str, name: str, version: str) -> str | None:
        """Record the logged model behind registry version ``name``/``version`` as an output of
        ``run_id`` (the pipeline run; the promote step's run logged it). MLflow 3's UI counts a run
        with a model output as a training run, one without as an evaluation, and shows the model on
        the run's page. Returns the model's id (None: the version has none, e.g. an MLflow 2 version)."""
        from mlflow.entities import LoggedModelOutput

        model_id = _logged_model_of(self.client.get_model_version(name, version))
        if model_id is None:
            return None
        run = self.client.get_run(run_id)
        if any(o.model_id == model_id for o in (run.outputs.model_outputs if run.outputs else [])):
            return model_id  # a reopened run (--only promote) already links it
        self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        return model_id

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def child_named(self, parent: str, name: str) -> str | None:
        """The run named ``name`` nested under ``parent`` (a sweep's trial), if one was created."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
        return next((r.info.run_id for r in runs if r.data.tags.get("mlflow.runName") == name), None)

    def close_stopped(self, run_id: str, status: str, grace_s: float) -> None:
        """Give a stopped process ``grace_s`` to close its run, then close with ``status`` the run and
        its nested runs still RUNNING (the process is gone or going: nobody else will)."""
        deadline = time.monotonic() + grace_s
        try:
            while self.client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:  # even on a second Ctrl-C during the wait
            for step in self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"):
                if step.info.status == "RUNNING":
                    self.client.set_terminated(step.info.run_id, status=status)
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status=status)

    def fail_run(self, run_id: str, reason: str) -> None:
        """End ``run_id`` FAILED with ``reason`` in its error tag."""
        self.client.set_tag(run_id, ERROR_TAG, reason[:5000])
        self.client.set_terminated(run_id, status="FAILED")

    def log_parent_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        if metrics:
            logger.debug("copied to the pipeline run: %s", ", ".join(sorted(metrics)))


def default_uri() -> str:
    """The tracking URI MLflow uses when none is given (``MLFLOW_TRACKING_URI``, else its default).
    It may hold credentials: print it only through :func:`pipeline.mlflow_io.store.redacted`."""
    return str(mlflow.get_tracking_uri())


def quiet_downloads() -> None:
    """No tqdm bar per artifact download (a sweep's log printed 19), unless the user asked for them."""
    os.environ.setdefault(PROGRESS_BAR_ENV, HTTP_DEFAULTS[PROGRESS_BAR_ENV])


def download_artifact(uri: str, tracking_uri: str | None) -> str:
    """A ``runs:/`` artifact as a local path (in a new temporary folder); FileNotFoundError with
    MLflow's first line when the run or the artifact does not exist."""
    from mlflow.exceptions import MlflowException

    tracking_uri = adopt_credentials(tracking_uri or default_uri())  # MLflow's errors quote the server's URL
    quiet_downloads()
    try:
        return str(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(), tracking_uri=tracking_uri))
    except MlflowException as exc:
        raise FileNotFoundError(str(exc).splitlines()[0][:200]) from exc


def download_onnx(uri: str, dst: Path, tracking_uri: str) -> Path:
    """Download an ONNX-flavour MLflow model (models:/ or runs:/) and return its .onnx file."""
    import yaml

    from pipeline.errors import ModelError, fail

    quiet_downloads()
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
