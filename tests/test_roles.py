"""Quantization roles: nodes kept float for what they do, for both targets, unless asked for."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.calibration.calibrator import calibrate
from pipeline.graph.model import toposort
from pipeline.transforms.keep_float import keep_float_inputs
from pipeline.transforms.quantization import QuantizeOptions, float_nodes, node_table, quantize
from pipeline.transforms.roles import activation_matmuls
from tests.models import build


def precisions(fp32: onnx.ModelProto, feeds: dict[str, np.ndarray], **options: object) -> dict[str, str]:
    """node -> precision in the Q/DQ model the quantize step would build with ``options``."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32, f"{tmp}/m.onnx")
        cal = calibrate(Path(tmp) / "m.onnx", lambda: iter([feeds]), "minmax")
    observed = {k: (v.min, v.max) for k, v in cal.ranges.tensors.items()}
    opts = QuantizeOptions(**options)  # type: ignore[arg-type]
    qdq = keep_float_inputs(quantize(fp32, cal.ranges.amax(), opts, observed), fp32, float_nodes(fp32, opts))
    toposort(qdq)  # as save_checked does: ORT's quantizer appends its nodes at the end
    onnx.checker.check_model(qdq, full_check=True)
    return {r["node"]: r["precision"] for r in node_table(fp32, qdq)}


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_attention_products_stay_float_unless_asked(target: str) -> None:
    fp32 = build("tiny_attention")
    assert activation_matmuls(fp32) == ["scores", "context"]
    feeds = {"ids": np.random.default_rng(6).integers(0, 20, size=(64, 5))}
    activations = "symmetric" if target == "tensorrt" else "asymmetric"
    default = precisions(fp32, feeds, target=target, activations=activations)
    opted_in = precisions(fp32, feeds, target=target, activations=activations, activation_matmuls=True)
    assert default["scores"] == default["context"] == "fp32"
    assert default["wq"] == default["wo"] == "int8"
    assert opted_in["scores"] == opted_in["context"] == "int8"


def test_normalization_stays_float_unless_asked() -> None:
    fp32 = build("matmul_layernorm")
    feeds = {"x": np.random.default_rng(7).normal(size=(32, 4, 8)).astype(np.float32)}
    default = precisions(fp32, feeds, target="onnxruntime", activations="asymmetric")
    opted_in = precisions(fp32, feeds, target="onnxruntime", activations="asymmetric", normalization=True)
    assert default["norm"] == "fp32" and default["fc1"] == default["fc2"] == "int8"
    assert opted_in["norm"] != "fp32"  # ORT's quantizer reads it through DequantizeLinear when allowed


def test_quantize_defaults_follow_the_graph_kind() -> None:
    """auto: shifted activations where activations are symmetric, bias correction except on transformers,
    smoothing on transformers; options that measure on calibration samples stay off without them."""
    from pipeline.transforms.roles import graph_kind
    from steps.quantize import QuantizeConfig, Smoothing

    assert graph_kind(build("tiny_attention")) == "attention"
    assert graph_kind(build("conv_relu_gemm")) == "convolutional"
    cfg = QuantizeConfig()
    conv, attention = cfg.for_graph("convolutional"), cfg.for_graph("attention")
    assert (conv.shift_activations, conv.bias_correction, conv.smoothing) == (True, True, None)
    assert (attention.shift_activations, attention.bias_correction, attention.smoothing) == (True, False, Smoothing())
    assert cfg.auto_choices("attention") == (
        "shift_activations=on, bias_correction=off, smoothing=on, depthwise_scales=on"
    )
    ort = QuantizeConfig(target="onnxruntime").for_graph("convolutional")  # asymmetric: the grid is used whole
    assert ort.shift_activations is False and ort.bias_correction is True
    cached = cfg.for_graph("attention", has_samples=False)  # from_cache: nothing to measure on
    assert (cached.bias_correction, cached.smoothing) == (False, None)
    explicit = QuantizeConfig(
        shift_activations=False, bias_correction=True, smoothing=None, depthwise_scales=False
    ).for_graph("attention")
    assert (explicit.shift_activations, explicit.bias_correction, explicit.smoothing) == (False, True, None)
    assert explicit.auto_choices("attention") == ""


def test_a_recipe_needs_the_auto_keys_decided() -> None:
    from pipeline.settings.facts import Facts
    from steps.quantize import QuantizeConfig

    with pytest.raises(ValueError, match="decide the auto keys first, with for_graph"):
        QuantizeConfig().as_recipe(Facts())
    assert QuantizeConfig().for_graph("convolutional").as_recipe(Facts()).shift_activations is True
