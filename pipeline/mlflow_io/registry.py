"""Promotion into the MLflow Model Registry: what the registry says is true, and what it holds loads.

- A version is complete or absent: it is created with its tags and description in one call.
- The alias moves under a registry-wide lock, so concurrent pipelines cannot overwrite a better
  holder with a stale decision; policy ``better`` moves it only when the new version scores at least
  as well as the holder on the same validation data and metric.
- The caller reports the alias as it stands after the lock is released, never as it meant it to be.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline.errors import TrackingError, fail
from pipeline.execution import runtime
from pipeline.graph import emulation
from pipeline.graph import model as onnx_model
from pipeline.log import logger
from pipeline.tag_names import (
    DATA_TAG,
    DECISION_TAG,
    EVIDENCE_TAG,
    GATE_TAG,
    INCOMPLETE_TAG,
    INT8_SHA256_TAG,
    METRIC_TAG,
    VALUE_TAG,
)

LOCK_SUFFIX = ".int8pipe-lock"
LOCK_LEASE_S = 120.0  # a lock older than this was left by a process that died; it is broken
LOCK_TIMEOUT_S = 300.0
# what makes two versions the same: the INT8 model's bytes and the evidence its gate passed on
IDENTITY_TAGS = (INT8_SHA256_TAG, GATE_TAG, METRIC_TAG, VALUE_TAG, DATA_TAG)


@dataclass
class Score:
    """A version's validated metric and the data it was measured on: comparable only as a whole."""

    metric: str
    value: float
    data_digest: str

    def tags(self) -> dict[str, str]:
        return {METRIC_TAG: self.metric, VALUE_TAG: repr(self.value), DATA_TAG: self.data_digest}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Score | None:
        try:
            return cls(tags[METRIC_TAG], float(tags[VALUE_TAG]), tags[DATA_TAG])
        except (KeyError, ValueError):
            return None


def _already_exists(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc).lower()


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if not _already_exists(exc):
            raise


@contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Mutual exclusion between promotions of one registered model, through the tracking server.

    MLflow has no compare-and-set on aliases, but creating a registered model is atomic (the name
    is unique), so a registered model ``<name>.int8pipe-lock`` is the lock. A lock older than
    ``LOCK_LEASE_S`` belonged to a process that died and is broken.
    """
    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": owner, "acquired": repr(time.time())},
                description=f"int8pipe: held while a pipeline decides the aliases of '{name}'. "
                "Deleted when it is done; safe to delete when no int8pipe is promoting.",
            )
            break
        except MlflowException as exc:
            if not _already_exists(exc):
                raise
        try:
            held = client.get_registered_model(lock)
            age = time.time() - float(held.tags.get("acquired", "0"))
            if age > LOCK_LEASE_S:
                logger.warning("promote: breaking a registry lock held for %.0fs by %s", age, held.tags.get("owner"))
                client.delete_registered_model(lock)
                continue
        except MlflowException:
            continue  # released between our two calls
        if time.monotonic() > deadline:
            fail(
                TrackingError,
                f"promote: the registry lock {lock!r} is still held after {timeout_s:.0f}s, by "
                f"{held.tags.get('owner', 'an unknown process')} for {age:.0f}s: another int8pipe is promoting "
                f"{name!r}. Run again when it is done (finished steps are reused); a lock older than "
                f"{LOCK_LEASE_S:.0f}s is broken, or delete the registered model {lock!r} if no int8pipe is running.",
            )
        time.sleep(random.uniform(0.1, 0.4))
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            logger.warning("promote: could not release the registry lock %r; it expires in %.0fs", lock, LOCK_LEASE_S)


def _session_options(model: onnx.ModelProto) -> dict[str, Any]:
    """What MLflow's pyfunc must hand ONNX Runtime for ``model`` (runtime.NARROW_FLOAT_SESSION_CONFIG)."""
    if not emulation.has_narrow_floats(model):
        return {}
    return {"onnx_session_options": {"extra_session_config": dict(runtime.NARROW_FLOAT_SESSION_CONFIG)}}


