"""GPTQ weight rounding against known answers: the receptive fields it builds H from reproduce ONNX
Runtime's Conv, a hand-solved rounding, and a Conv whose output error is measured by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient
from onnx import numpy_helper

from pipeline.execution import runtime
from pipeline.graph.model import toposort
from pipeline.orchestration.cli import main
from pipeline.transforms import weight_rounding
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.conftest import run_args, run_pipeline
from tests.models import build


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), {"x": x})[0]


@pytest.mark.parametrize("name", ["stem_conv", "depthwise_conv", "grouped_conv_no_bias", "dilated_grouped_conv"])
def test_receptive_fields_times_the_weights_are_the_conv(name: str) -> None:
    model = build(name)
    node = model.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = inits[node.input[1]]
    bias = inits[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).normal(size=(2, *dims)).astype(np.float32)
    expected = _run(model, x)
    rows = weight_rounding.receptive_fields(x[1], node, w)
    groups, per = rows.shape[0], w.shape[0] // rows.shape[0]
    got = np.concatenate([rows[g] @ w[g * per : (g + 1) * per].reshape(per, -1).T for g in range(groups)], axis=1)
    np.testing.assert_allclose(got.T.reshape(expected.shape[1:]) + bias[:, None, None], expected[1], atol=1e-4)


def test_gptq_moves_a_rounding_error_onto_the_input_that_repeats_it() -> None:
    # inputs 1 and 2 are always equal, input 0 independent: H = [[1, 0, 0], [0, 1, 1], [0, 1, 1]].
    # Weights 1.0, 0.3 and 0.3 steps of 1/127: nearest rounds both small ones to 0, an output error
    # of 0.6 steps; GPTQ rounds the first to 0 and hands its 0.3 to the second, whose 0.6 rounds to 1:
    # an error of 0.4 steps. The large weight sits on the grid and hands nothing on.
    h = np.array([[1.0, 0, 0], [0, 1, 1], [0, 1, 1]])
    s = 1 / 127
    w = np.array([[1.0, 0.3 * s, 0.3 * s]])
    assert weight_rounding.gptq(w, np.array([s]), h).tolist() == [[127, 0, 1]]
    # without the correlation, each weight keeps its own nearest value
    assert weight_rounding.gptq(w, np.array([s]), np.eye(3)).tolist() == [[127, 0, 0]]


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """Neighbouring pixels correlated, as in photos: 3×3 noise upsampled to 9×9, plus a little grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 3, 3, 3))
    return (np.kron(coarse, np.ones((1, 1, 3, 3))) + 0.1 * rng.normal(size=(n, 3, 9, 9))).astype(np.float32)


