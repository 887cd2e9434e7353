"""Task-aware validation: metrics with the FP32 reference, multi-output models, class-score checks,
the samples hand-off, the gate message, and the detection metric example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from examples.metrics.detection import detections, detections_kept, nms
from pipeline.analysis import evaluation
from pipeline.errors import ConfigError
from pipeline.execution import runtime
from pipeline.orchestration.cli import main
from steps.validate import Validate, ValidateConfig, gate_message
from tests.conftest import npz_pipeline
from tests.models import build

# --- evaluation: plain numerics ---------------------------------------------------------------


@pytest.mark.parametrize(("drop", "passed"), [(0.01, True), (0.0100001, False), (0.005, True), (-0.02, True)])
def test_gate_passes_up_to_and_including_max_drop(drop: float, passed: bool) -> None:
    assert evaluation.gate_passed(drop, 0.01) is passed


def test_cosine_scores_int8_against_fp32_and_fp32_scores_exactly_one() -> None:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(16, 10)).astype(np.float32)
    int8 = fp32 + rng.normal(size=fp32.shape).astype(np.float32) * 0.3
    fp32_score = evaluation.score("cosine", fp32, None, fp32)
    int8_score = evaluation.score("cosine", int8, None, fp32)
    assert fp32_score == 1.0  # exactly: identical rows
    assert 0.5 < int8_score < 1.0  # INT8 against FP32, not FP32 against itself
    a, b = fp32.astype(float), int8.astype(float)
    expected = np.mean((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert int8_score == pytest.approx(expected, rel=1e-9)
    assert fp32_score - int8_score > 0  # drop = FP32 - INT8: positive when INT8 is worse


def test_drop_sign_is_fp32_minus_int8() -> None:
    labels = np.array([0, 1, 2, 3])
    fp32 = np.eye(4, dtype=np.float32) * 5  # every sample right
    int8 = fp32.copy()
    int8[0] = [0, 5, 0, 0]  # one sample wrong
    fp32_score = evaluation.score("top1", fp32, labels, fp32)
    int8_score = evaluation.score("top1", int8, labels, fp32)
    assert (fp32_score, int8_score) == (1.0, 0.75)
    assert fp32_score - int8_score == 0.25
    assert evaluation.score("agreement", int8, None, fp32) == 0.75


def test_per_sample_scores_average_to_the_metric_and_give_the_drop_standard_error() -> None:
    labels = np.array([0, 1, 2, 3])
    fp32 = np.eye(4, dtype=np.float32) * 5
    fp32[1] = [5, 0, 0, 0]  # FP32 wrong on sample 1
    int8 = np.eye(4, dtype=np.float32) * 5  # INT8 right on sample 1 ...
    int8[2] = [0, 0, 0, 5]  # ... and wrong on sample 2
    for metric, got in [("top1", labels), ("agreement", None), ("cosine", None)]:
        each = evaluation.per_sample(metric, int8, got, fp32)
        assert each.shape == (4,) and each.mean() == evaluation.score(metric, int8, got, fp32)
    hits = evaluation.per_sample("top1", int8, labels, fp32)
    assert hits.tolist() == [1.0, 1.0, 0.0, 1.0]
    # paired: d = fp32 - int8 = [0, -1, 1, 0], mean 0, sample std sqrt(2/3), se sqrt(2/3)/2
    fp32_hits = evaluation.per_sample("top1", fp32, labels, fp32)
    assert evaluation.drop_standard_error(fp32_hits, hits) == pytest.approx(np.sqrt(2 / 3) / 2, rel=1e-12)
    # agreement: FP32 agrees with itself everywhere, INT8 misses sample 1 and 2: d = [0, 1, 1, 0]
    agree = evaluation.per_sample("agreement", int8, None, fp32)
    assert agree.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert evaluation.drop_standard_error(np.ones(4), agree) == pytest.approx(np.sqrt(1 / 3) / 2, rel=1e-12)
    assert evaluation.drop_standard_error(np.ones(1), np.zeros(1)) is None  # one sample says nothing of spread


def test_gate_message_says_when_the_drop_is_within_two_standard_errors() -> None:
    nodes = [{"node": "conv1", "added_sqnr_db": 9.0}]
    near = gate_message("agreement", 1.0, 0.94, 0.06, 0.05, nodes, drop_se=0.02, samples=128)
    assert "within two standard errors (+-0.0200 on 128 samples) of max_drop" in near
    assert "data.validation" in near and 'steps.quantize.exclude.nodes: ["conv1"]' in near
    far = gate_message("agreement", 1.0, 0.80, 0.20, 0.05, nodes, drop_se=0.02, samples=128)
    assert "standard error" not in far
    assert "standard error" not in gate_message("det", 1.0, 0.8, 0.2, 0.19, nodes)  # custom metric: no se
    assert "standard error" not in gate_message("top1", 1.0, 0.9, 0.1, 0.1, nodes, drop_se=0.0, samples=10)


def test_cosine_of_an_output_wiped_to_zero_is_zero_not_one() -> None:
    """An INT8 output that quantization wiped to zeros matches nothing; two all-zero rows are identical."""
    ref = np.array([[1.0, 2.0], [0.0, 0.0]])
    assert evaluation.cosine_rows(ref, np.zeros((2, 2))).tolist() == [0.0, 1.0]
    assert evaluation.score("cosine", np.zeros((2, 2)), None, ref) == 0.5
    wiped, both = evaluation.ErrorAccumulator(), evaluation.ErrorAccumulator()
    wiped.update(ref[0], np.zeros(2))
    both.update(np.zeros(3), np.zeros(3))
    assert (wiped.cosine, both.cosine) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("shape", "is_class"),
    [((4, 10), True), ((4, 10, 1, 1), True), ((4, 2), True), ((4, 1), False), ((4, 6, 64), False), ((4,), False)],
)
def test_class_scores_are_2d_after_trailing_singletons_with_two_or_more_classes(shape: tuple, is_class: bool) -> None:
    got = evaluation.class_scores(np.zeros(shape, np.float32))
    assert (got is not None) is is_class
    if got is not None:
        assert got.shape == shape[:2]


def test_builtin_class_metrics_refuse_a_detector_output() -> None:
    det = np.random.default_rng(1).random((4, 6, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="class scores"):
        evaluation.score("agreement", det, None, det)
    assert evaluation.score("cosine", det, None, det) == 1.0


def test_custom_metrics_with_and_without_the_reference() -> None:
    ref, out, labels = np.ones((2, 3)), np.zeros((2, 3)), np.array([0, 1])
    seen: list[tuple] = []

    def two(outputs: Any, labels: Any) -> float:
        seen.append(("two", outputs is out))
        return 0.5

    def three(outputs: Any, labels: Any, reference: Any) -> float:
        seen.append(("three", outputs is out, reference is ref))
        return 0.25

    def star(*args: Any) -> float:
        return float(len(args))

    def defaulted(outputs: Any, labels: Any, reference: Any = None, *, threshold: float = 0.5) -> float:
        return 1.0 if reference is ref else 0.0

    assert evaluation.custom_score(two, out, labels, ref) == 0.5
    assert evaluation.custom_score(three, out, labels, ref) == 0.25
    assert evaluation.custom_score(star, out, labels, ref) == 3.0
    assert evaluation.custom_score(defaulted, out, labels, ref) == 1.0
    assert seen == [("two", True), ("three", True, True)]
    for bad in (lambda outputs: 0.0, lambda a, b, c, d: 0.0):
        with pytest.raises(ValueError, match=r"fn\(outputs, labels, reference\)"):
            evaluation.metric_arity(bad)


@pytest.mark.parametrize(
    ("metric", "output", "names", "expected"),
    [
        ("top1", None, ["logits"], (["logits"], False)),
        ("top1", None, ["det", "feat"], (["det"], False)),  # built-ins score the first output
        ("m:f", None, ["logits"], (["logits"], False)),  # one output: an array, as before
        ("m:f", None, ["det", "feat"], (["det", "feat"], True)),  # several: all of them, as a dict
        ("m:f", "feat", ["det", "feat"], (["feat"], False)),  # a name: that array
        ("m:f", ["feat"], ["det", "feat"], (["feat"], True)),  # a list: always a dict
        ("cosine", ["feat"], ["det", "feat"], (["feat"], False)),
    ],
)
def test_which_outputs_a_metric_receives(metric: str, output: Any, names: list[str], expected: tuple) -> None:
    assert Validate._scored(ValidateConfig(metric=metric, output=output), names) == expected


def test_unknown_output_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="validate.output: the model has no output 'probs'; its outputs are a, b"):
        Validate._scored(ValidateConfig(output=["a", "probs"]), ["a", "b"])


def test_gate_message_names_the_worst_quantized_nodes_ready_to_paste() -> None:
    nodes = [{"node": n, "added_sqnr_db": s} for n, s in [("/head/Conv", 3.0), ("conv1", 9.0), ("fc", 20.0), ("x", 40)]]
    msg = gate_message("cosine", 1.0, 0.9, 0.1, 0.01, nodes)
    assert 'steps.quantize.exclude.nodes: ["/head/Conv", "conv1", "fc"]' in msg
    assert "FP32 1.0000 -> INT8 0.9000" in msg and "max_drop=0.01" in msg
    pasted = yaml.safe_load(msg.split("steps.quantize.exclude.nodes: ")[1].split("]")[0] + "]")
    assert pasted == ["/head/Conv", "conv1", "fc"]


# --- the detection metric example ---------------------------------------------------------------


def _yolo(boxes: list[tuple[float, ...]], classes: int = 3, anchors: int = 12) -> np.ndarray:
    """One sample [4 + C, A]: the given (cx, cy, w, h, class, score) on the first anchors, the rest empty."""
    pred = np.zeros((4 + classes, anchors), np.float32)
    pred[:4] = 0.1
    for a, (cx, cy, w, h, c, s) in enumerate(boxes):
        pred[:4, a] = cx, cy, w, h
        pred[4 + int(c), a] = s
    return pred


SCENE = [(10, 10, 4, 4, 0, 0.9), (30, 10, 6, 6, 1, 0.8), (10, 30, 4, 8, 2, 0.7), (30, 30, 5, 5, 0, 0.6)]


def test_detections_apply_threshold_and_per_class_nms() -> None:
    # a duplicate of box 0 (same class, IoU 0.8) is suppressed; the same box of another class is not
    pred = _yolo([*SCENE, (10.2, 10, 4, 4, 0, 0.85), (10, 10, 4, 4, 1, 0.5), (50, 50, 4, 4, 1, 0.2)])
    boxes, scores, classes = detections(pred)
    assert list(scores) == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])  # 0.85 suppressed, 0.2 below 0.25
    assert list(classes) == [0, 1, 2, 0, 1]
    assert boxes[0] == pytest.approx([8, 8, 12, 12])
    assert list(nms(np.array([[0, 0, 2, 2], [0, 0, 2, 2.1], [5, 5, 6, 6]], float), np.array([0.5, 0.9, 0.1]))) == [1, 2]


def test_detections_kept_identical_is_one() -> None:
    ref = np.stack([_yolo(SCENE), _yolo(SCENE[:2])])
    assert detections_kept(ref, None, ref) == 1.0
    assert detections_kept({"det": ref.copy()}, None, {"det": ref}) == 1.0  # one output given as a dict
    assert detections_kept(np.zeros_like(ref[:, :, :0]), None, np.zeros_like(ref[:, :, :0])) == 1.0  # nothing to keep


def test_detections_kept_counts_dropped_detections_exactly() -> None:
    ref = np.stack([_yolo(SCENE), _yolo(SCENE[:2])])  # 4 + 2 = 6 FP32 detections
    out = np.stack([_yolo(SCENE[:3]), _yolo(SCENE[:1])])  # k = 2 of them missing
    assert detections_kept(out, None, ref) == 4 / 6
    low = ref.copy()
    low[0, 4 + 1, 1] = 0.2  # below the score threshold: dropped
    assert detections_kept(low, None, ref) == 5 / 6


def test_detections_kept_shifted_or_relabelled_boxes_score_lower() -> None:
    ref = _yolo(SCENE)[None]
    slightly = _yolo([(10.3, 10, 4, 4, 0, 0.9), *SCENE[1:]])[None]  # IoU 0.86: still the same detection
    assert detections_kept(slightly, None, ref) == 1.0
    shifted = _yolo([(12, 10, 4, 4, 0, 0.9), *SCENE[1:]])[None]  # IoU 1/3 < 0.5: lost
    assert detections_kept(shifted, None, ref) == 3 / 4
    relabelled = _yolo([(10, 10, 4, 4, 1, 0.9), *SCENE[1:]])[None]  # right box, wrong class
    assert detections_kept(relabelled, None, ref) == 3 / 4


def test_detections_kept_matches_each_int8_detection_once() -> None:
    ref = _yolo([(10, 10, 4, 4, 0, 0.9), (10, 12.5, 4, 4, 0, 0.8)])[None]  # IoU 0.23: both kept by NMS
    out = _yolo([(10, 11.2, 4, 4, 0, 0.9)])[None]  # overlaps both with IoU >= 0.5, may match only one
    assert detections_kept(out, None, ref) == 1 / 2


# --- the validate step on a two-output detector ---------------------------------------------------

METRIC = """
import json
import numpy as np

