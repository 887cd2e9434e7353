"""A failed gate's suggestions, ranked by the share of the measured error each addresses: known answers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.analysis.suggestions import suggest
from pipeline.calibration.ranges import Ranges, TensorRange


def _model(shifted: bool = False) -> onnx.ModelProto:
    """x -> Relu -> Conv a; x -> Conv b; x -> Conv c (a reads a one-sided activation, b and c do not)."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["ya"], name="a"),
        helper.make_node("Conv", ["x", "w"], ["yb"], name="b"),
        helper.make_node("Conv", ["x", "w"], ["yc"], name="c"),
    ]
    if shifted:
        nodes.append(helper.make_node("Identity", ["x"], ["s"], name="a_shift_sub"))
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("ya", "yb", "yc")]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, [w]))


def _ranges() -> Ranges:
    tensors = {"x": TensorRange(-3.0, 3.0, 3.0), "r": TensorRange(0.0, 3.0, 3.0)}
    return Ranges("minmax", {}, "", "", 8, {}, tensors)


def test_suggestions_rank_by_the_share_of_the_measured_error() -> None:
    # a adds 0.01 of the signal power as noise (20 dB), b and c 0.001 each (30 dB): 0.012 in all
    nodes = [{"node": "a", "added_sqnr_db": 20.0}, {"node": "b", "added_sqnr_db": 30.0},
             {"node": "c", "added_sqnr_db": 30.0}]  # fmt: skip
    fp32 = _model()
    advice = suggest(fp32, fp32, nodes, _ranges(), "tensorrt")
    assert [a.setting for a in advice] == [
        "steps.validate.recover: {max_fp_nodes: 1}",  # a alone holds 0.01 / 0.012 of it
        "steps.quantize.shift_activations: true",  # a's input is one-sided: 3/4 of its share
    ]
    np.testing.assert_allclose([a.share for a in advice], [0.01 / 0.012, 0.75 * 0.01 / 0.012])
    assert "1 of 3 quantized nodes read a one-sided activation" in advice[1].why

    # the error spread over b and c: two nodes for half of it, and the shift addresses little
    spread = [{"node": "a", "added_sqnr_db": 30.0}, {"node": "b", "added_sqnr_db": 20.0},
              {"node": "c", "added_sqnr_db": 20.0}]  # fmt: skip
    advice = suggest(fp32, fp32, spread, _ranges(), "tensorrt")
    assert advice[0].setting == "steps.validate.recover: {max_fp_nodes: 2}"
    np.testing.assert_allclose([a.share for a in advice], [0.02 / 0.021, 0.75 * 0.001 / 0.021])


def test_no_shift_where_it_cannot_apply() -> None:
    nodes = [{"node": "a", "added_sqnr_db": 20.0}]
    fp32 = _model()
    for target, int8, ranges in (
        ("onnxruntime", fp32, _ranges()),  # asymmetric uint8 activations use their whole grid already
        ("tensorrt", _model(shifted=True), _ranges()),  # already shifted
        ("tensorrt", fp32, None),  # no calibration ranges (dynamic mode)
    ):
        settings = [a.setting for a in suggest(fp32, int8, nodes, ranges, target)]
        assert settings == ["steps.validate.recover: {max_fp_nodes: 1}"], target
    assert suggest(fp32, fp32, [], _ranges(), "tensorrt") == []


def test_depthwise_scales_are_suggested_where_they_are_off() -> None:
    """The depthwise Conv adds 0.01 of the signal power as noise, the stem 0.001: per-channel scales address
    the depthwise share, 0.01 / 0.011; where the model already has them, nothing is suggested."""
    from tests.models import build

    fp32 = build("hardswish_depthwise")
    nodes = [{"node": "dw", "added_sqnr_db": 20.0}, {"node": "stem", "added_sqnr_db": 30.0}]
    advice = {a.setting: a for a in suggest(fp32, fp32, nodes, None, "tensorrt")}
    dw = advice["steps.quantize.depthwise_scales: true"]
    np.testing.assert_allclose(dw.share, 0.01 / 0.011)
    assert dw.why.startswith("1 depthwise Conv(s) read an input with one scale for all its channels and add 91%")
    assert "latency" in {a.setting: a for a in suggest(fp32, fp32, nodes, None, "onnxruntime")}[dw.setting].why
    scaled = build("hardswish_depthwise")
    scaled.graph.node.append(helper.make_node("Identity", ["h"], ["hs"], name="h_dw_scaled_mul"))
    assert dw.setting not in {a.setting for a in suggest(fp32, scaled, nodes, None, "tensorrt")}
