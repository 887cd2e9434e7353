"""What users run: `mlflow server`, `mlflow run .`, and execution providers that may not be there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.errors import BackendUnavailable
from pipeline.execution import runtime
from tests.conftest import BIN, DIGITS, ROOT, env_without_mlflow, run_pipeline
from tests.models import build


@pytest.mark.slow
def test_pipeline_against_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    s = run_pipeline(
        DIGITS / "pipeline.yaml",
        mlflow_server,
        tmp_path,
        "steps.benchmark.iterations=5",
        "steps.benchmark.batch_sizes=[1]",
    )
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("digits-int8", "candidate")
    assert str(version.version) == s["registered_model"]["version"]
    files = [a.path for a in client.list_artifacts(s["steps"]["calibrate"], "calibration")]
    assert "calibration/calibration.cache" in files  # artifacts went through the server's proxy
    assert (tmp_path / "artifacts").is_dir()


@pytest.mark.slow
def test_mlflow_run_quick_start(tmp_path: Path) -> None:
    """The README's quick start, then the README's next command: one experiment, steps reused."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local", "--experiment-name", "int8-digits"],
        env=env_without_mlflow(MLFLOW_TRACKING_URI=uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("digits-int8", "candidate")
    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]  # the promote run's
    exp = client.get_experiment_by_name("int8-digits")
    assert client.get_run(parent).info.experiment_id == exp.experiment_id
    assert client.get_run(parent).info.run_name == "digits-int8 (entropy, tensorrt)"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 6
    again = run_pipeline(DIGITS / "pipeline.yaml", uri, tmp_path)  # the README's next command
    reused = [s for s, r in again["steps"].items() if client.get_run(r).data.tags.get("int8pipe.reused") == "true"]
    assert reused == ["export", "calibrate", "quantize", "validate", "benchmark"]  # promote never is


def test_requested_gpu_provider_never_falls_back_silently(tmp_path: Path) -> None:
    model = build("conv_relu_gemm").SerializeToString()
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider; the fallback case cannot be provoked")
    with pytest.raises(BackendUnavailable, match="cuda"):
        runtime.session(model, "cuda")


@pytest.mark.slow
def test_benchmark_reports_unavailable_providers(digits_copy: Path, tracking_uri: str) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present: nothing is unavailable here")
    s = run_pipeline(
        digits_copy / "pipeline.yaml",
        tracking_uri,
        digits_copy,
        "steps.benchmark={providers: [cpu, cuda], batch_sizes: [2], iterations: 3}",
        "steps.promote.alias=null",
        "steps.calibrate.method=minmax",
    )
    assert "cpu.int8.latency_p50_ms" in s["metrics"]
    assert not any(k.startswith("cuda.") for k in s["metrics"])
    client = MlflowClient(tracking_uri)
    local = client.download_artifacts(s["steps"]["benchmark"], "benchmark/report.json", str(digits_copy))
    report = json.loads(Path(local).read_text())
    assert report["providers"]["cuda"]["status"] == "unavailable"
    assert report["providers"]["cpu"]["session_providers"][0] == "CPUExecutionProvider"
    assert s["registered_model"]["alias"] is None


def _has_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _has_gpu(), reason="no NVIDIA GPU on this machine")
def test_cuda_session_really_runs_on_gpu() -> None:
    sess = runtime.session(build("conv_relu_gemm").SerializeToString(), "cuda")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 4)).astype(np.float32)
    ref = runtime.session(build("conv_relu_gemm").SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-3, atol=1e-3)


def test_tensorrt_builds_int8_engine_from_qdq_model(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU hosts only)")
    if not _has_gpu():
        pytest.skip("TensorRT needs an NVIDIA GPU")
    from pipeline.transforms.quantization import QuantizeOptions, quantize

    qdq = quantize(build("conv_relu_gemm"), {"x": 3.0, "flat": 2.0}, QuantizeOptions(target="tensorrt"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(qdq.SerializeToString()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 2, 4, 4), (4, 2, 4, 4), (8, 2, 4, 4))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
