"""ONNX Runtime sessions: provider selection that never hides a fallback, and timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BackendUnavailable, ModelError, fail
from pipeline.graph import emulation
from pipeline.log import logger

# YAML name -> ONNX Runtime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def ort() -> Any:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def session(
    model: str | Path | bytes,
    provider: str = "cpu",
    optimize: bool = True,
    threads: int | None = None,
    spin: bool = True,
) -> Any:
    """An InferenceSession on ``provider`` only; raises BackendUnavailable if it would fall back.

    ``optimize=False`` turns graph optimisations off, so a Q/DQ graph is executed node by node in
    float (the exact quantised arithmetic) instead of through ORT's fused int8 kernels.
    ``spin=False`` stops ORT's idle worker threads from busy-waiting between operators: right when
    other threads share the cores (calibration digests activations while ORT runs), wrong for
    latency measurements.
    """
    rt = ort()
    wanted = PROVIDERS.get(provider)
    if wanted is None:
        fail(BackendUnavailable, f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}.")
    if wanted not in rt.get_available_providers():
        fail(
            BackendUnavailable,
            f"provider {provider!r} ({wanted}) is not in this onnxruntime build "
            f"(available: {', '.join(rt.get_available_providers())}); install onnxruntime-gpu on a GPU host.",
        )
    so = rt.SessionOptions()
    so.graph_optimization_level = (
        rt.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    if wanted == "CPUExecutionProvider":
        model = _cpu_twin(model)
    try:
        sess = rt.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        fail(ModelError, f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}")
    used = sess.get_providers()
    if used[0] != wanted:
        # onnxruntime-gpu without a usable GPU quietly registers only the CPU provider.
        fail(BackendUnavailable, f"provider {provider!r} was requested but the session runs on {used[0]}.")
    return sess


def _cpu_twin(model: str | Path | bytes) -> str | Path | bytes:
    """``model``, or for a model with FP16/BF16 tensors its twin that rounds through them explicitly
    (ORT's CPU provider would otherwise drop the roundings: pipeline/graph/emulation.py)."""
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
        if not emulation.has_narrow_floats(proto):
            return model
        proto = onnx.load(str(model))
    if not emulation.has_narrow_floats(proto):
        return model
    twin, count = emulation.emulated(proto)
    logger.debug("onnxruntime: %d FP16/BF16 node(s) computed in FP32 between explicit roundings", count)
    return twin.SerializeToString()


def run(sess: Any, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    return list(sess.run(outputs, feeds))


def time_session(sess: Any, feeds: dict[str, np.ndarray], iterations: int, warmup: int) -> np.ndarray:
    """Per-iteration latencies in milliseconds after ``warmup`` untimed runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    out = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        sess.run(None, feeds)
        out[i] = (time.perf_counter() - start) * 1000.0
    return out
