"""The strongly typed lint: every rule has a model that breaks it (and only it), and what int8pipe writes
for TensorRT (INT8, FP8, FP16 regions) breaks none."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.analysis.strongly_typed import lint
from pipeline.transforms import float_precision, fp8
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.models import build

AMAX = {"conv_relu_gemm": {"x": 3.0, "flat": 4.0}, "single_matmul": {"x": 2.0}}


def qdq(name: str) -> onnx.ModelProto:
    return quantize(build(name), AMAX[name], QuantizeOptions(target="tensorrt"), None)


def conv_model(
    *, x_type: int = TensorProto.FLOAT, scale: np.ndarray | None = None, zp: np.ndarray | None = None,
    w_axis: int = 0, scale_as_input: bool = False, opset: int = 19, extra: list | None = None,
) -> onnx.ModelProto:  # fmt: skip
    """x -> Q/DQ (scale, zp) -> Conv with a per-channel INT8 weight DQ along ``w_axis`` -> y."""
    scale = np.array(0.02, np.float32) if scale is None else scale
    zp = np.array(0, np.int8) if zp is None else zp
    w = np.ones((4, 4, 1, 1), np.int8)
    w_scale = np.full(4, 0.1, np.float32)
    inits = [
        numpy_helper.from_array(zp, "zp"), numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "w_scale"), numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
    ]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", x_type, [1, 4, 2, 2])]
    if scale_as_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape)))
    else:
        inits.append(numpy_helper.from_array(scale, "s"))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="w_dq", axis=w_axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
        *(extra or []),
    ]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, out, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model: onnx.ModelProto) -> set[str]:
    return {f.rule for f in lint(model)}


def test_the_reference_model_is_clean() -> None:
    assert lint(conv_model()) == []


@pytest.mark.parametrize(
    ("rule", "model"),
    [
        ("qdq-constant", lambda: conv_model(scale_as_input=True)),
        ("qdq-scale", lambda: conv_model(scale=np.array(0.0, np.float32))),
        ("qdq-zero-point", lambda: conv_model(zp=np.array(3, np.int8))),
        ("qdq-zero-point", lambda: conv_model(zp=np.array(0, np.uint8))),
        ("activation-per-tensor", lambda: conv_model(scale=np.full(4, 0.02, np.float32))),
        ("weight-axis", lambda: conv_model(w_axis=1)),
        # at opset 17 a DequantizeLinear outputs float32 whatever its scale: the type rule breaks too
        (
            "typed-qdq-opset qdq-type",
            lambda: conv_model(scale=np.array(0.02, np.float16), x_type=TensorProto.FLOAT16, opset=17),
        ),  # fmt: skip
        ("qdq-type", lambda: conv_model(x_type=TensorProto.FLOAT16)),
    ],
)
def test_each_rule_has_a_model_that_breaks_it(rule: str, model) -> None:  # type: ignore[no-untyped-def]
    found = lint(model())
    assert {f.rule for f in found} == set(rule.split()), [str(f) for f in found]
    assert all(f.message for f in found)


def test_mixed_float_inputs_and_float64_are_found() -> None:
    extra = [
        helper.make_node("Cast", ["y"], ["y16"], name="to_half", to=TensorProto.FLOAT16),
        helper.make_node("Add", ["y", "y16"], ["mixed"], name="add"),
        helper.make_node("Cast", ["y"], ["y64"], name="to_double", to=TensorProto.DOUBLE),
    ]
    found = lint(conv_model(extra=extra))
    assert {(f.rule, f.node) for f in found} == {("mixed-types", "add"), ("no-float64", "to_double")}


@pytest.mark.parametrize("name", list(AMAX))
def test_what_int8pipe_writes_for_tensorrt_is_clean(name: str) -> None:
    model = qdq(name)
    assert lint(model) == []
    assert lint(float_precision.lower_float_regions(model, "fp16")) == []
    assert lint(float_precision.lower_float_regions(model, "bf16")) == []
    fp8.to_fp8(model, build(name))
    assert lint(model) == []
    assert lint(float_precision.lower_float_regions(model, "fp16")) == []


def test_lint_command_exit_codes(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pipeline.orchestration.cli import main

    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(conv_model(), str(clean))
    onnx.save(conv_model(w_axis=1), str(broken))
    assert main(["lint", str(clean)]) == 0
    assert capsys.readouterr().out.strip().endswith("clean")
    assert main(["lint", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "[weight-axis] w_dq: per-channel axis 1, but Conv 'conv' has its output channels on axis 0" in out
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2
    assert "model file not found" in capsys.readouterr().err
