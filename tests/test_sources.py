"""Model and data sources, and calibration from a legacy TensorRT cache."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.errors import ConfigError
from pipeline.orchestration.cli import main
from pipeline.orchestration.runner import load_config as load
from tests.models import build

CALIBRATE_ONLY = {"export": {}, "calibrate": {"method": "entropy", "batch_size": 16}}


def tiny_pipeline(folder: Path, model: dict, calibration: dict, steps: dict | None = None) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "tiny", "model": model, "data": {"calibration": calibration}, "steps": steps or CALIBRATE_ONLY}
        )
    )
    return path


def run(path: Path, uri: str, *extra: str) -> dict:
    summary = path.parent / "s.json"
    assert main(["run", str(path), "--tracking-uri", uri, "--summary-json", str(summary), *extra]) == 0
    return json.loads(summary.read_text())


def ranges_of(uri: str, run_id: str, dst: Path) -> dict:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="calibration/ranges.json", dst_path=str(dst), tracking_uri=uri
    )
    return json.loads(Path(local).read_text())


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    onnx.save(build("matmul_two_inputs"), str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "cal.npz",
        a=rng.normal(size=(64, 3)).astype(np.float32),
        b=rng.normal(size=(64, 3)).astype(np.float32),
    )
    return tmp_path


@pytest.mark.slow
def test_python_source_with_args_matches_npz(tiny: Path, tracking_uri: str) -> None:
    (tiny / "gen.py").write_text(
        "import numpy as np\n"
        "def batches(path, size):\n"
        "    z = np.load(path)\n"
        "    for i in range(0, len(z['a']), size):\n"
        "        yield {'a': z['a'][i:i+size], 'b': z['b'][i:i+size]}\n"
    )
    npz = run(tiny_pipeline(tiny, {"onnx": "model.onnx"}, {"npz": "cal.npz"}), tracking_uri)
    py = run(
        tiny_pipeline(
            tiny, {"onnx": "model.onnx"}, {"python": "gen:batches", "args": {"path": str(tiny / "cal.npz"), "size": 7}}
        ),
        tracking_uri,
    )
    a = ranges_of(tracking_uri, npz["steps"]["calibrate"], tiny / "r1")
    b = ranges_of(tracking_uri, py["steps"]["calibrate"], tiny / "r2")
    assert a["num_samples"] == b["num_samples"] == 64
    assert a["data_digest"] != "" and a["tensors"].keys() == b["tensors"].keys()
    for name in a["tensors"]:  # two-pass histograms do not depend on batch size
        assert a["tensors"][name]["amax"] == pytest.approx(b["tensors"][name]["amax"], rel=1e-6)


@pytest.mark.slow
def test_npy_memory_mapped_source_and_limit(tiny: Path, tracking_uri: str) -> None:
    z = np.load(tiny / "cal.npz")
    np.save(tiny / "a.npy", z["a"])
    np.save(tiny / "b.npy", z["b"])
    s = run(
        tiny_pipeline(tiny, {"onnx": "model.onnx"}, {"npy": {"a": "a.npy", "b": "b.npy"}, "limit": 40}), tracking_uri
    )
    r = ranges_of(tracking_uri, s["steps"]["calibrate"], tiny / "r")
    assert r["num_samples"] == 40
    assert r["tensors"]["a"]["max"] == pytest.approx(float(z["a"][:40].max()))


@pytest.mark.slow
def test_image_folder_source(tmp_path: Path, tracking_uri: str) -> None:
    from PIL import Image

    onnx.save(build("conv_relu_gemm"), str(tmp_path / "model.onnx"))
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    images = {"dir": "imgs", "size": [4, 4], "mean": [0.5, 0.5], "std": [0.25, 0.25], "channels": "RGB"}
    path = tiny_pipeline(tmp_path, {"onnx": "model.onnx"}, {"images": images})
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2  # two means for three channels
    images["mean"], images["std"] = [0.5] * 3, [0.25] * 3
    path = tiny_pipeline(tmp_path, {"onnx": "model.onnx"}, {"images": images})
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2  # the model takes 2 channels, not 3
    onnx_model = build("conv_relu_gemm")
    onnx_model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx_model.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(rng.normal(size=(3, 3, 3, 3)).astype(np.float32), "w")
    )
    onnx.save(onnx_model, str(tmp_path / "model.onnx"))
    s = run(tiny_pipeline(tmp_path, {"onnx": "model.onnx"}, {"images": images}), tracking_uri)
    r = ranges_of(tracking_uri, s["steps"]["calibrate"], tmp_path / "r")
    assert r["num_samples"] == 5
    assert r["tensors"]["x"]["min"] >= -2.0 and r["tensors"]["x"]["max"] <= 2.0  # (v/255 - 0.5) / 0.25


@pytest.mark.slow
def test_from_cache_reproduces_ranges_and_refuses_other_models(
    tiny: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run(tiny_pipeline(tiny, {"onnx": "model.onnx"}, {"npz": "cal.npz"}), tracking_uri)
    cal_dir = Path(
        mlflow.artifacts.download_artifacts(
            run_id=first["steps"]["calibrate"],
            artifact_path="calibration",
            dst_path=str(tiny / "first"),
            tracking_uri=tracking_uri,
        )
    )
    original = json.loads((cal_dir / "ranges.json").read_text())
    legacy = tiny / "legacy"
    legacy.mkdir()
    text = (cal_dir / "calibration.cache").read_text().replace("TRT-101401", "TRT-8601")
    (legacy / "model.cache").write_text(text)
    steps = {"export": {}, "calibrate": {"from_cache": "legacy/model.cache"}}
    capsys.readouterr()
    second = run(tiny_pipeline(tiny, {"onnx": "model.onnx"}, {"npz": "cal.npz"}, steps), tracking_uri)
    assert "not portable across TensorRT releases" in capsys.readouterr().err  # 8.6.1 cache, 10.14.1 target
    got = ranges_of(tracking_uri, second["steps"]["calibrate"], tiny / "second")
    assert got["method"] == "from_cache" and got["params"]["cache_version"] == "8.6.1"
    for name, t in original["tensors"].items():
        assert got["tensors"][name]["amax"] == pytest.approx(t["amax"], rel=1e-6)
    # int8pipe's own cache folder carries ranges.json: a changed model is refused
    other = build("matmul_two_inputs")
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "w"))
    onnx.save(other, str(tiny / "model.onnx"))
    steps = {"export": {}, "calibrate": {"from_cache": str(cal_dir / "calibration.cache")}}
    path = tiny_pipeline(tiny, {"onnx": "model.onnx"}, {"npz": "cal.npz"}, steps)
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2
    assert "calibrate again on this model" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_missing_a_tensor_keeps_its_node_fp32(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A legacy cache without a tensor's line: calibrate reports it, quantize keeps its consumer in FP32
    instead of failing inside ORT's quantizer, and the other nodes still run in INT8."""
    onnx.save(build("conv_relu_gemm"), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).normal(size=(16, 2, 4, 4)).astype(np.float32))
    lines = ["TRT-8601-EntropyCalibration2", "x: 3c010a14", "conv: 3c010a14", "relu: 3c010a14", "gap: 3c810a14"]
    (tmp_path / "legacy.cache").write_text("\n".join(lines) + "\n")  # no "flat" (the Gemm's input), no "y"
    steps = {"export": {}, "calibrate": {"from_cache": "legacy.cache"}, "quantize": {}}
    capsys.readouterr()
    s = run(tiny_pipeline(tmp_path, {"onnx": "model.onnx"}, {"npz": "cal.npz"}, steps), tracking_uri)
    err = capsys.readouterr().err
    assert "2 tensors have no range in the cache" in err and "['flat', 'y']" in err
    assert "1 node(s) stay FP32" in err and "): fc" in err  # the Gemm whose input is flat
    table = mlflow.artifacts.download_artifacts(
        run_id=s["steps"]["quantize"], artifact_path="quantize/nodes_table.json", tracking_uri=tracking_uri
    )
    data = json.loads(Path(table).read_text())
    precision = {r[data["columns"].index("node")]: r[data["columns"].index("precision")] for r in data["data"]}
    # float: FP16, the float regions target tensorrt writes by default
    assert precision["fc"] == "fp16" and precision["conv"] == "int8"