def received(outputs, labels, reference):
    kinds = {k: list(v.shape) for k, v in outputs.items()}
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps({"outputs": kinds, "reference": sorted(reference), "same": outputs is reference}) + "\\n")
    return -float(np.abs(outputs["det"] - reference["det"]).max())
"""


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("detector")
    rng = np.random.default_rng(4)
    cal, val = (rng.normal(size=(n, 3, 8, 8)).astype(np.float32) for n in (32, 20))
    (folder / "taskmetric.py").write_text(METRIC)
    steps = {
        "export": {},
        "calibrate": {"method": "minmax", "batch_size": 16},
        "quantize": {},
        "validate": {"metric": "taskmetric:received", "max_drop": 1.0, "batch_size": 6, "layer_report": "always"},
    }
    npz_pipeline(folder, build("tiny_detector"), {"x": cal}, {"x": val}, steps, name="detector")
    return {"folder": folder, "uri": f"sqlite:///{folder / 'mlflow.db'}"}


def _run(detector: dict[str, Any], *overrides: str) -> tuple[int, dict[str, Any] | None]:
    folder = detector["folder"]
    summary = folder / "s.json"
    summary.unlink(missing_ok=True)
    args = ["run", str(folder / "pipeline.yaml"), "--tracking-uri", detector["uri"], "--summary-json", str(summary)]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    return code, json.loads(summary.read_text()) if summary.exists() else None


@pytest.mark.slow
def test_custom_metric_gets_every_output_and_the_fp32_reference(
    detector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, uri = detector["folder"], detector["uri"]
    monkeypatch.chdir(folder)
    code, s = _run(detector)
    assert code == 0 and s is not None
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    shapes = {"det": [20, 6, 64], "feat": [20, 8]}
    assert calls == [  # FP32 score first (outputs are the reference), then INT8
        {"outputs": shapes, "reference": ["det", "feat"], "same": True},
        {"outputs": shapes, "reference": ["det", "feat"], "same": False},
    ]
    metrics = MlflowClient(uri).get_run(s["steps"]["validate"]).data.metrics
    assert metrics["fp32_received"] == 0.0 and metrics["int8_received"] < 0
    assert metrics["accuracy_drop"] == -metrics["int8_received"]  # FP32 - INT8
    assert "top1_agreement" not in metrics  # det is no class-score output: an argmax would mean nothing
    assert 0.9 < metrics["cosine_mean"] <= 1.0

    art = Path(mlflow.artifacts.download_artifacts(run_id=s["steps"]["validate"], tracking_uri=uri))
    report = json.loads((art / "validation/report.json").read_text())
    assert report["outputs"] == ["det", "feat"] and report["metric_receives"] == "dict"
    samples = np.load(art / "validation/samples.npz")
    assert sorted(samples.files) == ["fp32.det", "fp32.feat", "input.x", "int8.det", "int8.feat"]
    x = samples["input.x"]
    np.testing.assert_array_equal(x, np.load(folder / "val.npz")["x"][:8])  # the first 8 samples
    quantize = Path(mlflow.artifacts.download_artifacts(run_id=s["steps"]["quantize"], tracking_uri=uri))
    int8 = runtime.session(quantize / "model/model_int8.onnx", optimize=False)  # as validate ran it (tensorrt)
    fp32 = runtime.session(folder / "model.onnx")
    for name, want in zip(["det", "feat"], int8.run(["det", "feat"], {"x": x})):
        np.testing.assert_array_equal(samples[f"int8.{name}"], want)
    for name, want in zip(["det", "feat"], fp32.run(["det", "feat"], {"x": x})):
        np.testing.assert_allclose(samples[f"fp32.{name}"], want, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(samples["fp32.det"], samples["int8.det"])

    table = json.loads((art / "validation/layer_errors_table.json").read_text())
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    # the nodes reading r1's dequantized value: the head conv, and the pooling that shares its Q/DQ
    assert set(rows["r1"]["node"].split(", ")) == {"head", "gap"}
    assert rows["x"]["node"] == "conv1" and rows["s"]["node"] == ""  # the Sigmoid output is float
    ranked = report["quantized_nodes"]
    assert {r["node"] for r in ranked} == {"conv1", "head", "gap"}  # the int8 rows of nodes_table
    assert [r["added_sqnr_db"] for r in ranked] == sorted(r["added_sqnr_db"] for r in ranked)  # worst first
    assert [r["node"] for r in ranked] == ["head", "conv1", "gap"]
    assert ranked[-1]["added_sqnr_db"] == 999.0  # averaging adds no noise (its output is cleaner than its input)
    conv1 = next(r for r in ranked if r["node"] == "conv1")
    assert conv1["input_sqnr_db"] == 999.0 and conv1["added_sqnr_db"] == conv1["output_sqnr_db"]  # exact input


@pytest.mark.slow
def test_class_score_metric_on_a_detector_output_is_a_data_error(
    detector: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run(detector, "steps.validate.metric=agreement")
    assert code == 2
    err = capsys.readouterr().err
    assert "needs class scores" in err and "'det' has shape [20, 6, 64]" in err and "metric: cosine" in err
    assert "Traceback" not in err
    code, s = _run(detector, "steps.validate.metric=agreement", "steps.validate.output=feat")
    assert code == 0 and s is not None and "top1_agreement" in s["metrics"]


@pytest.mark.slow
def test_drop_standard_error_is_logged_for_built_in_metrics_only(
    detector: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validate run's accuracy_drop_se is the paired standard error recomputed here from both
    models' outputs on every validation sample; a custom metric (one number per set) has none."""
    monkeypatch.chdir(tmp_path)  # the custom metric writes calls.jsonl to the working directory
    uri = detector["uri"]
    code, s = _run(detector, "steps.validate.metric=cosine", "steps.validate.output=feat")
    assert code == 0 and s is not None
    client = MlflowClient(uri)
    metrics = client.get_run(s["steps"]["validate"]).data.metrics
    fp32 = runtime.session(str(detector["folder"] / "model.onnx"))
    int8_path = mlflow.artifacts.download_artifacts(
        run_id=s["steps"]["quantize"], artifact_path="model/model_int8.onnx", tracking_uri=uri
    )
    int8 = runtime.session(int8_path, optimize=False)  # target tensorrt: validate computes Q/DQ exactly
    x = np.load(detector["folder"] / "val.npz")["x"]
    ref, out = fp32.run(["feat"], {"x": x})[0], int8.run(["feat"], {"x": x})[0]
    a, b = ref.astype(np.float64), out.astype(np.float64)
    lost = 1.0 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # FP32 scores 1 per sample
    assert lost.std() > 0  # a spread to measure
    assert metrics["accuracy_drop"] == pytest.approx(lost.mean(), rel=1e-6)
    assert metrics["accuracy_drop_se"] == pytest.approx(lost.std(ddof=1) / np.sqrt(len(x)), rel=1e-6)
    art = Path(mlflow.artifacts.download_artifacts(run_id=s["steps"]["validate"], tracking_uri=uri))
    assert json.loads((art / "validation/report.json").read_text())["accuracy_drop_se"] == metrics["accuracy_drop_se"]
    code, s = _run(detector)  # taskmetric:received
    assert code == 0 and s is not None
    assert "accuracy_drop_se" not in client.get_run(s["steps"]["validate"]).data.metrics


