"""A model whose weights are Constant nodes (as Paddle2ONNX writes them) still gets INT8 layers."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from onnx import helper

from pipeline.graph import model as onnx_model
from tests.conftest import run_pipeline
from tests.models import build


def as_constants(model: onnx.ModelProto, opset: int = 12) -> onnx.ModelProto:
    """``model`` with every initializer turned into a Constant node, at an opset before per-channel Q/DQ."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [helper.make_node("Constant", [], [i.name], value=i) for i in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend([*constants, *nodes])
    out.opset_import[0].version = opset
    onnx.checker.check_model(out, full_check=True)
    return out


def test_constants_become_initializers() -> None:
    model = as_constants(build("conv_relu_gemm"))
    assert onnx_model.constants_to_initializers(model) == 4
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    assert sorted(i.name for i in model.graph.initializer) == ["b", "fb", "fc", "w"]
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 4)).astype(np.float32)
    from pipeline.execution import runtime

    def run(m: onnx.ModelProto) -> np.ndarray:
        return runtime.run(runtime.session(m.SerializeToString()), {"x": x})[0]

    np.testing.assert_array_equal(run(model), run(build("conv_relu_gemm")))


@pytest.mark.slow
@pytest.mark.parametrize("fold", [False, True])
def test_pipeline_quantizes_a_constant_weight_export(tmp_path: Path, tracking_uri: str, fold: bool) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    onnx.save(as_constants(build("conv_relu_gemm")), str(folder / "model.onnx"))
    x = np.random.default_rng(1).normal(size=(64, 2, 4, 4)).astype(np.float32)
    np.savez(folder / "cal.npz", x=x)
    (folder / "pipeline.yaml").write_text(
        "name: constants\nmodel: {onnx: model.onnx}\ndata: {calibration: {npz: cal.npz}}\n"
        f"steps:\n  export: {{fold_batchnorm: {str(fold).lower()}}}\n  calibrate: {{}}\n  quantize: {{}}\n"
    )
    summary = run_pipeline(folder / "pipeline.yaml", tracking_uri, tmp_path)
    metrics = mlflow.MlflowClient(tracking_uri).get_run(summary["steps"]["quantize"]).data.metrics
    assert metrics["int8_nodes"] == 2  # the Conv and the Gemm, weights per channel at opset 13+