@pytest.mark.slow
def test_unnamed_nodes_are_named_at_export(tmp_path: Path, tracking_uri: str) -> None:
    model = build("conv_relu_gemm")
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).normal(size=(16, 2, 4, 4)).astype(np.float32))
    steps = {"export": {}, "calibrate": {}, "quantize": {"exclude": {"nodes": ["Gemm_4"]}}}
    s = run(tiny_pipeline(tmp_path, {"onnx": "model.onnx"}, {"npz": "cal.npz"}, steps), tracking_uri)
    table = mlflow.artifacts.download_artifacts(
        run_id=s["steps"]["quantize"], artifact_path="quantize/nodes_table.json", tracking_uri=tracking_uri
    )
    data = json.loads(Path(table).read_text())
    rows = {r[data["columns"].index("node")]: r[data["columns"].index("precision")] for r in data["data"]}
    assert rows == {
        "Conv_0": "int8",
        "Relu_1": "fp16",  # float layers: FP16, target tensorrt's default float regions
        "GlobalAveragePool_2": "fp16",
        "Flatten_3": "fp16",
        "Gemm_4": "fp16",
    }


@pytest.mark.slow
def test_mlflow_registry_model_source(tiny: Path, tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fp32-models")
    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(tiny / "model.onnx")), name="fp32", registered_model_name="tiny-fp32")
    MlflowClient(tracking_uri).set_registered_model_alias("tiny-fp32", "champion", "1")
    s = run(tiny_pipeline(tiny, {"mlflow": "models:/tiny-fp32@champion"}, {"npz": "cal.npz"}), tracking_uri)
    assert set(s["steps"]) == {"export", "calibrate"}
    path = tiny_pipeline(tiny, {"mlflow": "models:/no-such-model/1"}, {"npz": "cal.npz"})
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2