@pytest.mark.slow
@pytest.mark.parametrize(("margin", "warned"), [(1.0, True), (3.0, False)])
def test_a_gate_passed_within_two_standard_errors_warns(
    detector: dict[str, Any], capsys: pytest.CaptureFixture[str], margin: float, warned: bool
) -> None:
    """max_drop set to the measured drop plus ``margin`` standard errors: the gate passes either way,
    and only the narrow pass says that another draw of samples could fail it."""
    code, s = _run(detector, "steps.validate.metric=cosine", "steps.validate.output=feat")
    assert code == 0 and s is not None
    m = MlflowClient(detector["uri"]).get_run(s["steps"]["validate"]).data.metrics
    max_drop = m["accuracy_drop"] + margin * m["accuracy_drop_se"]
    capsys.readouterr()
    code, _ = _run(detector, "steps.validate.metric=cosine", "steps.validate.output=feat",
                   f"steps.validate.max_drop={max_drop!r}")  # fmt: skip
    assert code == 0
    assert ("the gate passed narrowly. The drop is within two standard errors" in capsys.readouterr().err) is warned


@pytest.mark.slow
def test_failed_gate_names_quantized_nodes_not_the_sigmoid(
    detector: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The message names nodes_table's int8 nodes, worst first, never a float node (the Sigmoid or
    Reshape downstream carry the head's error but cannot be excluded)."""
    code, _ = _run(detector, "steps.validate.metric=cosine", "steps.validate.max_drop=0.0")
    assert code == 3
    err = capsys.readouterr().err
    assert "accuracy gate failed" in err
    pasted = yaml.safe_load(err.split("steps.quantize.exclude.nodes: ")[1].split("]")[0] + "]")
    assert pasted == ["head", "conv1", "gap"]  # nodes_table's int8 nodes, worst first


# --- FP32's own indecision under an agreement gate -------------------------------------------------


def test_unsure_share_reads_probabilities_and_logits() -> None:
    probs = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05]])  # margins 0.05 (unsure) and 0.85
    assert evaluation.unsure_share(probs) == 0.5
    logits = np.array([[2.0, 0.0], [0.1, 0.0], [0.0, 0.3], [5.0, -5.0]])  # softmax margins .76, .05, .15, 1.0
    assert evaluation.unsure_share(logits) == 0.25
    assert evaluation.unsure_share(np.zeros((3, 6, 64))) is None  # a detector's output: no classes


