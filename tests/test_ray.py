"""Scaling out on Ray: sweeps as Ray tasks and sharded calibration, on a real local cluster.

The cluster is a head node and one worker node (``ray start``, 1 CPU each) on 127.0.0.1, started
once for the module and killed at the end (tests/ray_cluster.py); the tracking server is a real
``mlflow server``. Without Ray installed the cluster tests are skipped; the missing-Ray message is
tested in a subprocess where ``import ray`` fails, whether or not Ray is installed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.calibration.calibrator import calibrate
from pipeline.calibration.sharded import shard_batches
from pipeline.graph import model as onnx_model
from pipeline.launch import BOOTSTRAP
from pipeline.orchestration.cli import main
from pipeline.settings.config import AUTO_SEARCH
from pipeline.sources import data
from pipeline.sources.python_fn import takes_shard_args
from pipeline.sources.spec import DataSource, ImagesSource
from tests.conftest import env_without_mlflow, run_args, run_pipeline, serve
from tests.models import build
from tests.ray_cluster import RayCluster, start_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a Ray cluster (and pipelines on it): only in the full suite

METHODS = ["minmax", "entropy", "percentile", "mse"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    cluster = start_cluster(workers=1, env=env_without_mlflow())
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        assert cluster.stop() == []  # nothing of the cluster (nor any trial process) left running


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One tracking server for the sweeps that only read what they logged (each in its own experiment):
    a server's start is ~20 s of this file's time."""
    with serve(tmp_path_factory.mktemp("server")) as url:
        yield url


def _edit(config: Path, **changes: Any) -> Path:
    cfg = yaml.safe_load(config.read_text())
    steps = changes.pop("steps", None)
    if steps is not None:
        cfg["steps"] = {k: v for k, v in cfg["steps"].items() if k in steps}
    cfg.update(changes)
    config.write_text(yaml.safe_dump(cfg))
    return config


def _sweep_yaml(folder: Path, methods: list[str], **sweep: Any) -> Path:
    """The digits example as a method sweep: no benchmark (time), no promotion (the selection is the
    point; promotion is the local sweep's own code, run on the driver either way)."""
    return _edit(
        folder / "pipeline.yaml",
        steps=["export", "calibrate", "quantize", "validate"],
        sweep={"grid": {"steps.calibrate.method": methods}, **sweep},
    )


