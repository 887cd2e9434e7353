"""Promotion into the MLflow Model Registry: what the registry says is true, and what it holds loads.

- A version is complete or absent: it is created with its tags and description in one call.
- The alias is a function of the complete versions (:func:`choose`), and every promoting process
  writes it until it reads it back unchanged (:func:`settle_alias`): no lock, no lease, no clock, so
  concurrent pipelines end on the best version whatever their timing (the argument is there).
- int8pipe creates only the registered model the YAML names and its own versions; it never deletes
  or renames a registered model or a version (it tags versions: its own, and hand-registered ones as
  incomplete).
- The caller reports the alias as it read it after its last write, never as it meant it to be.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import tempfile
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
    ALIAS_TAG,
    DATA_TAG,
    DECISION_TAG,
    GATE_TAG,
    INCOMPLETE_TAG,
    INT8_SHA256_TAG,
    METRIC_TAG,
    POLICY_TAG,
    PROMOTION_TAG,
    VALUE_TAG,
    WITHDRAWN_TAG,
)

NO_ALIAS = "(none)"  # the alias of a version registered without one: no MLflow alias can be spelled so
# What the promotion logic reads on a version besides its score tags, kept in one JSON tag
# (PROMOTION_TAG) so that the version page shows the few tags people filter on. Versions registered
# before it carry each fact under its own tag; existing registries hold them, so both are read.
FACTS = {"int8_sha256": INT8_SHA256_TAG, "validation_digest": DATA_TAG, "alias": ALIAS_TAG, "policy": POLICY_TAG}
# Rounds of settle_alias before it gives up. Once no version is being registered, every process stops
# within a few rounds (a stale write already decided, the right one, the read that confirms it); more
# means registrations keep arriving.
SETTLE_ROUNDS = 20


@dataclass
class Score:
    """A version's validated metric and the data it was measured on: comparable only as a whole."""

    metric: str
    value: float
    data_digest: str

    def tags(self) -> dict[str, str]:
        """The two a person filters on; the data digest goes into PROMOTION_TAG (:func:`version_tags`)."""
        return {METRIC_TAG: self.metric, VALUE_TAG: repr(self.value)}

    def comparable(self, other: Score) -> bool:
        return (self.metric, self.data_digest) == (other.metric, other.data_digest)

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Score | None:
        try:
            return cls(tags[METRIC_TAG], float(tags[VALUE_TAG]), facts(tags)["validation_digest"])
        except (KeyError, ValueError):
            return None


def facts(tags: dict[str, str]) -> dict[str, str]:
    """The FACTS a version records, from PROMOTION_TAG or the separate tags of the previous layout.
    A fact missing from both is missing here (a version of an older int8pipe has no alias: see
    :func:`candidate`); unreadable JSON reads as no facts, which makes the version no candidate."""
    try:
        found = json.loads(tags.get(PROMOTION_TAG) or "{}")
    except ValueError:
        found = {}
    found = found if isinstance(found, dict) else {}
    return {k: str(found[k]) if k in found else tags[old] for k, old in FACTS.items() if k in found or old in tags}


def version_tags(int8_sha256: str, score: Score | None, alias: str | None, policy: str) -> dict[str, str]:
    """What the promotion logic reads on a version, as created: the score (metric and value, which
    people filter on too) and PROMOTION_TAG: the INT8 model's bytes, the data the score was measured
    on, the alias the version competes for and the policy that chooses the alias's version while it
    is the newest (see :func:`choose`)."""
    found = {"alias": alias or NO_ALIAS, "policy": policy, "int8_sha256": int8_sha256}
    if score is not None:
        found["validation_digest"] = score.data_digest
    return {**(score.tags() if score else {}), PROMOTION_TAG: json.dumps(found)}


def identity(tags: dict[str, str]) -> tuple[str | None, ...] | None:
    """What makes two versions the same: the INT8 model's bytes, the evidence its gate passed on, and
    what its promotion asked for; None without the model's SHA-256 (nothing to be the same as)."""
    found = facts(tags)
    if "int8_sha256" not in found:
        return None
    score = (tags.get(GATE_TAG), tags.get(METRIC_TAG), tags.get(VALUE_TAG), found.get("validation_digest"))
    return (found["int8_sha256"], *score, found.get("alias"), found.get("policy"))


