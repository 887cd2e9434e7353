"""Every tiny model in tests/models is a valid ONNX model MLflow can store and load back."""

from __future__ import annotations

from pathlib import Path

import mlflow.onnx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.models import REGISTRY, build


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_model_is_valid_and_loads_with_mlflow(name: str, tmp_path: Path) -> None:
    model = build(name)
    onnx.checker.check_model(model, full_check=True)
    nodes = list(model.graph.node)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}  # save_model may move them out
    # explicit requirements: inferring them imports the world and takes seconds per model
    mlflow.onnx.save_model(model, str(tmp_path / name), pip_requirements=["onnx"])
    loaded = mlflow.onnx.load_model(str(tmp_path / name))
    assert list(loaded.graph.node) == nodes
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), weights.pop(t.name))
    assert weights == {}
