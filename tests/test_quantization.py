"""The Q/DQ model against an INT8 forward pass computed independently in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.execution import runtime
from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize
from tests.models import build


def fake_quant(x: np.ndarray, scale: np.ndarray | float, lo: int = -128, hi: int = 127) -> np.ndarray:
    return np.clip(np.round(x / scale), lo, hi) * scale  # np.round: half to even, as QuantizeLinear


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            patch = xp[:, :, i : i + 3, j : j + 3]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out + b[None, :, None, None]


def reference(model: onnx.ModelProto, x: np.ndarray, amax: dict[str, float]) -> np.ndarray:
    init = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w, fc = init["w"], init["fc"]
    w_scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 127  # per output channel, max |w|
    fc_scale = np.abs(fc).max(axis=1) / 127  # Gemm with transB=1: rows are output channels
    wq = fake_quant(w, w_scale[:, None, None, None], -127, 127)
    fcq = fake_quant(fc, fc_scale[:, None], -127, 127)
    xq = fake_quant(x.astype(np.float64), amax["x"] / 127)
    h = np.maximum(conv2d(xq, wq, init["b"], pad=1), 0.0)  # bias stays float
    flat = h.mean(axis=(2, 3))
    return fake_quant(flat, amax["flat"] / 127) @ fcq.T + init["fb"]


@pytest.mark.parametrize("clip", [1.0, 0.5])  # 0.5: ranges below max |x|, so values saturate
def test_tensorrt_qdq_matches_independent_int8_arithmetic(clip: float) -> None:
    model = build("conv_relu_gemm")
    x = np.random.default_rng(0).normal(size=(6, 2, 4, 4)).astype(np.float32)
    sess = runtime.session(model.SerializeToString())
    amax = {"x": float(np.abs(x).max()) * clip, "flat": 2.5 * clip}
    qdq = quantize(model, amax, QuantizeOptions(target="tensorrt"))
    exact = runtime.session(qdq.SerializeToString(), optimize=False)
    (got,) = exact.run(None, {"x": x})
    np.testing.assert_allclose(got, reference(model, x, amax), rtol=1e-4, atol=1e-4)
    (fp32,) = sess.run(None, {"x": x})
    assert not np.allclose(got, fp32, atol=1e-6)  # quantisation really happened


def test_tensorrt_placement_per_channel_and_float_bias() -> None:
    model = build("conv_relu_gemm")
    qdq = quantize(model, {"x": 3.0, "conv": 5.0, "relu": 5.0, "flat": 2.0}, QuantizeOptions(target="tensorrt"))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            act, weight = node.input[0], node.input[1]
            assert producer[act].op_type == "DequantizeLinear"
            dq_w = producer[weight]
            assert dq_w.op_type == "DequantizeLinear"
            assert inits[dq_w.input[0]].data_type == onnx.TensorProto.INT8  # weights stored as int8
            scale = onnx.numpy_helper.to_array(inits[dq_w.input[1]])
            assert scale.shape == ((3,) if node.op_type == "Conv" else (4,))  # one scale per output channel
            w_float = onnx.numpy_helper.to_array(
                next(i for i in model.graph.initializer if i.name == ("w" if node.op_type == "Conv" else "fc"))
            )
            expected = np.abs(w_float.reshape(len(w_float), -1)).max(axis=1) / 127.0
            np.testing.assert_allclose(scale, expected, rtol=1e-6)  # symmetric max |w| per channel
            bias = node.input[2]
            assert bias in inits and inits[bias].data_type == onnx.TensorProto.FLOAT  # not quantized
        if node.op_type == "QuantizeLinear":
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            assert np.all(zp == 0)  # symmetric
    # TensorRT placement: the outputs of Conv/Gemm are not quantized
    consumers = {i for n in qdq.graph.node if n.op_type == "QuantizeLinear" for i in n.input[:1]}
    assert "conv" not in consumers and "y" not in consumers
    rows = {r["node"]: r for r in node_table(model, qdq)}
    assert rows["conv"]["precision"] == "int8" and rows["conv"]["weights"] == "per-channel"
    assert rows["relu"]["precision"] == "fp32"


def test_activation_scale_is_amax_over_127() -> None:
    model = build("conv_relu_gemm")
    qdq = quantize(model, {"x": 2.54, "flat": 1.27}, QuantizeOptions(target="tensorrt"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    scales = {n.input[0]: float(inits[n.input[1]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["x"] == pytest.approx(0.02, rel=1e-6)
    assert scales["flat"] == pytest.approx(0.01, rel=1e-6)


def _q_params(qdq: onnx.ModelProto, tensor: str) -> tuple[float, int, int]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    (q,) = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    zp = inits[q.input[2]]
    return float(inits[q.input[1]]), int(zp), zp.dtype.itemsize * (1 if zp.dtype.kind == "u" else -1)


def test_asymmetric_activations_use_the_observed_range_clipped_to_amax() -> None:
    model = build("conv_relu_gemm")
    # x is signed: [-2, 3] clipped by amax 2.5 to [-2, 2.5]; flat never goes negative: [0, 1.5]
    observed = {"x": (-2.0, 3.0), "flat": (0.0, 1.5)}
    amax = {"x": 2.5, "flat": 4.0}
    opts = QuantizeOptions(target="tensorrt", activations="asymmetric")
    qdq = quantize(model, amax, opts, observed)
    scale, zp, kind = _q_params(qdq, "x")
    assert kind == 1  # uint8
    assert scale == pytest.approx(4.5 / 255, rel=1e-6) and zp == round(2.0 / (4.5 / 255))
    scale, zp, _ = _q_params(qdq, "flat")
    assert scale == pytest.approx(1.5 / 255, rel=1e-6) and zp == 0  # all 256 levels on [0, 1.5]
    symmetric = quantize(model, amax, QuantizeOptions(target="tensorrt"))
    assert _q_params(symmetric, "flat") == (pytest.approx(4.0 / 127, rel=1e-6), 0, -1)  # int8, zero point 0
    with pytest.raises(ValueError, match="observed"):
        quantize(model, amax, opts)


def test_layer_error_reads_the_dequantized_value_when_ort_drops_a_clip() -> None:
    """ORT's asymmetric Q/DQ deletes Clip(0, 6) and Relu (its quantizer saturates there instead) and
    the Conv takes over the last output name, unclipped: only the DequantizeLinear behind it holds what
    the next layer sees, and per-layer error must compare that."""
    from pipeline.calibration.collect import expose
    from pipeline.transforms.quantization import dequantized_names

    model = build("clip_chain")
    x = (np.random.default_rng(0).normal(size=(16, 2, 4, 4)) * 3).astype(np.float32)
    tensors = ["conv", "relu6", "relu", "flat", "y", "top", "clipped"]
    values = dict(zip(tensors, runtime.session(expose(model, tensors)).run(tensors, {"x": x})))
    observed = {t: (float(v.min()), float(v.max())) for t, v in values.items()}
    observed["x"] = (float(x.min()), float(x.max()))
    amax = {t: max(abs(lo), abs(hi)) for t, (lo, hi) in observed.items()}
    qdq = quantize(model, amax, QuantizeOptions(target="onnxruntime", activations="asymmetric"), observed)
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    assert producers["relu"] == "Conv" and "relu6" not in producers  # Clip and Relu are gone
    names = [dequantized_names(qdq)["relu"], "relu"]
    dq, raw = runtime.session(expose(qdq, names), optimize=False).run(names, {"x": x})
    ref = values["relu"]

    def sqnr(y: np.ndarray) -> float:
        return float(10 * np.log10((ref**2).sum() / ((ref - y) ** 2).sum()))

    assert raw.min() < 0 and raw.max() > 6  # the float tensor of that name is the unclipped Conv
    assert sqnr(dq) > 30 and sqnr(raw) < 10


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("named", [True, False])  # unnamed nodes must still be excludable one by one
def test_nodes_without_ranges_stay_fp32(target: str, named: bool) -> None:
    model = build("conv_relu_gemm")
    if not named:
        for node in model.graph.node:
            node.name = ""
    ranged = {"x": 3.0, "conv": 1.0, "relu": 1.0, "gap": 1.0}  # nothing for flat (Flatten out, Gemm in) or y
    observed = {k: (-v, v) for k, v in ranged.items()}
    qdq = quantize(model, ranged, QuantizeOptions(target=target, activations="symmetric"), observed)
    producer = {o: n.op_type for n in qdq.graph.node for o in n.output}
    (conv,) = [n for n in qdq.graph.node if n.op_type == "Conv"]
    (gemm,) = [n for n in qdq.graph.node if n.op_type == "Gemm"]
    assert producer[conv.input[0]] == "DequantizeLinear"  # ranged: INT8
    assert producer.get(gemm.input[0]) != "DequantizeLinear" and gemm.input[1] == "fc"  # float weights, FP32
    x = np.random.default_rng(1).normal(size=(2, 2, 4, 4)).astype(np.float32)
    (y,) = runtime.session(qdq.SerializeToString(), optimize=False).run(None, {"x": x})
    assert y.shape == (2, 4) and np.isfinite(y).all()


def _exclude_b(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    from pipeline.transforms.keep_float import keep_float_inputs

    amax = {"x": 3.0, "a": 8.0, "b": 8.0}
    observed = {k: (-v, v) for k, v in amax.items()}
    qdq = quantize(model, amax, QuantizeOptions(target=target, exclude_nodes=("conv_b",)), observed)
    return keep_float_inputs(qdq, model, ["conv_b"])


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("name", ["shared_input_convs", "shared_weight_convs"])
def test_excluded_node_reads_float_although_a_quantized_sibling_shares_its_input(target: str, name: str) -> None:
    """exclude.nodes: [conv_b] while conv_a, which reads the same x (and weights), is quantized. ORT's
    quantizer leaves conv_b reading DQ(Q(x)) (and the INT8 weight); keep_float_inputs gives it back
    the float x and the FP32 weight, so its output is the FP32 model's, bit for bit."""
    model = build(name)
    qdq = _exclude_b(model, target)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    nodes = {n.name: n for n in qdq.graph.node}
    inits = {i.name: i for i in qdq.graph.initializer}
    for tensor in nodes["conv_b"].input:
        assert tensor not in producer, tensor  # the graph input or a float initializer, no DequantizeLinear
        assert tensor == "x" or inits[tensor].data_type == onnx.TensorProto.FLOAT
    assert {producer[t].op_type for t in nodes["conv_a"].input} == {"DequantizeLinear"}
    rows = {r["node"]: r["precision"] for r in node_table(model, qdq)}
    assert rows == {"conv_a": "int8", "conv_b": "fp32"}
    x = np.random.default_rng(2).normal(size=(3, 2, 4, 4)).astype(np.float32)
    fp32_a, fp32_b = runtime.session(model.SerializeToString(), optimize=False).run(["a", "b"], {"x": x})
    int8_a, int8_b = runtime.session(qdq.SerializeToString(), optimize=False).run(["a", "b"], {"x": x})
    np.testing.assert_array_equal(int8_b, fp32_b)
    assert not np.allclose(int8_a, fp32_a, atol=1e-4)  # the sibling really is INT8


