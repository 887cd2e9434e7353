"""ONNX Runtime sessions: provider selection that never hides a fallback, and timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.errors import BackendUnavailable, ModelError, fail
from pipeline.graph import emulation
from pipeline.log import logger

# YAML name -> ONNX Runtime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ONNX Runtime's WeightBiasQuantization (on from basic optimisations) turns a quantized Conv/Gemm's float
# bias into INT32 with scale x_scale * w_scale computed in the scales' type: with FP16 scales that
# product underflows and the digits example scores 0.386 instead of 0.9917. Sessions of FP16/BF16 models
# (and the ones MLflow's pyfunc opens for a registered version) turn it off.
NARROW_FLOAT_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "WeightBiasQuantization"}


def ort() -> Any:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def session(
    model: str | Path | bytes | onnx.ModelProto,
    provider: str = "cpu",
    optimize: bool = True,
    threads: int | None = None,
    spin: bool = True,
) -> Any:
    """An InferenceSession on ``provider`` only; raises BackendUnavailable if it would fall back.

    ``model``: a path, serialized bytes or a ModelProto. A caller holding the ModelProto passes it: a
    session first finds out whether the model has FP16/BF16 tensors, which for bytes means parsing
    them again (6-8 ms of a 110-120 ms session for EfficientNet-Lite0's FP32 weights,
    benchmarks/session_cost.py), for a ModelProto a glance at its types.

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
    proto = narrow_model(model)
    if proto is not None:
        for key, value in NARROW_FLOAT_SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
        if wanted == "CPUExecutionProvider":
            twin, count = emulation.emulated(proto)
            logger.debug("onnxruntime: %d FP16/BF16 node(s) computed in FP32 between explicit roundings", count)
            model = twin.SerializeToString()
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    try:
        sess = rt.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        fail(ModelError, f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}")
    used = sess.get_providers()
    if used[0] != wanted:
        # onnxruntime-gpu without a usable GPU quietly registers only the CPU provider.
        fail(BackendUnavailable, f"provider {provider!r} was requested but the session runs on {used[0]}.")
    return sess


def narrow_model(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` parsed when it has FP16/BF16 tensors, else None. On the CPU provider such a model runs
    as its twin that rounds through them explicitly (ORT's would drop the roundings: graph/emulation.py)."""
    if isinstance(model, onnx.ModelProto):
        return model if emulation.has_narrow_floats(model) else None
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        if not Path(model).is_file():
            return None  # ORT names the missing file
        proto = onnx.load(str(model), load_external_data=False)
        if emulation.has_narrow_floats(proto):
            proto = onnx.load(str(model))
    return proto if emulation.has_narrow_floats(proto) else None


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