@pytest.mark.slow
def test_pytorch_source(tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="the [torch] extra is not installed")
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build(width=4):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(width * 4, 2))\n"
    )
    np.savez(tmp_path / "cal.npz", input=np.random.default_rng(0).normal(size=(8, 1, 4, 4)).astype(np.float32))
    model = {"pytorch": {"factory": "net:build", "inputs": {"input": [1, 1, 4, 4]}, "args": {"width": 4}}}
    s = run(tiny_pipeline(tmp_path, model, {"npz": "cal.npz"}), tracking_uri)
    export = MlflowClient(tracking_uri).get_run(s["steps"]["export"]).data.metrics
    assert export["batchnorm_folded"] == 1 and export["num_nodes"] >= 4
    # an export from PyTorch is never reused: --only runs it again in the same call
    only = run(tiny_pipeline(tmp_path, model, {"npz": "cal.npz"}), tracking_uri, "--only", "calibrate")
    assert list(only["steps"]) == ["export", "calibrate"] and only["steps"]["export"] != s["steps"]["export"]
    (tmp_path / "broken.py").write_text("def build():\n    raise RuntimeError('weights missing')\n")
    path = tiny_pipeline(
        tmp_path, {"pytorch": {"factory": "broken:build", "inputs": {"input": [1, 1, 4, 4]}}}, {"npz": "cal.npz"}
    )
    assert main(["run", str(path), "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err  # the user's own traceback, then one paragraph naming their code
    assert "broken:build" in err and "RuntimeError: weights missing" in err and "fix it and run again" in err


@pytest.mark.slow
def test_pytorch_source_with_integer_inputs(tmp_path: Path, tracking_uri: str) -> None:
    """A text encoder (token ids and an attention mask, int64) exports, calibrates and quantizes."""
    pytest.importorskip("torch", reason="the [torch] extra is not installed")
    (tmp_path / "enc.py").write_text(
        "import torch\n"
        "class Encoder(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.embed, self.proj = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)\n"
        "    def forward(self, input_ids, attention_mask):\n"
        "        h = self.proj(self.embed(input_ids))\n"
        "        m = attention_mask.unsqueeze(-1).to(h.dtype)\n"
        "        return (h * m).sum(1) / m.sum(1)\n"
        "def build():\n"
        "    return Encoder()\n"
    )
    rng = np.random.default_rng(0)
    mask = (np.arange(6)[None, :] < rng.integers(2, 7, size=(8, 1))).astype(np.int64)
    np.savez(tmp_path / "cal.npz", input_ids=rng.integers(0, 50, size=(8, 6)).astype(np.int64), attention_mask=mask)
    model = {
        "pytorch": {
            "factory": "enc:build",
            "inputs": {"input_ids": [1, 6], "attention_mask": [1, 6]},
            "dtypes": {"input_ids": "int64", "attention_mask": "int64"},
        }
    }
    steps = {"export": {}, "calibrate": {}, "quantize": {}}
    s = run(tiny_pipeline(tmp_path, model, {"npz": "cal.npz"}, steps), tracking_uri)
    exported = mlflow.artifacts.download_artifacts(
        run_id=s["steps"]["export"], artifact_path="model/model.onnx", tracking_uri=tracking_uri
    )
    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(exported).graph.input}
    assert inputs == {"input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64}
    assert MlflowClient(tracking_uri).get_run(s["steps"]["quantize"]).data.metrics["int8_nodes"] >= 1


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ({"ids": "int64"}, "model.pytorch.dtypes.ids: no such input"),
        ({"input": "long"}, "model.pytorch.dtypes.input: expected one of float32"),
    ],
)
def test_pytorch_dtypes_errors(tmp_path: Path, dtypes: dict[str, str], expected: str) -> None:
    np.savez(tmp_path / "cal.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    model = {"pytorch": {"factory": "net:build", "inputs": {"input": [1, 1, 4, 4]}, "dtypes": dtypes}}
    with pytest.raises(ConfigError, match=expected):
        load(tiny_pipeline(tmp_path, model, {"npz": "cal.npz"}))