def mark_incomplete_versions(client: MlflowClient, name: str) -> list[str]:
    """Tag versions without int8pipe's gate tag: left by an interrupted promotion of an older int8pipe,
    or registered by hand. They are never alias candidates; returns their version numbers."""
    marked = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        if GATE_TAG in tags or INCOMPLETE_TAG in tags:
            continue
        client.set_model_version_tag(
            name,
            mv.version,
            INCOMPLETE_TAG,
            "no int8pipe gate or metric tags: not validated by int8pipe, never given an alias by it",
        )
        marked.append(str(mv.version))
    if marked:
        logger.warning("promote: %s version(s) %s carry no validation tags; marked incomplete", name, marked)
    return marked


def holder(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(new: Score | None, current: Any | None, policy: str) -> tuple[bool, str]:
    """Whether the alias moves to the new version, and why (as tagged on the version)."""
    if new is None:
        return False, "not validated"
    if policy == "always" or current is None:
        return True, "moved: " + ("policy always" if current is not None else "no previous holder")
    old = Score.from_tags(current.tags or {})
    if old is None:
        return True, f"moved: v{current.version} carries no int8pipe score to compare with"
    if (old.metric, old.data_digest) != (new.metric, new.data_digest):
        return True, (
            f"moved: v{current.version} was scored with {old.metric} on other validation data; "
            "policy better compares only like with like"
        )
    if new.value >= old.value:
        return True, f"moved: {new.metric} {new.value:.6g} >= v{current.version}'s {old.value:.6g}"
    return False, f"stayed on v{current.version}: its {old.metric} {old.value:.6g} > this version's {new.value:.6g}"


def attach_evidence(client: MlflowClient, model_id: str, evidence: list[tuple[str, str, str, str]]) -> dict[str, str]:
    """Copy each run artifact into the logged model's ``evidence/`` folder (the model page lists it);
    returns name -> ``runs:/`` URI of the pieces copied."""
    attached = {}
    with tempfile.TemporaryDirectory(prefix="int8pipe-evidence-") as tmp:
        folder = Path(tmp) / "evidence"
        folder.mkdir()
        for name, run_id, path, file in evidence:
            try:
                local = client.download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError) as exc:
                logger.warning("promote: %s (runs:/%s/%s) not found, not attached: %s", name, run_id, path, exc)
                continue
            shutil.move(local, folder / file)
            attached[name] = f"runs:/{run_id}/{path}"
        if attached:
            client.log_model_artifacts(model_id, str(folder), "evidence")
    return attached


# The distributions that install the ``onnxruntime`` module, most specific first: a model promoted
# on a GPU host must not tell its server to install the CPU package.
ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime")


def serving_requirements() -> list[str]:
    """What ``mlflow.onnx``/pyfunc needs to load the model, pinned to the versions installed here.

    MLflow infers the same list when it is not given, by loading the model in a subprocess and
    scanning every installed distribution: seconds per promotion. MLflow adds its own pin."""
    ort = next((d for d in ORT_DISTRIBUTIONS if _version(d)), "onnxruntime")
    return [f"{d}=={v}" for d in ("numpy", "onnx", ort) if (v := _version(d))]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def identical_version(client: MlflowClient, name: str, tags: dict[str, str]) -> str | None:
    """The oldest complete version of ``name`` with the same INT8 model and gate evidence (IDENTITY_TAGS)
    as ``tags``, or None: an unchanged rerun reuses it instead of registering a byte-identical copy."""
    want = {k: tags.get(k) for k in IDENTITY_TAGS}
    if want[INT8_SHA256_TAG] is None:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:  # no such registered model yet
        return None
    for mv in sorted(versions, key=lambda v: int(v.version)):
        have = mv.tags or {}
        if mv.status == "READY" and INCOMPLETE_TAG not in have and all(have.get(k) == v for k, v in want.items()):
            return str(mv.version)
    return None


