"""The text-detection metric example (examples/metrics/text_detection.py): components and DB boxes
against hand-made maps and an independent labelling (scipy), exact counts, and the metric in a
pipeline whose INT8 score is recomputed from the logged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from examples.metrics.text_detection import boxes_f1, boxes_kept, components, counts, text_boxes
from pipeline.execution import runtime
from pipeline.orchestration.cli import main
from tests.conftest import npz_pipeline
from tests.models import build

ROOT = Path(__file__).resolve().parent.parent


def _map(*rects: tuple[int, int, int, int, float], shape: tuple[int, int] = (40, 60)) -> np.ndarray:
    """A probability map: 0 background, each (y0, x0, y1, x1, p) rectangle filled with p."""
    prob = np.zeros(shape, np.float32)
    for y0, x0, y1, x1, p in rects:
        prob[y0:y1, x0:x1] = p
    return prob


def test_components_are_four_connected_and_join_through_later_rows() -> None:
    mask = np.zeros((6, 8), bool)
    mask[0:4, 0] = mask[0:4, 3] = True  # a U: two bars that meet only in row 3
    mask[3, 0:4] = True
    mask[5, 5] = mask[4, 6] = True  # diagonal neighbours: two components under 4-connectivity
    found = sorted(sorted(runs) for runs in components(mask))
    assert [sum(b - a for _, a, b in runs) for runs in found] == [10, 1, 1]
    assert found[1] == [(4, 6, 7)] and found[2] == [(5, 5, 6)]
    assert components(np.zeros((3, 3), bool)) == []


def test_text_boxes_keep_what_db_keeps() -> None:
    prob = _map(
        (5, 5, 10, 30, 0.9),  # a text line: kept, its box one pixel larger down and right (2x2 dilation)
        (20, 5, 26, 20, 0.4),  # above THRESH 0.3, mean under BOX_THRESH 0.5: dropped
        (30, 40, 31, 59, 0.95),  # one row high: 2 rows after dilation, under MIN_SIDE 3: dropped
        (30, 5, 32, 20, 0.95),  # two rows: 3 after dilation: kept
    )
    assert sorted(map(tuple, text_boxes(prob).tolist())) == [(5, 5, 11, 31), (30, 5, 33, 21)]


def test_text_boxes_agree_with_an_independent_labelling() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(5)
    for _ in range(5):
        prob = ndimage.gaussian_filter(rng.random((64, 96)), 2.0)  # blobs of every size and score
        prob = (prob - prob.min()) / (prob.max() - prob.min())
        mask = np.zeros_like(prob, bool)  # OpenCV's 2x2 dilation: a pixel or its upper/left neighbours
        base = prob > 0.3
        for dy in (0, 1):
            for dx in (0, 1):
                mask[dy:, dx:] |= base[: base.shape[0] - dy, : base.shape[1] - dx]
        labels, count = ndimage.label(mask)
        want = []
        for k, sl in enumerate(ndimage.find_objects(labels)):
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            if min(y1 - y0, x1 - x0) >= 3 and prob[labels == k + 1].mean() >= 0.5:
                want.append((y0, x0, y1, x1))
        assert count > 0
        assert sorted(map(tuple, text_boxes(prob).tolist())) == sorted(want)


def test_counts_kept_and_f1_are_exact() -> None:
    ref = np.stack([_map((5, 5, 10, 30, 0.9), (20, 5, 25, 30, 0.9)), _map((5, 5, 10, 30, 0.9))])
    out = np.stack(
        [
            _map((5, 6, 10, 30, 0.8), (30, 30, 36, 50, 0.9)),  # first kept (IoU 0.96), second lost, one extra
            _map((5, 20, 10, 45, 0.9)),  # shifted: IoU 0.25, lost; and counted as an extra box
        ]
    )
    assert counts(out, ref) == (1, 3, 3)
    assert boxes_kept(out, None, ref) == pytest.approx(1 / 3)
    assert boxes_f1(out, None, ref) == pytest.approx(2 * 1 / (3 + 3))
    assert boxes_f1(ref[:, None], None, {"map": ref[:, None]}) == 1.0  # [N, 1, H, W], one output as a dict
    empty = np.zeros((2, 8, 8), np.float32)
    assert boxes_kept(empty, None, empty) == 1.0 and boxes_f1(empty, None, empty) == 1.0
    with pytest.raises(ValueError, match="probability maps"):
        boxes_f1(np.zeros((2, 3, 8, 8)), None, np.zeros((2, 3, 8, 8)))


def _frames(n: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """``n`` [1, 32, 48] images: 1-3 bright text-like bars on a dark, noisy background, and the bars."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, 32, 48)) * 0.1).astype(np.float32)
    bars = []
    for k in range(n):
        drawn = []
        for row in rng.choice(4, size=rng.integers(1, 4), replace=False):
            y0, x0 = 2 + 8 * int(row), int(rng.integers(1, 10))
            x1 = x0 + int(rng.integers(12, 36))
            x[k, 0, y0 : y0 + 5, x0:x1] = 1.0
            drawn.append((y0, x0, y0 + 5, x1))
        bars.append(drawn)
    return x, bars