@dataclass(frozen=True)
class Candidate:
    """A complete version competing for an alias."""

    version: int
    score: Score
    policy: str


def _already_exists(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc).lower()


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if not _already_exists(exc):
            raise


def all_versions(client: MlflowClient, name: str) -> list[Any]:
    """Every version of ``name`` (none when the registered model does not exist yet), page by page."""
    versions: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions += page
        token = page.token
        if not token:
            return versions


def candidate(mv: Any, alias: str) -> Candidate | None:
    """``mv`` as a candidate for ``alias``, or None: a complete version (created with its tags in one
    call, READY) whose gate passed with a finite score, that competes for this alias and that nobody
    marked incomplete or withdrawn. A version without an alias fact was registered before int8pipe
    recorded it, when any int8pipe promotion could give it the alias: it competes for every alias."""
    tags = mv.tags or {}
    if mv.status != "READY" or tags.get(GATE_TAG) != "passed":
        return None
    found = facts(tags)
    if INCOMPLETE_TAG in tags or WITHDRAWN_TAG in tags or found.get("alias", alias) != alias:
        return None
    score = Score.from_tags(tags)
    if score is None or not math.isfinite(score.value):  # NaN compares neither way: no order to agree on
        return None
    return Candidate(int(mv.version), score, "always" if found.get("policy") == "always" else "better")


def candidates(client: MlflowClient, name: str, alias: str) -> list[Candidate]:
    return sorted((c for mv in all_versions(client, name) if (c := candidate(mv, alias))), key=lambda c: c.version)


def choose(cands: list[Candidate]) -> Candidate | None:
    """The version the alias belongs on, computed from the candidates alone, so that every process
    that reads the same candidates chooses the same version.

    The newest candidate (the highest version number: the store's own counter, the one order every
    process agrees on without a clock) says how, by its policy and by what it was scored on:

    - ``always``: the newest candidate itself; the last version registered wins.
    - ``better``: the best score among the candidates scored with the newest one's metric on the
      same validation data. Equal scores go to the newer version (at least as good takes the alias).
      Candidates scored otherwise cannot be compared and wait until a newer version is scored like
      them.
    """
    if not cands:
        return None
    newest = max(cands, key=lambda c: c.version)
    if newest.policy == "always":
        return newest
    rivals = [c for c in cands if c.score.comparable(newest.score)]
    return max(rivals, key=lambda c: (c.score.value, c.version))