def promote_model(
    client: MlflowClient,
    run_id: str,
    *,
    model: onnx.ModelProto,
    input_example: Any,
    registered_model: str,
    alias: str | None,
    policy: str,
    score: Score | None,
    tags: dict[str, str],
    description: str,
    metrics: dict[str, float],
    evidence: list[tuple[str, str, str, str]] | None = None,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Log ``model`` under ``run_id``, register it complete, decide the alias; returns what the
    registry holds afterwards: name, version, alias (None unless this version holds it), decision.

    ``evidence`` (name, run id, artifact path, file name) is copied into the logged model's
    ``evidence/`` folder, tagged on the version as ``int8pipe.evidence.<name>`` = its ``runs:/`` URI
    and listed in the description; a piece that cannot be fetched is left out with a warning."""
    reused = identical_version(client, registered_model, {**tags, **(score.tags() if score else {})})
    if reused is not None:
        logger.info(
            "promote: %s version %s holds this very INT8 model (same SHA-256, gate and validation data): "
            "reused, not registered again",
            registered_model,
            reused,
        )
        return _decide_alias(client, registered_model, reused, alias, policy, score, reused=True)
    info = mlflow.onnx.log_model(
        onnx_model=model,
        name="model",
        signature=signature(model),
        input_example=input_example,
        save_as_external_data=False,
        pip_requirements=serving_requirements(),
        # what the model is served with; MLflow's default (CUDA first) warns on every CPU load
        onnx_execution_providers=providers or ["CUDAExecutionProvider", "CPUExecutionProvider"],
        **_session_options(model),
    )
    for key, metric in metrics.items():  # linked to the LoggedModel, so the model page shows them
        mlflow.log_metric(key, metric, model_id=info.model_id, run_id=run_id)
    attached = attach_evidence(client, info.model_id, evidence or [])
    if attached:
        description += "\n\nEvidence (also attached to this version's model, folder `evidence/`):\n" + "\n".join(
            f"- {name}: `{uri}`" for name, uri in attached.items()
        )
    ensure_registered_model(client, registered_model)
    all_tags = {**tags, **{f"{EVIDENCE_TAG}.{k}": v for k, v in attached.items()}, **(score.tags() if score else {})}
    mv = client.create_model_version(
        registered_model,
        source=info.model_uri,
        run_id=run_id,
        tags=all_tags,
        description=description,
        model_id=info.model_id,
    )
    version = str(mv.version)
    logger.info("promote: registered %s version %s", registered_model, version)
    return _decide_alias(client, registered_model, version, alias, policy, score, reused=False)


def _decide_alias(
    client: MlflowClient,
    registered_model: str,
    version: str,
    alias: str | None,
    policy: str,
    score: Score | None,
    reused: bool,
) -> dict[str, Any]:
    """Move ``alias`` to ``version`` if the policy allows; what the registry holds afterwards."""
    decision = "no alias requested"
    if alias:
        with registry_lock(client, registered_model):
            mark_incomplete_versions(client, registered_model)
            current = holder(client, registered_model, alias)
            if current is not None and str(current.version) == version:
                current = None
            move, decision = decide(score, current, policy)
            if move:
                client.set_registered_model_alias(registered_model, alias, version)
            client.set_model_version_tag(registered_model, version, DECISION_TAG, f"@{alias} {decision}")
    now = holder(client, registered_model, alias) if alias else None
    held = alias if now is not None and str(now.version) == version else None
    return {
        "name": registered_model,
        "version": version,
        "alias": held,
        "alias_version": str(now.version) if now is not None else None,
        "decision": decision,
        "reused": reused,
    }


def signature(model: onnx.ModelProto) -> ModelSignature:
    """The tensor signature straight from the graph: dynamic axes become -1."""

    def specs(vis: list) -> Schema:
        out: list[Any] = []
        for vi in vis:
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            out.append(TensorSpec(dtype, shape, vi.name))
        return Schema(out)

    return ModelSignature(inputs=specs(onnx_model.graph_inputs(model)), outputs=specs(list(model.graph.output)))