@pytest.mark.slow
def test_the_metric_gates_a_pipeline_and_scores_what_the_logged_model_computes(tmp_path: Path) -> None:
    model = build("text_map")
    onnx.checker.check_model(model, full_check=True)
    x_cal, _ = _frames(16, 0)
    x_val, bars = _frames(12, 1)
    shutil.copy(ROOT / "examples" / "metrics" / "text_detection.py", tmp_path)  # as the docs say: beside the YAML
    steps = {
        "export": {},
        "calibrate": {"method": "minmax"},
        "quantize": {},
        "validate": {"metric": "text_detection:boxes_f1", "max_drop": 0.05},
    }
    npz_pipeline(tmp_path, model, {"x": x_cal}, {"x": x_val}, steps, name="text-map")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = tmp_path / "s.json"
    code = main(["run", str(tmp_path / "pipeline.yaml"), "--tracking-uri", uri, "--summary-json", str(summary)])
    assert code == 0
    s = json.loads(summary.read_text())
    metrics = MlflowClient(uri).get_run(s["steps"]["validate"]).data.metrics
    assert metrics["fp32_boxes_f1"] == 1.0

    # the FP32 model finds exactly the drawn bars (each box one pixel larger down and right: the dilation)
    fp32 = runtime.session(tmp_path / "model.onnx").run(None, {"x": x_val})[0]
    for prob, drawn in zip(fp32[:, 0], bars):
        assert sorted(map(tuple, text_boxes(prob).tolist())) == sorted((a, b, c + 1, d + 1) for a, b, c, d in drawn)
    art = Path(mlflow.artifacts.download_artifacts(run_id=s["steps"]["quantize"], tracking_uri=uri))
    int8 = runtime.session(art / "model/model_int8.onnx", optimize=False).run(None, {"x": x_val})[0]
    assert not np.array_equal(int8, fp32)
    assert metrics["int8_boxes_f1"] == pytest.approx(boxes_f1(int8, None, fp32))
    assert metrics["accuracy_drop"] == pytest.approx(1.0 - metrics["int8_boxes_f1"])


def test_several_outputs_need_one_named() -> None:
    maps = {"map": np.zeros((1, 1, 8, 8)), "aux": np.zeros((1, 1, 8, 8))}
    with pytest.raises(ValueError, match=r"reads one output, got \['aux', 'map'\]: set steps.validate.output"):
        boxes_f1(maps, None, maps)


def test_fetch_script_says_what_to_do_when_pip_cannot_download(tmp_path: Path) -> None:
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("rapidocr_onnxruntime") is not None:
        pytest.skip("rapidocr-onnxruntime is installed: the script copies the model from it instead")
    script = tmp_path / "fetch_model.py"
    shutil.copy(ROOT / "examples" / "ppocr_det" / "fetch_model.py", script)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "pip could not download rapidocr-onnxruntime==1.4.4; install it" in out.stderr
    assert not (tmp_path / "ch_PP-OCRv4_det_infer.onnx").exists()


def test_text_frames_refuse_a_pillow_without_freetype(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("skimage")
    from PIL import ImageFont

    from examples.ppocr_det.data import text_frames

    monkeypatch.setattr(ImageFont, "load_default", lambda size=None: ImageFont.ImageFont())  # the bitmap font
    with pytest.raises(RuntimeError, match="Pillow >= 10.1 built with FreeType"):
        text_frames(1, 64, 0)