@pytest.mark.slow
@pytest.mark.parametrize(("scale", "warned"), [(0.01, True), (5.0, False)])
def test_agreement_gate_warns_when_fp32_itself_is_unsure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scale: float, warned: bool
) -> None:
    """A linear classifier on inputs near zero (every class about equally likely: FP32 is unsure on
    all of them) against the same inputs scaled up (one class clearly first)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.eye(4, dtype=np.float32) + np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(4)
    x = (np.eye(4, dtype=np.float32)[rng.integers(4, size=32)] + rng.normal(size=(32, 4)) * 0.1) * scale
    np.savez(tmp_path / "cal.npz", x=x.astype(np.float32))
    np.savez(tmp_path / "val.npz", x=x.astype(np.float32))
    config = {
        "name": "unsure",
        "model": {"onnx": "m.onnx"},
        "data": {"calibration": {"npz": "cal.npz"}, "validation": {"npz": "val.npz"}},
        "steps": {"export": {}, "calibrate": {}, "quantize": {}, "validate": {"metric": "agreement", "max_drop": 1.0}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    uri, summary = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "s.json"
    assert main(["run", str(tmp_path / "p.yaml"), "--tracking-uri", uri, "--summary-json", str(summary)]) == 0
    err = capsys.readouterr().err
    assert ("FP32 itself is unsure on 100% of the validation samples" in err) is warned
    run_id = json.loads(summary.read_text())["steps"]["validate"]
    art = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=uri))
    share = json.loads((art / "validation/report.json").read_text())["fp32_unsure_share"]
    assert share == (1.0 if warned else 0.0)


@pytest.mark.slow
def test_layer_table_only_where_it_is_read_by_default(
    detector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """layer_report: auto skips the per-layer comparison on a passed gate and computes it on a failed one."""
    folder, uri = detector["folder"], detector["uri"]
    monkeypatch.chdir(folder)

    def validate_run(*overrides: str) -> tuple[int, dict[str, Any], Path, dict[str, float]]:
        code, s = _run(detector, "steps.validate.layer_report=auto", *overrides)
        assert s is not None
        run_id = s["steps"]["validate"]
        art = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=uri))
        metrics = mlflow.MlflowClient(uri).get_run(run_id).data.metrics
        return code, json.loads((art / "validation/report.json").read_text()), art, metrics

    code, report, art, metrics = validate_run()
    assert code == 0 and report["layer_report"] == "skipped" and report["layers"] == []
    assert not (art / "validation/layer_errors_table.json").exists() and "sqnr_db_min" not in metrics
    code, report, art, metrics = validate_run("steps.validate.max_drop=0.001")  # its drop is 0.05
    assert code == 3 and report["layer_report"] == "computed" and report["quantized_nodes"]
    assert (art / "validation/layer_errors_table.json").exists() and "sqnr_db_min" in metrics
    shares = [a["share"] for a in report["suggestions"]]  # the failed gate's advice, largest share first
    assert shares and shares == sorted(shares, reverse=True) and 0 < shares[0] <= 1


@pytest.mark.slow
def test_a_gate_on_one_validation_sample_warns_and_records_the_count(
    digits_copy: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a gate passed on a single sample went on silently to registration."""
    val = np.load(digits_copy / "data" / "validation.npz")
    np.savez(digits_copy / "data" / "validation.npz", input=val["input"][:1], labels=val["labels"][:1])
    path = digits_copy / "pipeline.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["steps"] = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {}, "validate": {"metric": "top1"},
                    "promote": {"registered_model": "one-sample"}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    summary = digits_copy / "s.json"
    assert main(["run", str(path), "--tracking-uri", tracking_uri, "--summary-json", str(summary)]) == 0
    assert "the gate passed on 1 validation sample(s), fewer than 30" in capsys.readouterr().err
    s = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri)
    assert client.get_run(s["steps"]["validate"]).data.metrics["validation_samples"] == 1
    assert client.get_run(s["run_id"]).data.metrics["validation_samples"] == 1  # the runs table shows it
    version = client.get_model_version("one-sample", s["registered_model"]["version"])  # and the version says it
    assert "on 1 validation samples" in version.description


def test_error_accumulator_in_blocks_measures_what_whole_tensors_do() -> None:
    """Blocks of float64 (the layer comparison's cost went into whole-tensor float64 copies): the same
    sums as float64 over the whole tensor, across several blocks and a partial one, fed in two updates."""
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(2, 3 * evaluation.ACCUMULATE_BLOCK + 5)).astype(np.float32)
    test = (ref + rng.normal(scale=1e-3, size=ref.shape)).astype(np.float32)
    acc = evaluation.ErrorAccumulator()
    for i in range(2):
        acc.update(ref[i], test[i])
    r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    assert acc.sqnr_db == pytest.approx(10 * np.log10((r @ r) / ((r - t) @ (r - t))), rel=1e-12)
    assert acc.cosine == pytest.approx((r @ t) / np.sqrt((r @ r) * (t @ t)), rel=1e-12)
    assert acc.max_abs_err == float(np.abs(r - t).max())
    exact = evaluation.ErrorAccumulator()
    exact.update(ref, ref.copy())
    assert (exact.sqnr_db, exact.cosine, exact.max_abs_err) == (float("inf"), pytest.approx(1.0), 0.0)