def _with_weights(model: onnx.ModelProto, w: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    return out


def _dequantized_weight(qdq: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    q, scale = inits[dq.input[0]], inits[dq.input[1]]
    return q, q.astype(np.float64) * scale.reshape(-1, 1, 1, 1)


def test_gptq_lowers_the_conv_output_error_on_samples_it_did_not_see() -> None:
    fp32 = build("stem_conv")
    calibration, held_out = _smooth_images(256, 1), _smooth_images(256, 2)
    amax = float(np.abs(calibration).max())
    opts = QuantizeOptions(target="tensorrt")
    nearest = quantize(fp32, {"x": amax}, opts, {"x": (-amax, amax)})
    rounded = quantize(fp32, {"x": amax}, opts, {"x": (-amax, amax)})
    batches = [{"x": calibration[i : i + 64]} for i in range(0, 256, 64)]
    assert weight_rounding.round_weights(fp32, rounded, batches, samples=256) == (1, 256)
    toposort(rounded)
    onnx.checker.check_model(rounded, full_check=True)

    q_near, w_near = _dequantized_weight(nearest)
    q_gptq, w_gptq = _dequantized_weight(rounded)
    assert q_gptq.dtype == np.int8 and np.abs(q_gptq).max() <= 127
    assert (q_gptq != q_near).mean() > 0.1  # it did re-round
    # the FP32 Conv with each set of dequantized weights, run by ONNX Runtime: only the weights differ
    reference = _run(fp32, held_out)
    err_near = np.mean((_run(_with_weights(fp32, w_near), held_out) - reference) ** 2)
    err_gptq = np.mean((_run(_with_weights(fp32, w_gptq), held_out) - reference) ** 2)
    assert err_gptq < 0.7 * err_near, (err_gptq, err_near)


@pytest.mark.slow
def test_pipeline_rounds_the_int8_convs_by_gptq(digits_copy: Path, tracking_uri: str, tmp_path: Path) -> None:
    config = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    for step in ("benchmark", "promote"):
        cfg["steps"].pop(step)
    config.write_text(yaml.safe_dump(cfg))
    nearest = run_pipeline(config, tracking_uri, tmp_path)
    gptq = run_pipeline(config, tracking_uri, tmp_path, "steps.quantize.weight_rounding=gptq")
    assert gptq["gate"] == "passed"
    client = MlflowClient(tracking_uri)
    run = client.get_run(gptq["steps"]["quantize"])
    table = client.download_artifacts(run.info.run_id, "quantize/nodes_table.json", str(tmp_path / "t"))
    raw = json.loads(Path(table).read_text())
    rows = [dict(zip(raw["columns"], r)) for r in raw["data"]]
    int8_convs = sum(r["op_type"] == "Conv" and r["precision"] == "int8" for r in rows)
    assert int8_convs > 0 and run.data.metrics["gptq_rounded_nodes"] == int8_convs
    assert client.get_run(nearest["steps"]["quantize"]).data.metrics["gptq_rounded_nodes"] == 0

    models = {}
    for name, s in (("nearest", nearest), ("gptq", gptq)):
        path = client.download_artifacts(s["steps"]["quantize"], "model/model_int8.onnx", str(tmp_path / name))
        models[name] = onnx.load(path)
        onnx.checker.check_model(models[name], full_check=True)
    inits = {k: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for k, m in models.items()}
    weights = [n for n in models["gptq"].graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits["gptq"]]
    int8 = [n for n in weights if inits["gptq"][n.input[0]].dtype == np.int8]
    assert int8 and any(not np.array_equal(inits["gptq"][n.input[0]], inits["nearest"][n.input[0]]) for n in int8)
    for n in int8:  # other INT8 values on the very same grid
        np.testing.assert_array_equal(inits["gptq"][n.input[1]], inits["nearest"][n.input[1]])
    # what promote would register loads (save_model moves the weights of the proto it is given to a file)
    mlflow.onnx.save_model(models["gptq"], str(tmp_path / "saved"), pip_requirements=["onnx"])
    assert len(mlflow.onnx.load_model(str(tmp_path / "saved")).graph.node) == len(models["nearest"].graph.node)


def test_weight_rounding_samples_must_be_positive(
    digits_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = run_args(digits_copy / "pipeline.yaml", uri, tmp_path / "s.json", "steps.quantize.weight_rounding_samples=0")
    assert main(args) == 2
    assert "steps.quantize.weight_rounding_samples: expected a positive number of samples, got 0" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run


def test_a_conv_with_implicit_padding_keeps_nearest_rounding() -> None:
    fp32 = build("stem_conv")
    node = fp32.graph.node[0]
    del node.attribute[:]
    node.attribute.extend(
        [onnx.helper.make_attribute("strides", [2, 2]), onnx.helper.make_attribute("auto_pad", "SAME_UPPER")]
    )
    x = _smooth_images(64, 3)
    amax = float(np.abs(x).max())
    qdq = quantize(fp32, {"x": amax}, QuantizeOptions(target="tensorrt"), {"x": (-amax, amax)})
    before, _ = _dequantized_weight(qdq)
    assert weight_rounding.round_weights(fp32, qdq, [{"x": x}], samples=64) == (0, 0)
    np.testing.assert_array_equal(_dequantized_weight(qdq)[0], before)


@pytest.mark.slow
def test_without_calibration_samples_it_warns_and_rounds_to_nearest(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrated from a TensorRT cache, a pipeline has no samples to take H from (nor to measure
    bias correction on): the step says so and keeps nearest rounding instead of failing."""
    onnx.save(build("stem_conv"), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "cal.npz", x=_smooth_images(64, 4))

    def pipeline(data: dict, calibrate: dict) -> Path:
        path = tmp_path / "pipeline.yaml"
        steps = {"export": {}, "calibrate": calibrate, "quantize": {"weight_rounding": "gptq"}}
        path.write_text(yaml.safe_dump({"name": "wr", "model": {"onnx": "model.onnx"}, "data": data, "steps": steps}))
        return path

    client = MlflowClient(tracking_uri)
    first = run_pipeline(pipeline({"calibration": {"npz": "cal.npz"}}, {}), tracking_uri, tmp_path)
    assert client.get_run(first["steps"]["quantize"]).data.metrics["gptq_rounded_nodes"] == 1
    cache = client.download_artifacts(first["steps"]["calibrate"], "calibration", str(tmp_path))
    capsys.readouterr()
    second = run_pipeline(pipeline({}, {"from_cache": str(Path(cache) / "calibration.cache")}), tracking_uri, tmp_path)
    err = capsys.readouterr().err
    assert "no GPTQ weight rounding (it needs data.calibration samples)" in err
    # bias correction is auto: without samples it is decided off, and the log says so
    assert "bias_correction=off" in err
    metrics = client.get_run(second["steps"]["quantize"]).data.metrics
    assert metrics["gptq_rounded_nodes"] == 0 and metrics["bias_corrected_nodes"] == 0


def _two_convs(channels: int) -> onnx.ModelProto:
    """x -> Conv a -> Relu -> Conv b, 3x3 over ``channels``: second moments of D = 9·channels each."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.normal(size=(channels, channels, 3, 3)) * 0.1).astype(np.float32), name)
        for name in ("wa", "wb")
    ]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "wa"], ["a"], name="a", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["a"], ["r"], name="relu"),
        onnx.helper.make_node("Conv", ["r", "wb"], ["y"], name="b", pads=[1, 1, 1, 1]),
    ]
    shape = [None, channels, 6, 6]
    graph = onnx.helper.make_graph(
        nodes,
        "two_convs",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_gptq_stays_within_the_memory_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Second moments are checked against memory_mb before they are allocated: a Conv whose moments alone
    do not fit keeps nearest rounding (named in a warning); Convs that fit one at a time are measured in
    several passes, with the same result as one pass."""
    from pipeline.calibration.calibrator import calibrate

    fp32 = _two_convs(36)  # D = 324: 0.8 MB of float64 moments per Conv, 2.9 MB while rounding one
    convs = weight_rounding.convs(fp32, quantize(fp32, {"x": 1.0, "r": 1.0}, QuantizeOptions(), None))
    assert [weight_rounding.moment_bytes(c) for c in convs] == [324 * 324 * 8] * 2
    x = np.random.default_rng(4).normal(size=(16, 36, 6, 6)).astype(np.float32)
    onnx.save(fp32, tmp_path / "m.onnx")
    ranges = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax").ranges
    amax, minmax = ranges.amax(), {k: (v.min, v.max) for k, v in ranges.tensors.items()}

    def rounded(memory_mb: int) -> tuple[tuple[int, int], onnx.ModelProto]:
        qdq = quantize(fp32, amax, QuantizeOptions(target="tensorrt"), minmax)
        batches = ({"x": x[i : i + 4]} for i in range(0, 16, 4))  # an iterator: read once
        return weight_rounding.round_weights(fp32, qdq, batches, samples=16, memory_mb=memory_mb), qdq

    nearest = quantize(fp32, amax, QuantizeOptions(target="tensorrt"), minmax)
    with caplog.at_level("WARNING", logger="int8pipe"):
        counts, none_fit = rounded(2)
    assert counts == (0, 0) and none_fit.SerializeToString() == nearest.SerializeToString()
    assert "GPTQ leaves a rounded to nearest" in caplog.text and "GPTQ leaves b rounded to nearest" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="int8pipe"):
        counts, two_passes = rounded(3)
    assert counts == (2, 16) and "in 2 passes" in caplog.text
    counts, one_pass = rounded(512)
    assert counts == (2, 16)
    assert two_passes.SerializeToString() == one_pass.SerializeToString() != nearest.SerializeToString()