def holder(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` stands on now, or None when it stands on none."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        # MLflow answers a missing alias with INVALID_PARAMETER_VALUE, a missing model with
        # RESOURCE_DOES_NOT_EXIST; anything else (an outage) is not an answer
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


@dataclass
class Settled:
    """How a promotion left the alias: the choice, and the holder as read after its last write."""

    choice: Candidate | None
    holder: str | None
    candidates: list[Candidate]


def settle_alias(client: MlflowClient, name: str, alias: str) -> Settled:
    """Write ``alias`` until it stands on ``choose(candidates)`` as read after the last write.

    MLflow has no compare-and-set, so a lock or lease built on it is unsafe against a slow process or
    a skewed clock. Instead the alias's version is a function of the registry's contents
    (:func:`choose`), and every process that registered or reused a version runs::

        repeat: h = the alias's holder; then S = the candidates (complete versions competing for it);
                if h == choose(S): stop and report h; else set the alias to choose(S).

    Complete: created by one ``create_model_version`` call carrying the gate, score and promotion
    (alias, policy) tags. The store writes a version and its tags in one transaction, so a reader sees
    the whole version or none; nothing becomes a candidate later.

    Invariant: once the processes have stopped, the alias stands on ``choose(U)``, U the candidates
    then, whatever the interleaving. Let c be the moment the last version of U became complete, and Q
    the process that registered it. Q's rounds all start after c, so its last round read a holder h
    after c and then exactly U (nothing completes after c, and int8pipe deletes nothing), and Q
    stopped because h == choose(U). If nobody writes after Q's read of h, the alias is still h.
    Otherwise take W, the last write of all, by P: it follows c. Every write is followed by a round
    of its writer, so P read the holder after W (W's value: no write follows W) and then the
    candidates (U), and stopped only because W's value is choose(U); had it not been, P would have
    written again, after W. Either way the alias ends on choose(U).

    Nothing is timed, so slow processes and skewed clocks change only when the end comes. A slow
    process can write a stale choice (read before a better version completed); its next round puts
    the right one back before it stops, so the alias can sit on an older choice for that window,
    never at the end. The argument needs every writer to live through the round after its write,
    and Q through one round: a process killed in between can leave the alias stale until the next
    promotion of that model, which corrects it whatever its own score. Outside it too: a write the
    server applies after the client gave up on it, and versions deleted or retagged meanwhile.
    """
    for _ in range(SETTLE_ROUNDS):
        # the holder first: a choice computed from candidates read later is never older than what it replaces
        now = holder(client, name, alias)
        cands = candidates(client, name, alias)
        chosen = choose(cands)
        if chosen is None or now == str(chosen.version):
            return Settled(chosen, now, cands)
        client.set_registered_model_alias(name, alias, str(chosen.version))
    fail(
        TrackingError,
        f"promote: the alias @{alias} of {name!r} was still changing after {SETTLE_ROUNDS} rounds: other "
        "promotions keep registering versions of it. This version is registered; run again when they are "
        "done (finished steps and this version are reused) to decide the alias.",
    )


def explain(version: str, settled: Settled) -> str:
    """Why the alias stands where it does, as this version's DECISION_TAG says it."""
    own = next((c for c in settled.candidates if str(c.version) == version), None)
    chosen = settled.choice
    if own is None:
        where = f"stayed on v{settled.holder}" if settled.holder else "not given"
        return f"{where}: this version is no candidate (no passed gate with a finite score, or withdrawn)"
    assert chosen is not None  # own is a candidate
    if chosen == own:
        if own.policy == "always":
            return "on this version: policy always gives it to the newest validated version"
        rivals = sum(c.score.comparable(own.score) for c in settled.candidates)
        said = f"on this version: {own.score.metric} {own.score.value:.6g}, best of {rivals} on this validation data"
        apart = [f"v{c.version}" for c in settled.candidates if not c.score.comparable(own.score)]
        if apart:  # refreshed validation data: the earlier holders were never measured on it
            said += (
                f"; not compared with {', '.join(apart)}, scored with another metric or validation data "
                "(rerun their pipelines on this data to compare: README, The Model Registry)"
            )
        return said
    newest = max(settled.candidates, key=lambda c: c.version)
    where = f"stayed on v{chosen.version}"
    if newest.policy == "always":
        return f"{where}: policy always of the newest validated version, v{newest.version}, gives it the alias"
    if not own.score.comparable(newest.score):
        return (
            f"{where}: the newest version v{newest.version} was scored with {newest.score.metric} on validation "
            f"data {newest.score.data_digest[:12]}, this one with {own.score.metric} on "
            f"{own.score.data_digest[:12]}; policy better compares only like with like"
        )
    if chosen.score.value > own.score.value:
        return f"{where}: its {own.score.metric} {chosen.score.value:.6g} > this version's {own.score.value:.6g}"
    return f"{where}: an equal {own.score.metric} {own.score.value:.6g} on a newer version"


def _session_options(model: onnx.ModelProto) -> dict[str, Any]:
    """What MLflow's pyfunc must hand ONNX Runtime for ``model`` (runtime.NARROW_FLOAT_SESSION_CONFIG)."""
    if not emulation.has_narrow_floats(model):
        return {}
    return {"onnx_session_options": {"extra_session_config": dict(runtime.NARROW_FLOAT_SESSION_CONFIG)}}


def mark_incomplete_versions(client: MlflowClient, name: str) -> list[str]:
    """Tag versions without int8pipe's gate tag: left by an interrupted promotion of an older int8pipe,
    or registered by hand. They are never alias candidates; returns their version numbers."""
    marked = []
    for mv in all_versions(client, name):
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


def identical_version(versions: list[Any], tags: dict[str, str]) -> Any | None:
    """The oldest complete version with the same INT8 model, gate evidence and request (:func:`identity`)
    as ``tags``, or None. A version of the previous tag layout is the same as its rerun's request."""
    want = identity(tags)
    if want is None:
        return None
    for mv in sorted(versions, key=lambda v: int(v.version)):
        have = mv.tags or {}
        if mv.status == "READY" and INCOMPLETE_TAG not in have and identity(have) == want:
            return mv
    return None


def reusable_version(client: MlflowClient, name: str, tags: dict[str, str]) -> str | None:
    """The version an unchanged rerun stands on instead of registering a byte-identical copy, or None.

    A copy would be the newest candidate, and the newest candidate says how the alias is chosen
    (:func:`choose`); so the original is reused only where the copy would change nothing: it is the
    newest itself, or both it and the newest are ``better`` and scored alike. A rerun of an older model
    with ``always``, or on the validation data of an older version, is registered again."""
    try:
        versions = all_versions(client, name)
    except MlflowException:  # no such registered model yet
        return None
    original = identical_version(versions, tags)
    alias = facts(tags).get("alias", NO_ALIAS)
    if original is None or alias == NO_ALIAS:
        return None if original is None else str(original.version)
    cands = [c for mv in versions if (c := candidate(mv, alias))]
    mine = next((c for c in cands if c.version == int(original.version)), None)
    if mine is None:  # withdrawn: a copy must not bring it back
        return str(original.version)
    newest = max(cands, key=lambda c: c.version)
    alike = newest == mine or (mine.policy == newest.policy == "better" and newest.score.comparable(mine.score))
    return str(original.version) if alike else None


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
    int8_sha256: str,
    tags: dict[str, str],
    description: str,
    metrics: dict[str, float],
    evidence: list[tuple[str, str, str, str]] | None = None,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Log ``model`` under ``run_id``, register it complete, settle the alias; returns what the
    registry holds afterwards: name, version, alias (None unless this version holds it),
    alias_version (where the alias stands), decision, reused.

    ``tags`` are the ones people filter on (the gate among them); the version also gets
    :func:`version_tags`. ``evidence`` (name, run id, artifact path, file name) is copied into the
    logged model's ``evidence/`` folder and its ``runs:/`` URI listed in the description; a piece that
    cannot be fetched is left out with a warning."""
    all_tags = {**tags, **version_tags(int8_sha256, score, alias, policy)}
    reused = reusable_version(client, registered_model, all_tags)
    if reused is not None:
        logger.info(
            "promote: %s version %s holds this very INT8 model (same SHA-256, gate, validation data and "
            "promotion request): reused, not registered again",
            registered_model,
            reused,
        )
        return _decide_alias(client, registered_model, reused, alias, reused=True)
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
    mv = client.create_model_version(  # complete in one call: see settle_alias
        registered_model,
        source=info.model_uri,
        run_id=run_id,
        tags=all_tags,
        description=description,
        model_id=info.model_id,
    )
    version = str(mv.version)
    logger.info("promote: registered %s version %s", registered_model, version)
    return _decide_alias(client, registered_model, version, alias, reused=False)


def _decide_alias(
    client: MlflowClient, registered_model: str, version: str, alias: str | None, reused: bool
) -> dict[str, Any]:
    """Settle ``alias``, tag ``version`` with why it stands where it does; what the registry holds."""
    result: dict[str, Any] = {
        "name": registered_model,
        "version": version,
        "alias": None,
        "alias_version": None,
        "decision": "no alias requested",
        "reused": reused,
    }
    if not alias:
        return result
    mark_incomplete_versions(client, registered_model)
    settled = settle_alias(client, registered_model, alias)
    decision = explain(version, settled)
    client.set_model_version_tag(registered_model, version, DECISION_TAG, f"@{alias} {decision}")
    held = alias if settled.holder == version else None
    return {**result, "alias": held, "alias_version": settled.holder, "decision": decision}


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
