"""int8pipe: FP32 ONNX model -> calibrated, validated, benchmarked INT8 Q/DQ model, tracked in MLflow.

The public API is what this module exports; everything else may change between releases.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pipeline.errors import (  # noqa: E402
    BackendUnavailable,
    CalibrationError,
    ConfigError,
    DataError,
    GateFailed,
    Int8PipeError,
    Interrupted,
    ModelError,
    TrackingError,
)


def __getattr__(name: str) -> object:
    # Heavy modules (MLflow, ONNX Runtime) load on first use, not on `import pipeline`.
    lazy = {
        "load_config": ("pipeline.orchestration.runner", "load_config"),
        "run_pipeline": ("pipeline.orchestration.runner", "run_pipeline"),
        "Summary": ("pipeline.orchestration.runner", "Summary"),
        "calibrate": ("pipeline.calibration.calibrator", "calibrate"),
        "Ranges": ("pipeline.calibration.ranges", "Ranges"),
        "read_cache": ("pipeline.calibration.trt_cache", "read"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(name)


__all__ = [
    "BackendUnavailable",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "GateFailed",
    "Int8PipeError",
    "Interrupted",
    "ModelError",
    "Ranges",
    "Summary",
    "TrackingError",
    "__version__",
    "calibrate",
    "load_config",
    "read_cache",
    "run_pipeline",
]
