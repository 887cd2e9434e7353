"""What the registry holds is loadable, current and the best: issue-level behaviour of promotion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.errors import TrackingError
from pipeline.mlflow_io import names, registry
from pipeline.orchestration.cli import main
from pipeline.tag_names import ALIAS_TAG, DATA_TAG, INT8_SHA256_TAG, METRIC_TAG, POLICY_TAG, PROMOTION_TAG, VALUE_TAG
from tests.conftest import env_without_mlflow, run_args, run_pipeline


def _drop_benchmark(folder: Path) -> Path:
    path = folder / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"].pop("benchmark")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _edit(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("steps.quantize.target=onnxruntime",),
        ('steps.quantize.exclude.nodes=["/features/features.0/Conv"]',),
    ],
    ids=["tensorrt", "onnxruntime", "exclusion"],
)
def test_registered_model_loads_with_both_loaders(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    config = _drop_benchmark(digits_copy)
    s = run_pipeline(config, tracking_uri, tmp_path, *overrides)
    assert s["registered_model"]["alias"] == "candidate"
    mlflow.set_tracking_uri(tracking_uri)
    uri = "models:/digits-int8@candidate"

    model = mlflow.onnx.load_model(uri)  # runs the ONNX checker
    onnx.checker.check_model(model, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)

    samples_dir = mlflow.artifacts.download_artifacts(run_id=s["steps"]["validate"], artifact_path="validation")
    with np.load(Path(samples_dir) / "samples.npz") as z:
        inputs = {"input": z["input.input"]}
        int8_validated = z["int8.logits"]
    # the registered bytes, run as validate ran them (int8pipe's sessions round through FP16 explicitly
    # where ORT's CPU provider would drop the roundings), give validate's INT8 outputs exactly
    from pipeline.execution import runtime

    exact = "steps.quantize.target=onnxruntime" not in overrides
    sess = runtime.session(model.SerializeToString(), optimize=not exact)
    np.testing.assert_array_equal(sess.run(["logits"], inputs)[0], int8_validated)

    # it declares only providers this ONNX Runtime has: loading it here warns about none
    import onnxruntime

    declared = mlflow.models.get_model_info(uri).flavors["onnx"]["providers"]
    assert declared and set(declared) <= set(onnxruntime.get_available_providers())
    pyfunc = mlflow.pyfunc.load_model(uri)
    # a model server installs what the model declares: this environment's packages, pinned
    reqs = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path))).read_text()
    import importlib.metadata as md

    pinned = [f"{d}=={md.version(d)}" for d in ("mlflow", "numpy", "onnx", "onnxruntime")]
    assert sorted(reqs.split()) == pinned
    example = pyfunc.input_example
    assert set(example) == {"input"} and example["input"].shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(example["input"], inputs["input"][:1])  # a real validation sample
    out = pyfunc.predict(inputs)["logits"]
    # pyfunc runs ORT's fused int8 kernels: the same classes, values within INT8 rounding
    assert (out.argmax(1) == int8_validated.argmax(1)).all()
    np.testing.assert_allclose(out, int8_validated, atol=0.05 * np.abs(int8_validated).max())


def _python_source(folder: Path, deps: bool) -> Path:
    (folder / "caldata.py").write_text(
        "from pathlib import Path\n"
        "import numpy as np\n"
        "CALLS = Path(__file__).with_name('calls.txt')\n"
        "def batches(path):\n"
        "    CALLS.write_text(CALLS.read_text() + 'x' if CALLS.exists() else 'x')\n"
        "    with np.load(Path(__file__).with_name(path)) as z:\n"
        "        x = z['input']\n"
        "    for i in range(0, len(x), 128):\n"
        "        yield {'input': x[i : i + 128]}\n"
    )
    with np.load(folder / "data" / "calibration.npz") as z:
        np.savez(folder / "cal.npz", input=z["input"][:512])
    config = _drop_benchmark(folder)

    def use(cfg: dict) -> None:
        cfg["data"]["calibration"] = {"python": "caldata:batches", "args": {"path": "cal.npz"}}
        if deps:
            cfg["data"]["calibration"]["deps"] = ["cal.npz"]

    _edit(config, use)
    return config


def _reused(client: MlflowClient, run_id: str) -> bool:
    return client.get_run(run_id).data.tags.get("int8pipe.reused") == "true"


def _scale_calibration_data(folder: Path, factor: float) -> None:
    with np.load(folder / "cal.npz") as z:
        x = z["input"] * np.float32(factor)
    np.savez(folder / "cal.npz", input=x)


@pytest.mark.slow
def test_python_source_whose_data_changed_is_recalibrated(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = _python_source(digits_copy, deps=False)
    client = MlflowClient(tracking_uri)
    run_pipeline(config, tracking_uri, tmp_path)
    again = run_pipeline(config, tracking_uri, tmp_path)
    assert _reused(client, again["steps"]["calibrate"])  # unchanged samples: proven by hashing them
    _scale_calibration_data(digits_copy, 50.0)
    summary = tmp_path / "stale.json"
    assert main(run_args(config, tracking_uri, summary)) == 3  # the new data's ranges fail the gate
    stale = json.loads(summary.read_text())
    assert not _reused(client, stale["steps"]["calibrate"])
    assert stale["gate"] == "failed" and stale["registered_model"] is None
    holder = client.get_model_version_by_alias("digits-int8", "candidate")
    assert str(holder.version) == again["registered_model"]["version"]  # the alias did not move


@pytest.mark.slow
def test_python_source_with_declared_deps(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = _python_source(digits_copy, deps=True)
    client = MlflowClient(tracking_uri)
    run_pipeline(config, tracking_uri, tmp_path)
    calls = (digits_copy / "calls.txt").read_text()
    again = run_pipeline(config, tracking_uri, tmp_path)
    assert _reused(client, again["steps"]["calibrate"])
    # deps prove it: the function was called once, for the first batch the pre-run data check reads
    assert (digits_copy / "calls.txt").read_text() == calls + "x"
    with np.load(digits_copy / "cal.npz") as z:  # other samples of the same distribution
        np.savez(digits_copy / "cal.npz", input=z["input"][::-1].copy())
    changed = run_pipeline(config, tracking_uri, tmp_path)
    assert not _reused(client, changed["steps"]["calibrate"])


@pytest.mark.slow
def test_registry_source_alias_resolves_to_todays_version(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """model: {mlflow: models:/m@champion} is hashed by content: moving the alias reruns export."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fp32")
    fp32 = onnx.load(str(digits_copy / "model.onnx"))
    with mlflow.start_run():
        v1 = mlflow.onnx.log_model(fp32, name="m", registered_model_name="digits-fp32")
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("digits-fp32", "champion", str(v1.registered_model_version))
    config = _drop_benchmark(digits_copy)

    def registry_source(c: dict) -> None:
        c.update(model={"mlflow": "models:/digits-fp32@champion"})
        c["steps"].pop("promote")

    _edit(config, registry_source)
    first = run_pipeline(config, tracking_uri, tmp_path)
    assert _reused(client, run_pipeline(config, tracking_uri, tmp_path)["steps"]["export"])
    # a different model behind the same alias: the last Gemm's bias changed (log_model rewrote the
    # first proto to external data in place, so start again from the file)
    fp32 = onnx.load(str(digits_copy / "model.onnx"))
    for init in fp32.graph.initializer:
        if init.name.endswith("bias") and len(init.dims) == 1 and init.dims[0] == 10:
            arr = onnx.numpy_helper.to_array(init) + np.float32(0.5)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with mlflow.start_run():
        v2 = mlflow.onnx.log_model(fp32, name="m", registered_model_name="digits-fp32")
    client.set_registered_model_alias("digits-fp32", "champion", str(v2.registered_model_version))
    moved = run_pipeline(config, tracking_uri, tmp_path)
    assert not _reused(client, moved["steps"]["export"])
    assert moved["metrics"]["num_params"] == first["metrics"]["num_params"]


