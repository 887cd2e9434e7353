"""The engine step in a real pipeline where TensorRT or a GPU is missing: the run finishes, says why it
skipped, and logs no number that could pass for a GPU figure; promote's speed requirement is off and
says so, and promotion goes on. (Where TensorRT and a GPU exist, tests/test_engine_gpu.py runs the
same pipeline and checks the engines instead.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.execution import tensorrt_engine
from pipeline.tag_names import ENGINE_DEVICE_TAG, ENGINE_SKIP_REASON_TAG, ENGINE_TAG, REUSED_TAG
from steps.engine import SPEED_KEY
from tests.conftest import run_pipeline

pytestmark = [
    pytest.mark.slow,  # runs the digits pipeline
    pytest.mark.skipif(tensorrt_engine.availability().ok, reason="TensorRT and a GPU are here: the step builds"),
]


def engine_pipeline(digits_copy: Path) -> Path:
    """The digits example through validate, the engine step and promote with the speed requirement."""
    config = digits_copy / "pipeline.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["steps"] = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {"target": "tensorrt"},
        "validate": {"metric": "top1", "max_drop": 0.01},
        "engine": {},
        "promote": {"registered_model": "digits-int8", "alias": "candidate", "require_int8_faster_than_fp16": True},
    }
    config.write_text(yaml.safe_dump(doc))
    return config


def test_without_tensorrt_or_gpu_the_step_finishes_and_says_why(
    digits_copy: Path, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_pipeline(engine_pipeline(digits_copy), tracking_uri, tmp_path)
    log = capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["steps"]["engine"])
    reason = tensorrt_engine.availability().reason
    assert run.info.status == "FINISHED"
    assert run.data.tags[ENGINE_TAG] == "skipped" and run.data.tags[ENGINE_SKIP_REASON_TAG] == reason
    assert ENGINE_DEVICE_TAG not in run.data.tags
    assert run.data.metrics == {}  # no latency, no layer counts: nothing that reads as a GPU figure
    assert not [k for k in client.get_run(summary["run_id"]).data.metrics if k.startswith("engine.")]
    local = client.download_artifacts(run.info.run_id, "engine/report.json", str(tmp_path))
    report = json.loads(Path(local).read_text())
    assert report == {"status": "skipped", "reason": reason}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "engine")]
    assert artifacts == ["engine/report.json"]  # no plan, no inspector JSON, no layer table
    assert f"engine: skipped, nothing built or timed: {reason}" in log
    # promote: the requirement is off for this run, and says why; the version is registered all the same
    assert f"{SPEED_KEY} is off for this run" in log
    assert summary["registered_model"]["alias"] == "candidate" and summary["gate"] == "passed"

    # reused: the skip is tagged on the new run as well
    again = run_pipeline(engine_pipeline(digits_copy), tracking_uri, tmp_path)
    reused = client.get_run(again["steps"]["engine"])
    assert reused.data.tags[REUSED_TAG] == "true" and reused.data.tags[ENGINE_SKIP_REASON_TAG] == reason