def _outcome(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Per trial: overrides, gate and every metric but timings (run ids differ between sweeps)."""
    return [
        (t["overrides"], t["gate"], {k: v for k, v in t["metrics"].items() if not k.endswith("_seconds")})
        for t in summary["trials"]
    ]


def _best(summary: dict[str, Any]) -> dict[str, Any]:
    return next(t["overrides"] for t in summary["trials"] if t["run_id"] == summary["best"])


def test_ray_sweep_matches_the_local_sweep(
    ray_cluster: RayCluster, ray_server: str, digits_copy: Path, tmp_path: Path
) -> None:
    mlflow_server = ray_server
    config = _sweep_yaml(digits_copy, METHODS)
    local = run_pipeline(config, mlflow_server, tmp_path, "experiment=digits-local")
    # upload: the trials read Ray's copy of the YAML's folder, not this path
    on_ray = run_pipeline(
        config, mlflow_server, tmp_path, "experiment=digits-ray", "sweep.executor=ray",
        f"sweep.ray={{address: '{ray_cluster.address}', upload: true}}",
    )  # fmt: skip
    # Metrics equal up to the summation order of BLAS dot products (the SQNRs), which follows the thread
    # count: Ray gives a task OMP_NUM_THREADS=1. Gates, overrides and counts are compared exactly.
    for (over_ray, gate_ray, m_ray), (over, gate, m) in zip(_outcome(on_ray), _outcome(local), strict=True):
        assert (over_ray, gate_ray, sorted(m_ray)) == (over, gate, sorted(m))
        assert m_ray == pytest.approx(m, rel=1e-12, abs=0)
    assert all(t["gate"] == "passed" for t in on_ray["trials"])
    assert _best(on_ray) == _best(local)
    client = MlflowClient(mlflow_server)
    sweep_run = client.get_run(on_ray["run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["int8pipe.best_run"] == on_ray["best"]
    for t in on_ray["trials"]:  # nested like a local sweep's trials, their steps below them
        run = client.get_run(t["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == on_ray["run_id"] and run.info.status == "FINISHED"
        assert client.get_run(t["steps"]["validate"]).data.tags["mlflow.parentRunId"] == t["run_id"]

    def table(summary: dict[str, Any]) -> list[dict[str, Any]]:
        path = client.download_artifacts(summary["run_id"], "sweep/trials_table.json", str(tmp_path))
        raw = json.loads(Path(path).read_text())
        return [{c: v for c, v in zip(raw["columns"], row) if c != "run_id"} for row in raw["data"]]

    assert table(on_ray) == table(local)


def test_stop_at_first_pass_submits_trials_in_order_a_cluster_worth_at_a_time(
    ray_cluster: RayCluster, ray_server: str, digits_copy: Path, tmp_path: Path
) -> None:
    """A cluster's worth is its free CPUs over a trial's. With one of the two CPUs held by a placement
    group (another user's work), one trial at a time: ``method: auto``'s first trial passes and the
    rest never start; a sweep whose first trial fails its gate stops after the second, which passes."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.orchestration.ray_executor import room

    config = _edit(digits_copy / "pipeline.yaml", steps=["export", "calibrate", "quantize"], experiment="digits-stop")
    cfg = yaml.safe_load(config.read_text())
    cfg["steps"]["validate"] = {"metric": "cosine", "max_drop": 0.5, "layer_report": "never"}  # a drop of 0 fails
    cfg["data"]["calibration"]["limit"] = cfg["data"]["validation"]["limit"] = 128  # the gates, not the numbers
    cfg["steps"]["calibrate"]["method"] = "mse"  # auto's first trial: the second sweep reuses its steps
    config.write_text(yaml.safe_dump(cfg))
    client = MlflowClient(ray_server)

    def sweep(*overrides: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        """The summary, the trial runs by name and the trials table of one Ray sweep."""
        where = f"sweep.ray.address={ray_cluster.address}"
        s = run_pipeline(config, ray_server, tmp_path, "sweep.executor=ray", where, *overrides)
        runs = client.search_runs([client.get_run(s["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{s['run_id']}'")  # fmt: skip
        path = client.download_artifacts(s["run_id"], "sweep/trials_table.json", str(tmp_path))
        raw = json.loads(Path(path).read_text())
        rows = [dict(zip(raw["columns"], row, strict=True)) for row in raw["data"]]
        return s, {r.data.tags["mlflow.runName"]: r for r in runs}, rows

    def free_cpus(n: float) -> bool:
        return bool(ray.available_resources().get("CPU") == n)

    stop_text = "not run: an earlier trial passed the gate (stop_at_first_pass)"
    ray.init(address=ray_cluster.address, log_to_driver=False)  # the sweeps' driver uses this connection
    try:
        _wait(lambda: free_cpus(2.0), "the cluster's 2 CPUs free", 60)
        assert (room(ray, 1.0, 0.0), room(ray, 0.5, 0.0), room(ray, 0.0, 0.0) > 100, room(ray, 1.0, 1.0)) == (
            2, 4, True, 1,  # no GPU on the cluster: still at least one
        )  # fmt: skip
        group = placement_group([{"CPU": 1.0}])
        ray.get(group.ready(), timeout=60)
        try:
            _wait(lambda: free_cpus(1.0), "one CPU held", 60)
            auto = sweep("steps.calibrate.method=auto")  # a sweep section of only where: still the search
            drops = [{"steps.validate.max_drop": 0}, {"steps.validate.max_drop": 0.5}]
            order = [*drops, {"steps.calibrate.method": "minmax"}]
            s, runs, rows = sweep(f"sweep.trials={json.dumps(order)}", "sweep.stop_at_first_pass=true")
        finally:
            remove_placement_group(group)
        # the time budget spent at once: nothing submitted, every trial skipped for it (no reason given)
        spent = run_args(config, ray_server, tmp_path / "spent.json", "sweep.executor=ray",
                         f"sweep.ray.address={ray_cluster.address}", "steps.calibrate.method=auto",
                         "sweep.time_budget_s=0")  # fmt: skip
        assert main(spent) == 3
        spent_trials = json.loads((tmp_path / "spent.json").read_text())["trials"]
        assert [(t["gate"], t["run_id"]) for t in spent_trials] == [("skipped", "")] * len(AUTO_SEARCH)
        _wait(lambda: free_cpus(2.0), "the cluster's 2 CPUs free again", 60)  # for the next test's trials
    finally:
        ray.shutdown()
    assert [t["gate"] for t in s["trials"]] == ["failed", "passed", "skipped"]
    assert s["best"] == s["trials"][1]["run_id"] and rows[2]["error"] == stop_text
    assert set(runs) == {"max_drop=0", "max_drop=0.5"}  # the third never started
    first, second = runs["max_drop=0"].info, runs["max_drop=0.5"].info
    assert first.end_time <= second.start_time  # one at a time: the second submitted once the first ended

    s, runs, rows = auto
    assert [t["overrides"] for t in s["trials"]] == AUTO_SEARCH
    assert [t["gate"] for t in s["trials"]] == ["passed"] + ["skipped"] * 4
    assert set(runs) == {"method=mse"} and s["best"] == s["trials"][0]["run_id"]
    assert rows[0]["why"] == "selected: the first trial to pass the gate"
    assert [(r["gate"], r["why"], r["error"]) for r in rows[1:]] == [("skipped", stop_text, stop_text)] * 4


def _trial_processes(marker: str) -> dict[str, tuple[int, int]]:
    """Running trial processes of the sweep whose YAML is ``marker``: run name -> (pid, parent pid)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        # the trial itself starts with int8pipe's bootstrap; the Ray task's wrapper with its own launcher
        if marker in argv and "--under" in argv and "--run-name" in argv and argv[1:3] == ["-c", BOOTSTRAP]:
            out[argv[argv.index("--run-name") + 1]] = (int(proc.name), ppid)
    return out


def _wait(predicate: Any, what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_dead_worker_fails_its_trial_and_ctrl_c_cancels_the_rest(
    ray_cluster: RayCluster, mlflow_server: str, digits_copy: Path, tmp_path: Path
) -> None:
    """Two trials start (one per node, stop_at_first_pass: a cluster's worth of trials, the others
    queued by the driver); the worker running `minmax` is killed (kill -9), its trial is FAILED with
    the reason and the third trial starts in its place; then Ctrl-C on the driver cancels what is
    left, whose runs end KILLED, the fourth never starts, and no trial process survives."""
    config = _sweep_yaml(
        digits_copy, ["minmax", "entropy", "percentile", "mse"], executor="ray", stop_at_first_pass=True
    )
    # calibration data read slowly (16 batches, 2 s each): Ctrl-C lands inside a calibration, not in the
    # instant a run is being created, however slowly a loaded machine polls the tracking server
    (digits_copy / "slow.py").write_text(
        "import time\nimport numpy as np\n\n\ndef batches(path):\n    x = np.load(path)['input'][:512]\n"
        "    for i in range(0, 512, 32):\n        time.sleep(2.0)\n        yield {'input': x[i : i + 32]}\n"
    )
    npz = str(digits_copy / "data" / "calibration.npz")
    _edit(config, data={**yaml.safe_load(config.read_text())["data"],
                        "calibration": {"python": "slow:batches", "args": {"path": npz}, "deps": [npz]}})  # fmt: skip
    summary = tmp_path / "s.json"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *run_args(config, mlflow_server, summary), "--no-reuse"],  # no shortcuts
        env=env_without_mlflow(RAY_ADDRESS=ray_cluster.address),  # the address from the environment
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker, client = str(config), MlflowClient(mlflow_server)

    def trial_runs() -> dict[str, Any]:
        experiment = client.get_experiment_by_name("int8-digits")
        sweeps = client.search_runs([experiment.experiment_id], "tags.`int8pipe.sweep` = 'true'") if experiment else []
        if not sweeps:
            return {}
        parent = f"tags.mlflow.parentRunId = '{sweeps[0].info.run_id}'"
        return {r.data.tags["mlflow.runName"]: r for r in client.search_runs([experiment.experiment_id], parent)}

    try:
        _wait(lambda: "method=minmax" in trial_runs(), "the minmax trial's run")
        pid, worker = _trial_processes(marker)["method=minmax"]
        assert Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"ray::")  # a Ray worker, not the driver
        os.kill(worker, signal.SIGKILL)
        third = _wait(lambda: trial_runs().get("method=percentile"), "the third trial to start in its place")
        below_third = f"tags.mlflow.parentRunId = '{third.info.run_id}' and tags.mlflow.runName = 'calibrate'"
        _wait(lambda: client.search_runs([third.info.experiment_id], below_third), "the third trial's calibration")
        time.sleep(1.0)
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = driver.communicate(timeout=150)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err.decode()[-3000:]
    s = json.loads(summary.read_text())
    gates = {t["overrides"]["steps.calibrate.method"]: t["gate"] for t in s["trials"]}
    assert gates["minmax"] == "error" and gates["percentile"] == "killed" and gates["mse"] == "skipped"
    runs = trial_runs()
    assert "method=mse" not in runs
    dead = runs["method=minmax"]
    assert dead.info.status == "FAILED" and "died" in dead.data.tags["int8pipe.error"]
    assert runs["method=percentile"].info.status == "KILLED"
    assert runs["method=entropy"].info.status in ("FINISHED", "KILLED")  # it may have finished first
    sweep = client.get_run(s["run_id"])
    assert sweep.info.status == "KILLED"
    left_open = client.search_runs([sweep.info.experiment_id], "attributes.status = 'RUNNING'")
    trial_of = {r.info.run_id: name for name, r in runs.items()}
    assert [(r.data.tags["mlflow.runName"], trial_of.get(r.data.tags["mlflow.parentRunId"])) for r in left_open] == []
    _wait(lambda: not _trial_processes(marker), "the trial processes to exit", 30)


def test_ray_sweep_refuses_a_tracking_store_only_this_machine_reaches(
    digits_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    config = _sweep_yaml(digits_copy, ["minmax"], executor="ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never contacted: the store is refused first
    for uri in (f"sqlite:///{tmp_path / 'm.db'}", f"file://{tmp_path / 'mlruns'}", str(tmp_path / "mlruns")):
        assert main(run_args(config, uri, tmp_path / "s.json")) == 2
        err = capsys.readouterr().err
        assert "http(s):// tracking server" in err and uri in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "mlruns").exists()  # nothing was created
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(run_args(config, "http://127.0.0.1:1", tmp_path / "s.json")) == 2
    assert "sweep.ray.address: no Ray cluster given" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override",
    [
        "sweep={grid: {steps.calibrate.method: [minmax]}, executor: ray, ray: {address: '127.0.0.1:1'}}",
        "steps.calibrate={workers: 2, ray: {address: '127.0.0.1:1'}}",
    ],
)
def test_without_ray_the_error_names_the_extra(digits_copy: Path, tmp_path: Path, override: str) -> None:
    """``import ray`` made to fail in a fresh interpreter (sys.modules['ray'] = None), Ray installed or not."""
    config = digits_copy / "pipeline.yaml"
    argv = run_args(config, "http://127.0.0.1:1", tmp_path / "s.json", override)
    code = (
        f"import sys; sys.modules['ray'] = None; from pipeline.orchestration.cli import main; sys.exit(main({argv!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_without_mlflow(),
                       cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("int8pipe: error: "), r.stderr  # one paragraph, no traceback
    assert "needs Ray, which is not installed" in lines[0] and 'pip install -e ".[ray]"' in lines[0]


# --- sharded calibration -------------------------------------------------------------------------------


def _flat(batches: Any) -> np.ndarray:
    return np.concatenate([b["x"] for b in batches])


def shard_aware(n: int = 37, shard_index: int = 0, num_shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """A ``python:`` source that splits itself: shard k yields samples k, k + num_shards, ..."""
    x = np.random.default_rng(3).normal(size=(n, 2, 4, 4)).astype(np.float32)
    for i in range(shard_index, n, num_shards * 4):
        yield {"x": x[i : i + num_shards * 4 : num_shards]}


def plain(n: int = 37) -> Iterator[dict[str, np.ndarray]]:
    x = np.random.default_rng(3).normal(size=(n, 2, 4, 4)).astype(np.float32)
    for i in range(0, n, 5):
        yield {"x": x[i : i + 5]}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, DataSource]:
    from PIL import Image

    x = np.random.default_rng(3).normal(size=(37, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(37))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "imgs").mkdir()
    for i in range(11):
        pixels = np.random.default_rng(i).integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i:02d}.png")
    (tmp_path / "gen.py").write_text(_generators_source())  # the two generators above, as a module
    images = ImagesSource(dir=str(tmp_path / "imgs"), size=[4, 4], channels="RGB")
    return {
        "npz": DataSource(npz=str(tmp_path / "c.npz"), limit=30),
        "npy": DataSource(npy={"x": str(tmp_path / "x.npy")}, limit=33),
        "images": DataSource(images=images, limit=10),
        "python-sharded": DataSource(python="gen:shard_aware"),
        "python-every-nth": DataSource(python="gen:plain", limit=31),
    }


def _generators_source() -> str:
    import inspect

    return "from collections.abc import Iterator\n\nimport numpy as np\n\n\n" + "\n\n".join(
        inspect.getsource(f) for f in (shard_aware, plain)
    )


def _specs(kind: str) -> data.Specs:
    return onnx_model.input_specs(build("dynamic_hw_conv" if kind == "images" else "clip_chain"))


@pytest.mark.parametrize("kind", ["npz", "npy", "images", "python-sharded", "python-every-nth"])
def test_shards_together_are_exactly_the_source(sources: dict[str, DataSource], tmp_path: Path, kind: str) -> None:
    src, specs, dirs = sources[kind], _specs(kind), [tmp_path]
    whole = _flat(data.batches(src, 4, specs, dirs, "data.calibration"))
    shards = [_flat(shard_batches(src, i, 3, 4, specs, dirs, "data.calibration")) for i in range(3)]
    assert sum(len(s) for s in shards) == len(whole)
    if kind == "python-sharded":  # the function's own split: the same samples, in another order
        key = [tuple(a.ravel()) for a in whole]
        assert sorted(key) == sorted(tuple(a.ravel()) for s in shards for a in s)
    elif kind == "python-every-nth":  # batches dealt round-robin
        batches = list(data.batches(src, 4, specs, dirs, "data.calibration"))
        for i, s in enumerate(shards):
            np.testing.assert_array_equal(s, _flat(batches[i::3]))
    else:  # contiguous slices by sample index, in order
        np.testing.assert_array_equal(np.concatenate(shards), whole)
    assert takes_shard_args(shard_aware) and not takes_shard_args(plain)


def _bits(ranges: dict[str, Any]) -> dict[str, tuple[bytes, ...]]:
    """Every tensor's min, max and amax as float64 bytes: equality of these is equality bit for bit."""
    return {
        name: tuple(np.float64(r[k]).tobytes() for k in ("min", "max", "amax", "minmax_amax", "clipped_fraction"))
        for name, r in ranges.items()
    }


@pytest.mark.parametrize(("kind", "method"), [("npy", "entropy"), ("python-every-nth", "minmax"), ("images", "mse")])
def test_sharded_calibration_of_a_tiny_model_is_bit_identical(
    ray_cluster: RayCluster, sources: dict[str, DataSource], tmp_path: Path, kind: str, method: str
) -> None:
    from pipeline.calibration.sharded import calibrate_sharded

    model = tmp_path / "m.onnx"
    onnx.save(build("dynamic_hw_conv" if kind == "images" else "clip_chain"), str(model))
    src, specs, dirs = sources[kind], _specs(kind), [tmp_path]
    local = calibrate(model, lambda: data.batches(src, 4, specs, dirs, "data.calibration"), method)
    sharded = calibrate_sharded(model, src, method, batch_size=4, specs=specs, dirs=dirs, what="data.calibration",
                                workers=2, address=ray_cluster.address)  # fmt: skip
    a, b = local.ranges.to_json(), sharded.ranges.to_json()
    assert _bits(b["tensors"]) == _bits(a["tensors"]) and b["tensors"] == a["tensors"]
    assert b["num_samples"] == a["num_samples"] and b["params"] == a["params"]
    shards = [s["samples"] for s in b["environment"]["shards"]]
    assert len(shards) == 2 and sum(shards) == a["num_samples"] and min(shards) > 0
    assert set(sharded.histograms) == set(local.histograms)
    for name, h in local.histograms.items():
        np.testing.assert_array_equal(sharded.histograms[name].counts, h.counts)
        assert sharded.histograms[name].width == h.width


def test_sharded_calibration_of_digits_is_bit_identical(
    ray_cluster: RayCluster, digits_copy: Path, tmp_path: Path
) -> None:
    """``steps.calibrate.workers: 2`` through the pipeline: ranges.json and histograms as one process gives."""
    config = _edit(digits_copy / "pipeline.yaml", steps=["export", "calibrate"])
    uri, ranges = f"sqlite:///{tmp_path / 'm.db'}", {}
    for workers in (1, 2):  # --no-reuse: sharded or not, the calibrate step would be reused (same results)
        args = run_args(config, uri, tmp_path / "s.json", f"steps.calibrate.workers={workers}",
                        f"steps.calibrate.ray.address={ray_cluster.address}")  # fmt: skip
        assert main([*args, "--no-reuse"]) == 0
        s = json.loads((tmp_path / "s.json").read_text())
        run = s["steps"]["calibrate"]
        folder = MlflowClient(uri).download_artifacts(run, "calibration", str(tmp_path / str(workers)))
        ranges[workers] = json.loads((Path(folder) / "ranges.json").read_text())
        with np.load(Path(folder) / "histograms.npz") as z:
            ranges[workers]["histograms"] = {k: z[k] for k in z.files}
    one, two = ranges[1], ranges[2]
    assert _bits(two["tensors"]) == _bits(one["tensors"]) and two["tensors"] == one["tensors"]
    assert two["num_samples"] == one["num_samples"] == 512 and len(two["environment"]["shards"]) == 2
    for key, value in one["histograms"].items():
        np.testing.assert_array_equal(two["histograms"][key], value)