def test_keep_float_inputs_recreates_a_relu_ort_folded_into_a_quantizer() -> None:
    """With asymmetric activations ORT deletes Clip(0, 6) and Relu before a QuantizeLinear (the
    quantizer saturates instead). An excluded Flatten reading that tensor gets Clip and Relu back on
    its float path; the Q/DQ pair nobody reads any more is removed."""
    from pipeline.calibration.collect import expose
    from pipeline.transforms.keep_float import keep_float_inputs

    model = build("clip_chain")
    amax = {"x": 6.0, "conv": 20.0, "relu6": 6.0, "relu": 6.0, "flat": 6.0, "y": 50.0, "top": 50.0, "clipped": 6.0}
    observed = {k: (-v, v) for k, v in amax.items()} | {"relu6": (0.0, 6.0), "relu": (0.0, 6.0), "flat": (0.0, 6.0)}
    opts = QuantizeOptions(target="onnxruntime", activations="asymmetric", exclude_nodes=("flatten",))
    qdq = quantize(model, amax, opts, observed)
    flatten = next(n for n in qdq.graph.node if n.name == "flatten")
    assert "DequantizeLinear" in {n.op_type for n in qdq.graph.node if flatten.input[0] in n.output}  # the bug
    keep_float_inputs(qdq, model, ["flatten"])
    onnx.checker.check_model(qdq, full_check=True)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    assert producer[flatten.input[0]].op_type == "Relu"
    assert "relu_QuantizeLinear" not in {n.name for n in qdq.graph.node}  # no consumer left
    assert {r["node"]: r["precision"] for r in node_table(model, qdq)}["flatten"] == "fp32"
    x = (np.random.default_rng(3).normal(size=(4, 2, 4, 4)) * 2).astype(np.float32)
    conv_out = next(n for n in qdq.graph.node if n.name == "conv").output[0]  # the Conv's raw output
    raw, flat = runtime.session(expose(qdq, [conv_out, "flat"]), optimize=False).run([conv_out, "flat"], {"x": x})
    assert raw.min() < 0 and raw.max() > 6
    np.testing.assert_array_equal(flat, np.clip(raw, 0.0, 6.0).reshape(len(x), -1))


def test_all_zero_calibration_data_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model input that was 0 in every sample gets no scale: before, the one warning blamed "a
    calibration cache without it", which a run from data never has."""
    from pipeline import log
    from pipeline.calibration.calibrator import calibrate
    from pipeline.graph.layout import Layout
    from steps.calibrate import warn_blank_inputs

    log.configure()
    model, path = build("conv_relu_gemm"), tmp_path / "m.onnx"
    onnx.save(model, str(path))
    zeros = np.zeros((8, 2, 4, 4), np.float32)
    ranges = calibrate(path, lambda: [{"x": zeros}], "minmax").ranges
    assert warn_blank_inputs(ranges, ["x"], Layout()) == ["x"]
    assert warn_blank_inputs(ranges, ["x"], Layout(constants=frozenset({"x"}))) == []  # e.g. an initial state
    quantize(model, ranges.amax(), QuantizeOptions(target="tensorrt"))
    err = capsys.readouterr().err
    assert "input(s) 'x' were 0 in every one of the 8 calibration samples" in err
    assert "stay FP32 because a tensor they would quantize was 0 on every calibration sample" in err
    assert "conv (x)" in err and "calibration cache without it" not in err