def _versions(client: MlflowClient, name: str) -> dict[str, dict[str, str]]:
    return {str(mv.version): dict(mv.tags) for mv in client.search_model_versions(f"name = '{name}'")}


@pytest.mark.slow
def test_alias_policy_better_and_always(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = _drop_benchmark(digits_copy)
    cosine = ("steps.validate.metric=cosine", "steps.validate.max_drop=0.5")
    best = run_pipeline(config, tracking_uri, tmp_path, *cosine, "steps.calibrate.method=minmax")
    # percentile 95 clips hard: a worse but gate-passing version
    worse = run_pipeline(
        config, tracking_uri, tmp_path, *cosine, "steps.calibrate.method=percentile", "steps.calibrate.percentile=95"
    )
    assert worse["metrics"]["int8_cosine"] < best["metrics"]["int8_cosine"]
    client = MlflowClient(tracking_uri)
    holder = client.get_model_version_by_alias("digits-int8", "candidate")
    assert str(holder.version) == best["registered_model"]["version"]
    assert worse["registered_model"]["alias"] is None  # no false claim
    assert worse["registered_model"]["alias_version"] == best["registered_model"]["version"]
    tags = _versions(client, "digits-int8")[worse["registered_model"]["version"]]
    assert tags[registry.DECISION_TAG].startswith("@candidate stayed on v" + best["registered_model"]["version"])
    # an equal score moves it (at least as good), and policy always moves it regardless
    tie = run_pipeline(config, tracking_uri, tmp_path, *cosine, "steps.calibrate.method=minmax")
    assert tie["metrics"]["int8_cosine"] == best["metrics"]["int8_cosine"]
    assert tie["registered_model"]["alias"] == "candidate"
    forced = run_pipeline(
        config,
        tracking_uri,
        tmp_path,
        *cosine,
        "steps.calibrate.method=percentile",
        "steps.calibrate.percentile=95",
        "steps.promote.policy=always",
    )
    assert forced["registered_model"]["alias"] == "candidate"


def _candidate(version: int, value: float, data: str = "d", policy: str = "better") -> registry.Candidate:
    return registry.Candidate(version, registry.Score("cosine", value, data), policy)


def _chosen(*cands: registry.Candidate) -> int | None:
    choice = registry.choose(list(cands))
    return None if choice is None else choice.version


def test_choice_is_a_function_of_the_candidates_the_newest_setting_the_rule() -> None:
    c = _candidate
    assert _chosen() is None
    # better: the best on the newest version's metric and data; an equal score goes to the newer version
    assert _chosen(c(1, 0.9), c(2, 0.8), c(3, 0.85)) == 1
    assert _chosen(c(1, 0.9), c(2, 0.9)) == _chosen(c(2, 0.9), c(1, 0.9)) == 2  # whatever the order read
    # other validation data cannot be compared: the newest version's data decides which compete
    assert _chosen(c(1, 0.99, "old"), c(2, 0.5, "new"), c(3, 0.4, "new")) == 2
    assert _chosen(c(1, 0.99, "old"), c(2, 0.5, "new"), c(3, 0.4, "old")) == 1
    # always: the newest; a later better-policy version chooses among all again
    assert _chosen(c(1, 0.99), c(2, 0.5, policy="always")) == 2
    assert _chosen(c(1, 0.99), c(2, 0.5, policy="always"), c(3, 0.7)) == 1


SOURCE = "file:///nowhere/model"  # never loaded: these tests read tags and aliases only


def _identity(value: float | None, alias: str, policy: str = "better", data: str = "d", sha: str = "") -> dict:
    """The tags a promotion creates its version with (registry.version_tags among them)."""
    score = registry.Score("cosine", value, data) if value is not None else None
    sha = sha or f"sha-{value}-{policy}-{data}"
    return {registry.GATE_TAG: "passed", **registry.version_tags(sha, score, alias, policy)}


def _previous_layout(client: MlflowClient, value: float, alias: str, policy: str = "better") -> str:
    """A version as int8pipe registered it before PROMOTION_TAG: each fact under its own tag."""
    tags = {registry.GATE_TAG: "passed", METRIC_TAG: "cosine", VALUE_TAG: repr(value), DATA_TAG: "d"}
    tags.update({ALIAS_TAG: alias, POLICY_TAG: policy, INT8_SHA256_TAG: f"sha-{value}-{policy}-d"})
    registry.ensure_registered_model(client, "m")
    return str(client.create_model_version("m", source=SOURCE, tags=tags).version)


def _version(
    client: MlflowClient,
    value: float | None,
    alias: str = "candidate",
    policy: str = "better",
    data: str = "d",
    **extra: str,
) -> str:
    """A complete version of m as a promotion creates it: its tags in the same call."""
    registry.ensure_registered_model(client, "m")
    tags = {**_identity(value, alias, policy, data), **extra}
    return str(client.create_model_version("m", source=SOURCE, tags=tags).version)


def test_candidates_are_complete_versions_competing_for_that_alias(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    listed = [_version(client, 0.5)]
    _version(client, 0.9, alias="champion")  # another alias's
    _version(client, None)  # no score
    _version(client, float("nan"))
    _version(client, 0.99, **{registry.WITHDRAWN_TAG: "rolled back"})
    _version(client, 0.99, **{registry.INCOMPLETE_TAG: "x"})
    registry.ensure_registered_model(client, "m")
    older = client.create_model_version("m", source=SOURCE, tags={registry.GATE_TAG: "passed"})
    client.set_model_version_tag("m", older.version, registry.METRIC_TAG, "cosine")  # tags afterwards: never whole
    # an older int8pipe's version (no alias or policy tag) competes for every alias
    old = {registry.GATE_TAG: "passed", METRIC_TAG: "cosine", VALUE_TAG: "0.6", DATA_TAG: "d"}
    listed.append(str(client.create_model_version("m", source=SOURCE, tags=old).version))
    assert [str(c.version) for c in registry.candidates(client, "m", "candidate")] == listed


def test_a_rerun_reuses_its_version_unless_a_copy_would_set_the_rule(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)

    def reusable(value: float, alias: str, policy: str = "better") -> str | None:
        return registry.reusable_version(client, "m", _identity(value, alias, policy))

    assert reusable(0.9, "candidate") is None  # nothing registered yet
    first = _version(client, 0.9)
    assert reusable(0.9, "candidate") == first  # the newest itself
    assert reusable(0.9, "champion") is None  # another request
    _version(client, 0.8)
    assert reusable(0.9, "candidate") == first  # better, scored like the newest: it competes as it is
    always = _version(client, 0.7, policy="always")
    _version(client, 0.6, policy="always")
    assert reusable(0.7, "candidate", policy="always") is None  # always: a copy is what makes it the newest
    _version(client, 0.95, data="refreshed")
    assert reusable(0.9, "candidate") is None  # the newest version was scored on other data
    client.set_model_version_tag("m", always, registry.WITHDRAWN_TAG, "rolled back")
    assert reusable(0.7, "candidate", policy="always") == always  # a copy must not bring it back


def test_versions_of_the_previous_tag_layout_compete_and_are_reused(tracking_uri: str) -> None:
    """Existing registries hold versions tagged fact by fact: they read as the new layout does."""
    client = MlflowClient(tracking_uri)
    old = _previous_layout(client, 0.9, "candidate")
    _previous_layout(client, 0.99, "champion")  # another alias's, as its tag says
    new = _version(client, 0.8)
    cands = registry.candidates(client, "m", "candidate")
    assert [str(c.version) for c in cands] == [old, new]
    chosen = registry.choose(cands)
    assert chosen is not None and str(chosen.version) == old  # scored alike across layouts: compared
    assert registry.facts(client.get_model_version("m", old).tags) == registry.facts(_identity(0.9, "candidate"))
    assert registry.reusable_version(client, "m", _identity(0.9, "candidate")) == old  # its unchanged rerun
    assert registry.reusable_version(client, "m", _identity(0.9, "candidate", policy="always")) is None


def test_a_version_carries_its_promotion_facts_in_one_tag(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    tags = client.get_model_version("m", _version(client, 0.9)).tags
    assert set(tags) == {registry.GATE_TAG, METRIC_TAG, VALUE_TAG, PROMOTION_TAG}
    assert json.loads(tags[PROMOTION_TAG]) == {
        "alias": "candidate",
        "policy": "better",
        "int8_sha256": "sha-0.9-better-d",
        "validation_digest": "d",
    }
    # unreadable facts make no candidate rather than one competing for every alias
    client.set_model_version_tag("m", "1", PROMOTION_TAG, "{not json")
    assert registry.candidates(client, "m", "candidate") == []


class _Interleaved(MlflowClient):
    """A client that lets another process act just before this one's next alias write."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.before_write: list = []
        self.writes: list[str] = []

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if self.before_write:
            self.before_write.pop(0)()
        super().set_registered_model_alias(name, alias, version)
        self.writes.append(str(version))


def test_a_stale_write_is_followed_by_the_right_one(tracking_uri: str) -> None:
    client = _Interleaved(tracking_uri)
    mine = _version(client, 0.90)
    other = MlflowClient(tracking_uri)
    better: list[str] = []

    def better_promotion_completes() -> None:  # between this process's reads and its write
        better.append(_version(other, 0.95))
        assert registry.settle_alias(other, "m", "candidate").holder == better[0]

    client.before_write.append(better_promotion_completes)
    settled = registry.settle_alias(client, "m", "candidate")
    assert client.writes == [mine, better[0]]  # its stale choice, then the right one
    assert settled.holder == better[0] == str(other.get_model_version_by_alias("m", "candidate").version)
    assert registry.explain(mine, settled).startswith(f"stayed on v{settled.holder}: its cosine 0.95 > this")


class _Contested(MlflowClient):
    """A client whose every alias write is overwritten at once by another process's."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        super().set_registered_model_alias(name, alias, version)
        super().set_registered_model_alias(name, alias, "1")


def test_an_alias_that_never_settles_is_a_tracking_error(tracking_uri: str) -> None:
    client = _Contested(tracking_uri)
    _version(client, 0.5)
    _version(client, 0.9)
    with pytest.raises(TrackingError, match=r"@candidate of 'm' was still changing after 20 rounds.*run again"):
        registry.settle_alias(client, "m", "candidate")


def test_a_withdrawn_version_loses_the_alias_and_a_hand_set_one_is_settled(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    first = _version(client, 0.9)
    second = _version(client, 0.95)
    client.set_registered_model_alias("m", "candidate", first)  # set by hand
    assert registry.settle_alias(client, "m", "candidate").holder == second
    client.set_model_version_tag("m", second, registry.WITHDRAWN_TAG, "rolled back")
    assert registry.settle_alias(client, "m", "candidate").holder == first


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("registered_model", "", "the name is empty"),
        ("registered_model", "   ", "the name is empty"),
        ("registered_model", "team/digits", "holds '/', which MLflow refuses"),
        ("registered_model", "team:digits", "holds ':', which MLflow refuses"),
        ("registered_model", "o'brien", "holds a single quote"),
        ("registered_model", "..digits", "resolves to another"),
        ("registered_model", "x" + names.RESERVED_SUFFIX, "names ending in '.int8pipe-lock' are reserved"),
        ("alias", "latest", "'latest' is reserved by MLflow"),
        ("alias", "v3", "'v3' is reserved by MLflow"),
        ("alias", "best model", "may hold only letters, digits"),
    ],
)
def test_registry_names_mlflow_or_int8pipe_refuse_are_config_errors(
    digits_copy: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, expected: str
) -> None:
    _edit(digits_copy / "pipeline.yaml", lambda cfg: cfg["steps"]["promote"].update({key: value}))
    store = digits_copy.parent / "mlflow.db"
    assert main(["run", str(digits_copy / "pipeline.yaml"), "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err
    assert f"steps.promote.{key}: " in err and expected in err and "Traceback" not in err
    assert not store.exists()  # refused before anything ran


def _start(config: Path, uri: str, summary: Path, *overrides: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "pipeline", *run_args(config, uri, summary, *overrides)]
    return subprocess.Popen(args, env=env_without_mlflow(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_concurrent_promotions_end_on_the_best(mlflow_server: str, digits_copy: Path, tmp_path: Path) -> None:
    config = _drop_benchmark(digits_copy)
    methods = {
        "minmax": ("steps.calibrate.method=minmax",),
        "entropy": ("steps.calibrate.method=entropy",),
        "p95": ("steps.calibrate.method=percentile", "steps.calibrate.percentile=95"),
        "p90": ("steps.calibrate.method=percentile", "steps.calibrate.percentile=90"),
    }
    cosine = ("steps.validate.metric=cosine", "steps.validate.max_drop=0.5")
    procs = {k: _start(config, mlflow_server, tmp_path / f"{k}.json", *cosine, *o) for k, o in methods.items()}
    for p in procs.values():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    summaries = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in methods}
    client = MlflowClient(mlflow_server)
    scores = {s["registered_model"]["version"]: s["metrics"]["int8_cosine"] for s in summaries.values()}
    assert len(scores) == 4 and len(set(scores.values())) > 1
    holder = str(client.get_model_version_by_alias("digits-int8", "candidate").version)
    assert scores[holder] == max(scores.values())
    for s in summaries.values():
        reg = s["registered_model"]
        # at exit, the alias sat on a version at least as good as this one, and the claim matches
        assert scores[reg["alias_version"]] >= scores[reg["version"]]
        assert (reg["alias"] == "candidate") == (reg["alias_version"] == reg["version"])
    assert [m.name for m in client.search_registered_models()] == ["digits-int8"]  # nothing else


@pytest.mark.slow
def test_a_version_is_complete_or_absent_under_kill(mlflow_server: str, digits_copy: Path, tmp_path: Path) -> None:
    config = _drop_benchmark(digits_copy)
    client = MlflowClient(mlflow_server)
    proc = _start(config, mlflow_server, tmp_path / "s.json")
    deadline = time.monotonic() + 240
    versions: list = []
    while not versions and proc.poll() is None and time.monotonic() < deadline:
        try:
            versions = client.search_model_versions("name = 'digits-int8'")
        except Exception:
            versions = []
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert versions, "no version appeared"
    tags = _versions(client, "digits-int8")["1"]
    assert tags["int8pipe.gate"] == "passed" and tags[registry.METRIC_TAG] == "top1"  # born complete
    assert client.get_model_version("digits-int8", "1").description


@pytest.mark.slow
def test_untagged_versions_are_marked_and_never_aliased(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = _drop_benchmark(digits_copy)
    first = run_pipeline(config, tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    mv = client.get_model_version("digits-int8", first["registered_model"]["version"])
    # what an interrupted promotion of an older int8pipe, or a hand registration, leaves: no tags
    bare = client.create_model_version("digits-int8", source=mv.source, run_id=mv.run_id)
    second = run_pipeline(config, tracking_uri, tmp_path, "steps.calibrate.method=minmax")
    tags = _versions(client, "digits-int8")[str(bare.version)]
    assert registry.INCOMPLETE_TAG in tags
    assert second["registered_model"]["alias"] == "candidate"
    assert str(client.get_model_version_by_alias("digits-int8", "candidate").version) != str(bare.version)


def _quantized_models(folder: Path) -> dict[str, Path]:
    """A Q/DQ model and a dynamically quantized one (MatMulInteger, DynamicQuantizeLinear)."""
    from onnxruntime.quantization import quantize_dynamic

    from tests.models import build

    fp32 = folder / "mm.onnx"
    onnx.save(build("matmul_two_inputs"), str(fp32))
    dynamic = folder / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic))
    return {"dynamic": dynamic}


@pytest.mark.slow
def test_already_quantized_models_are_refused(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _drop_benchmark(digits_copy)
    s = run_pipeline(config, tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    # the registered INT8 model as input, by URI: refused by name before any run starts
    by_uri = ("model.onnx=null", "model.mlflow=models:/digits-int8@candidate")
    code = main(run_args(config, tracking_uri, tmp_path / "x.json", *by_uri))
    err = capsys.readouterr().err
    assert code == 2 and "models:/digits-int8@candidate is already quantized" in err
    assert "QuantizeLinear" in err and "DequantizeLinear" in err and "Traceback" not in err
    # a dynamically quantized model from ORT, as a file
    dynamic = _quantized_models(tmp_path)["dynamic"]
    code = main(["run", str(config), "--tracking-uri", tracking_uri, "--set", f"model.onnx={dynamic}"])
    err = capsys.readouterr().err
    assert code == 2 and "MatMulInteger" in err and "DynamicQuantizeLinear" in err and "FP32" in err
    runs_after = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert runs_after == runs_before
    assert s["registered_model"]["version"] == "1" and len(_versions(client, "digits-int8")) == 1


def test_no_int8_node_is_no_int8_model(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _drop_benchmark(digits_copy)
    code = main(run_args(config, tracking_uri, tmp_path / "s.json", "steps.quantize.exclude.op_types=[Conv, Gemm]"))
    err = capsys.readouterr().err
    assert code == 2 and "no node of the model runs in INT8" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    client = MlflowClient(tracking_uri)
    assert client.get_run(summary["steps"]["quantize"]).info.status == "FAILED"
    assert "promote" not in summary["steps"] and not client.search_registered_models()


@pytest.mark.slow
def test_readme_consumer_snippet_runs_as_written(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ROOT

    run_pipeline(_drop_benchmark(digits_copy), tracking_uri, tmp_path)
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- consumer-snippet -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md consumer snippet", "exec"), namespace)
    assert Path(namespace["onnx_file"]).is_file()
    onnx.checker.check_model(onnx.load(namespace["onnx_file"]), full_check=True)
    assert namespace["version"].tags["int8pipe.metric"] == "top1"


@pytest.mark.slow
def test_parent_run_compares_at_a_glance(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    """Run name, tags, description, datasets and the metrics people compare, on the parent run."""
    s = run_pipeline(digits_copy / "pipeline.yaml", tracking_uri, tmp_path, "steps.calibrate.method=percentile")
    run = MlflowClient(tracking_uri).get_run(s["run_id"])
    assert run.info.run_name == "digits-int8 (percentile 99.99, tensorrt)"
    tags = run.data.tags
    assert tags["int8pipe.method"] == tags["int8pipe.calibration_method"] == "percentile"
    assert tags["int8pipe.target"] == "tensorrt"
    assert tags["int8pipe.gate"] == "passed" and "percentile" in tags["mlflow.note.content"]
    metrics = set(run.data.metrics)
    assert {"int8_nodes", "accuracy_drop", "int8_top1", "size_mb_int8", "cpu.int8.latency_p50_ms"} <= metrics
    assert not [m for m in metrics if ".bs" in m]  # no duplicates of the first batch size's figures
    params = run.data.params
    assert "null" not in params.values() and params["data.calibration.npz"] == "data/calibration.npz"
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"calibration", "validation"}
    assert json.loads(inputs["calibration"].profile) == {"num_samples": 512}


@pytest.mark.slow
def test_cache_show_takes_a_run_id(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = run_pipeline(_drop_benchmark(digits_copy), tracking_uri, tmp_path)
    printed = capsys.readouterr().out
    calibrate = s["steps"]["calibrate"]
    assert f"runs:/{calibrate}/calibration/calibration.cache" in printed  # the end of the run says where it is
    for spec in (calibrate, f"runs:/{calibrate}/calibration/calibration.cache"):
        assert main(["cache", "show", spec, "--json", "--tracking-uri", tracking_uri]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["algorithm"] == "EntropyCalibration2" and "input" in shown["tensors"]
    assert main(["cache", "show", "0" * 32, "--tracking-uri", tracking_uri]) == 2
    assert "the run id of a calibrate step" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unchanged_rerun_reuses_its_version(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same INT8 model passing the same gate on the same data is not registered twice."""
    config = _drop_benchmark(digits_copy)
    first = run_pipeline(config, tracking_uri, tmp_path)
    capsys.readouterr()
    again = run_pipeline(config, tracking_uri, tmp_path)  # the steps are reused; promote always runs
    assert again["registered_model"]["version"] == first["registered_model"]["version"]
    assert again["registered_model"]["alias"] == "candidate"
    err = capsys.readouterr().err
    assert "holds this very INT8 model" in err
    assert "Downloading artifacts" not in err  # restores and evidence downloads draw no progress bars
    client = MlflowClient(tracking_uri)
    assert list(_versions(client, "digits-int8")) == [first["registered_model"]["version"]]
    changed = run_pipeline(config, tracking_uri, tmp_path, "steps.calibrate.method=percentile")
    assert changed["registered_model"]["version"] != first["registered_model"]["version"]  # a new model: a new version


def test_a_decision_on_new_validation_data_says_the_older_versions_were_not_compared() -> None:
    c = _candidate
    old, new = c(1, 0.99, "old"), c(2, 0.5, "new")
    settled = registry.Settled(new, "2", [old, new])
    said = registry.explain("2", settled)
    assert said.startswith("on this version: ") and "not compared with v1" in said
    assert "another metric or validation data" in said
    assert "not compared" not in registry.explain("2", registry.Settled(new, "2", [c(1, 0.4, "new"), new]))
