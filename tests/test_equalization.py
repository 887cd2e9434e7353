"""Cross-layer equalization: exact in float, ranges balanced as computed by hand, what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper, numpy_helper

from pipeline.analysis import recovery
from pipeline.calibration.calibrator import calibrate
from pipeline.execution import runtime
from pipeline.orchestration.cli import EXIT_GATE_FAILED, main
from pipeline.transforms import equalization
from pipeline.transforms.quantization import QuantizeOptions, quantize
from tests.conftest import run_args
from tests.models import build


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), optimize=False), {"x": x})[0]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def test_equalized_model_is_exact_in_float_and_balances_each_channel() -> None:
    fp32 = build("mobile_block")
    eq, renamed, count = equalization.equalize(fp32)
    onnx.checker.check_model(eq, full_check=True)
    assert count == 2
    x = np.random.default_rng(0).normal(size=(16, 3, 6, 6)).astype(np.float32) * 2
    np.testing.assert_allclose(run(eq, x), run(fp32, x), rtol=1e-4, atol=1e-5)

    # by hand: pair 1 expand -> dw, s1 = sqrt(r_expand / r_dw); pair 2 then sees dw already scaled by s1
    w = weights(fp32)
    r1, r2 = np.abs(w["expand"]).max(axis=(1, 2, 3)), np.abs(w["dw"]).max(axis=(1, 2, 3))
    s1 = np.sqrt(r1 / r2)
    dw1 = w["dw"] * s1[:, None, None, None]
    s2 = np.sqrt(np.abs(dw1).max(axis=(1, 2, 3)) / np.abs(w["project"]).max(axis=(0, 2, 3)))
    new = weights(eq)
    np.testing.assert_allclose(new["expand"], w["expand"] / s1[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(new["dw"], dw1 / s2[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(new["project"], w["project"] * s2[None, :, None, None], rtol=1e-6)
    # pair 2 is balanced: dw's output channel c and project's input channel c share one range
    np.testing.assert_allclose(np.abs(new["dw"]).max(axis=(1, 2, 3)), np.abs(new["project"]).max(axis=(0, 2, 3)))

    # the ReLU6 became Relu then Min(6 / s1) per channel; every tensor between the pairs is renamed
    ops = {n.name: n for n in eq.graph.node}
    assert "relu6" not in ops and ops["relu6_equalized"].op_type == "Min"
    bound = {i.name: numpy_helper.to_array(i) for i in eq.graph.initializer}[ops["relu6_equalized"].input[1]]
    np.testing.assert_allclose(bound.reshape(-1), 6.0 / s1, rtol=1e-6)
    assert set(renamed) == {"e_equalized", "e6_equalized_relu", "e6_equalized", "d_equalized", "dr_equalized"}
    # new initializers replace the changed weights and biases (all of them here) instead of joining them
    assert {i.name for i in fp32.graph.initializer} & {i.name for i in eq.graph.initializer} == set()
    assert len(eq.graph.initializer) == len(fp32.graph.initializer) - 2 + 1  # - Clip's bounds + Min's


def _variant(change: str) -> onnx.ModelProto:
    model = build("mobile_block")
    nodes = {n.name: n for n in model.graph.node}
    if change == "shared":  # expand's output also read elsewhere: scaling it would change that reader
        model.graph.node.append(helper.make_node("Identity", ["e"], ["e_copy"], name="copy"))
        model.graph.output.append(helper.make_tensor_value_info("e_copy", onnx.TensorProto.FLOAT, None))
    elif change == "clip_below_zero":  # Clip(-1, 6) does not commute with a positive scale
        model.graph.initializer.append(numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"))
        nodes["relu6"].input[1] = "minus_one"
    elif change == "unnamed":  # pairs are tracked by node name: an unnamed Conv is left alone
        nodes["expand"].name = ""
    elif change == "runtime_bound":  # the upper bound is computed: no per-channel constant can replace it
        model.graph.node.insert(0, helper.make_node("Identity", ["six"], ["six_computed"], name="bound"))
        nodes["relu6"].input[2] = "six_computed"
    return model


@pytest.mark.parametrize(
    ("change", "skip", "expected"),
    [
        ("none", [], [("expand", "dw"), ("dw", "project")]),
        ("none", ["project"], [("expand", "dw")]),  # a node kept float is left alone
        ("shared", [], [("dw", "project")]),
        ("clip_below_zero", [], [("dw", "project")]),
        ("runtime_bound", [], [("dw", "project")]),
        ("unnamed", [], [("dw", "project")]),
    ],
)
def test_pairs_are_only_those_that_commute(change: str, skip: list[str], expected: list[tuple[str, str]]) -> None:
    model = _variant(change)
    assert [(p.first.name, p.second.name) for p in equalization.pairs(model, skip)] == expected
    eq, _, count = equalization.equalize(model, skip)
    assert count == len(expected)
    x = np.random.default_rng(1).normal(size=(4, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(eq, x), run(model, x), rtol=1e-4, atol=1e-5)


def test_equalization_lowers_per_tensor_weight_error_and_reverting_uses_its_float_weights(tmp_path: Path) -> None:
    fp32 = build("mobile_block")
    x = np.random.default_rng(2).normal(size=(64, 3, 6, 6)).astype(np.float32)
    ref = run(fp32, x)

    def q(model: onnx.ModelProto) -> onnx.ModelProto:
        onnx.save(model, str(tmp_path / "m.onnx"))
        cal = calibrate(tmp_path / "m.onnx", lambda: iter([{"x": x}]), "minmax")
        return quantize(model, cal.ranges.amax(), QuantizeOptions(target="tensorrt", per_channel=False))

    def error(out: np.ndarray) -> float:
        return float(np.sqrt(((out - ref) ** 2).mean() / (ref**2).mean()))

    eq = equalization.equalize(fp32)[0]
    plain, equalized = q(fp32), q(eq)
    assert error(run(equalized, x)) < 0.7 * error(run(plain, x))  # 0.017 against 0.031 when written
    # every node back in float is the FP32 function again
    all_float = recovery.revert(equalized, eq, ["expand", "dw", "project"])
    np.testing.assert_allclose(run(all_float, x), ref, rtol=1e-4, atol=1e-4)
    # one node back in float must take its equalized float weights: the FP32 model's (what the export
    # step holds) would meet the equalized activations of its neighbours
    assert error(run(recovery.revert(equalized, eq, ["dw"]), x)) < error(run(equalized, x))
    assert error(run(recovery.revert(equalized, fp32, ["dw"]), x)) > 0.1


def _digits_yaml(digits: Path, quantize_cfg: dict, validate_cfg: dict | None = None) -> Path:
    config = digits / "pipeline.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["steps"]["quantize"] = {**cfg["steps"].get("quantize", {}), **quantize_cfg}
    if validate_cfg is not None:
        cfg["steps"]["validate"] = {**cfg["steps"].get("validate", {}), **validate_cfg}
    cfg["steps"].pop("benchmark", None)
    cfg["steps"].pop("promote", None)
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.slow
def test_pipeline_equalizes_calibrates_the_new_tensors_and_recovers_with_its_float_model(
    digits_copy: Path, tracking_uri: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    config = _digits_yaml(
        digits_copy,
        # unshifted: the QuantizeLinear reads the renamed tensor itself (a shift would read x - c)
        # FP32 float regions: the scales below are checked exactly, not as FP16 rounds them
        {"per_channel": False, "equalization": True, "shift_activations": False, "float_precision": "fp32"},
        {"metric": "cosine", "max_drop": 0.0, "recover": {"max_fp_nodes": 20}},
    )
    summary = tmp_path / "s.json"
    code = main([*run_args(config, tracking_uri, summary), "--set", "steps.calibrate.method=minmax"])
    assert code == EXIT_GATE_FAILED
    s = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri)
    quantize_run = client.get_run(s["steps"]["quantize"])
    assert quantize_run.data.metrics["equalized_pairs"] == 2  # the two residual bodies: Conv -> Relu -> Conv
    folder = Path(client.download_artifacts(quantize_run.info.run_id, "model", str(tmp_path)))
    float_model, int8 = onnx.load(str(folder / "model_float.onnx")), onnx.load(str(folder / "model_int8.onnx"))
    onnx.checker.check_model(int8, full_check=True)
    # a renamed tensor's scale is its own max |x| / 127 over the calibration data, measured here with ORT
    from pipeline.calibration.collect import expose

    cal = np.load(digits_copy / "data" / "calibration.npz")["input"]
    q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith("_equalized"))
    (value,) = runtime.run(runtime.session(expose(float_model, [q.input[0]])), {"input": cal})
    scale = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}[q.input[1]]
    np.testing.assert_allclose(float(scale) * 127, np.abs(value).max(), rtol=1e-5)
    # recovery (max_drop 0 never passes) reverted one node more at a time, each to the equalized model's
    # float weights: never worse than the INT8 model. FP32's weights would meet equalized activations.
    validate = client.get_run(s["steps"]["validate"]).data.metrics
    curve = client.get_metric_history(s["steps"]["validate"], "recovery_cosine")
    assert len(curve) >= 6 and validate["recovered_fp_nodes"] >= 1
    assert min(m.value for m in curve) >= curve[0].value - 1e-4


@pytest.mark.slow
def test_without_samples_or_with_per_channel_weights_it_says_so(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per-channel weights: equalized, with a warning that it is meant for per-tensor ones. A cache
    without data.calibration: nothing to calibrate the renamed tensors on, so no equalization, said."""
    from mlflow import MlflowClient

    onnx.save(build("mobile_block"), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(4).normal(size=(16, 3, 6, 6)).astype(np.float32))

    def pipeline(data: dict, calibrate: dict) -> Path:
        path = tmp_path / "pipeline.yaml"
        steps = {"export": {}, "calibrate": calibrate, "quantize": {"equalization": True}}
        path.write_text(yaml.safe_dump({"name": "eq", "model": {"onnx": "model.onnx"}, "data": data, "steps": steps}))
        return path

    capsys.readouterr()
    first = tmp_path / "first.json"
    assert main(run_args(pipeline({"calibration": {"npz": "cal.npz"}}, {}), tracking_uri, first)) == 0
    assert "it is meant for per_channel: false" in capsys.readouterr().err
    client = MlflowClient(tracking_uri)
    quantize_run = json.loads(first.read_text())["steps"]["quantize"]
    assert client.get_run(quantize_run).data.metrics["equalized_pairs"] == 2
    cache = client.download_artifacts(json.loads(first.read_text())["steps"]["calibrate"], "calibration", str(tmp_path))
    second = tmp_path / "second.json"
    config = pipeline({}, {"from_cache": str(Path(cache) / "calibration.cache")})
    assert main(run_args(config, tracking_uri, second)) == 0
    assert "no equalization (it needs data.calibration samples)" in capsys.readouterr().err
    run = client.get_run(json.loads(second.read_text())["steps"]["quantize"])
    assert "equalized_pairs" not in run.data.metrics
    # no model_float.onnx: nothing was equalized (the FP32-regions Q/DQ model is there for recovery)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == [
        "model/model_int8.onnx",
        "model/model_qdq_fp32_regions.onnx",
    ]
