"""Is an INT8 model for ONNX Runtime's CPU kernels portable across CPUs? Each weight scheme of
``steps.quantize.cpu_fleet`` (pipeline/execution/cpu_kernels.py) computed exactly and through this machine's
fused int8 kernels, with its batch-1 latency, beside ORT's quantize_static in the same run.

    python benchmarks/cpu_portability.py [--networks digits,efficientnet,ocr_rec] [--validation 256]

- digits: the bundled example (labels: top-1 accuracy).
- efficientnet: EfficientNet-Lite0 (the [efficientnet] extra), scored as top-1 agreement with FP32 on
  held-out crops (seed 1; calibration seed 0), as benchmarks/accuracy_vs_peers.py does.
- ocr_rec: the PP-OCRv4 recogniser that ``pip install rapidocr-onnxruntime`` ships, scored as exact
  string agreement with FP32 (benchmarks/ocr_rec_vs_peers.py's text lines), static and dynamic mode.
- minilm: all-MiniLM-L6-v2 exported as benchmarks/encoder_vs_peers.py does (its docstring says where
  the weights come from), dynamic mode only, scored as the mean cosine of the pooled embeddings.

Every int8pipe model is built as steps/quantize.py builds it for ``target: onnxruntime`` (mse ranges
over every tensor, asymmetric uint8 activations, bias correction). "exact": ORT's graph optimisations
off (the Q/DQ arithmetic in float; a dynamic model through its float64 twin); "kernels": on, this
machine's fused int8 kernels, whose ISA is printed first: they saturate on AVX2/AVX-512BW without VNNI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "examples" / "efficientnet_lite0")]

Batches = Callable[[], Iterator[dict[str, np.ndarray]]]
Samples = dict[str, np.ndarray]  # one array per model input, samples on the first axis


def take(x: Samples, start: int, stop: int) -> Samples:
    return {k: v[start:stop] for k, v in x.items()}


def count(x: Samples) -> int:
    return len(next(iter(x.values())))


def outputs(model: onnx.ModelProto, x: Samples, optimize: bool) -> np.ndarray:
    from pipeline.execution import runtime

    sess = runtime.session(model.SerializeToString(), optimize=optimize)
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else 16  # an export with a fixed batch takes only it
    return np.concatenate([sess.run(None, take(x, i, i + step))[0] for i in range(0, count(x), step)])


def latency_ms(model: onnx.ModelProto, x: Samples, iterations: int) -> float:
    from pipeline.execution import runtime

    sess = runtime.session(model.SerializeToString(), optimize=True, threads=1)
    return float(np.median(runtime.time_session(sess, take(x, 0, 1), iterations, 5)))


def static_model(fp32: onnx.ModelProto, batches: Batches, cal: Any, weights: str) -> onnx.ModelProto:
    """What steps/quantize.py builds for ``target: onnxruntime`` with these weights (its own recipe)."""
    from pipeline.transforms import recipe
    from pipeline.transforms.quantization import QuantizeOptions

    opts = QuantizeOptions(target="onnxruntime", activations="asymmetric", weights=weights)
    return recipe.quantize_static(fp32, cal.ranges, recipe.Recipe(quantize=opts), recipe.Samples(batches)).model


def ort_model(path: Path, folder: Path, batches: Batches, reduce_range: bool) -> onnx.ModelProto:
    from peers import ort_quantize_static

    return ort_quantize_static(path, folder / f"ort_rr{int(reduce_range)}.onnx", batches, reduce_range=reduce_range)


def report(name: str, build: Callable[[], onnx.ModelProto], score: Callable[[np.ndarray], float], x: Samples,
           iterations: int) -> None:  # fmt: skip
    from pipeline.analysis import kernel_fidelity

    start = time.perf_counter()
    try:
        model = build()
    except Exception as exc:  # a failure is a table row, not a hidden skip
        print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | |", flush=True)
        return
    seconds = time.perf_counter() - start
    exact_model = kernel_fidelity.exact_twin(model) if kernel_fidelity.is_dynamic(model) else model
    exact, kernels = score(outputs(exact_model, x, False)), score(outputs(model, x, True))
    feeds = [take(x, i, i + 1) for i in range(8)]
    rows = kernel_fidelity.compare(model, exact_model if exact_model is not model else None, feeds)
    departing = kernel_fidelity.first_departures(rows, 1)
    print(
        f"| {name} | {exact:.4f} | {kernels:.4f} | {sum(r['departs'] for r in rows)}/{len(rows)}"
        f"{' from ' + departing[0] if departing else ''} | {latency_ms(model, x, iterations):.3f} | {seconds:.0f} |",
        flush=True,
    )


def network(kind: str, folder: Path, n_val: int) -> tuple[Path, Batches, Samples, Callable[[np.ndarray], float]]:
    """(FP32 path, calibration batches, held-out inputs, score of outputs on them)."""
    if kind == "digits":
        cal = np.load(ROOT / "examples/digits/data/calibration.npz")["input"][:512]
        val = np.load(ROOT / "examples/digits/data/validation.npz")
        labels = val["labels"]
        from steps.export import ExportConfig, prepare

        path = folder / "digits.onnx"  # as the export step writes it: BatchNorm folded into the Convs
        prepare(onnx.load(str(ROOT / "examples/digits/model.onnx")), ExportConfig(), None, path, "model")
        return (path, lambda: ({"input": cal[i : i + 32]} for i in range(0, 512, 32)),
                {"input": val["input"]}, lambda out: float((out.argmax(1) == labels).mean()))  # fmt: skip
    if kind == "efficientnet":
        from accuracy_vs_ort import crop_array, fp32_model
        from data import crops

        path = fp32_model(folder, 256)
        x = {"input": crop_array(n_val, 1)}
        ref = outputs(onnx.load(str(path)), x, True).argmax(1)
        return path, lambda: crops(256, 32), x, lambda out: float((out.argmax(1) == ref).mean())
    if kind == "ocr_rec":
        from detector_vs_peers import find_model
        from ocr_rec_vs_peers import MODEL_FILE, batches, decode, fixed_width, samples, text_lines

        path = fixed_width(find_model(None, MODEL_FILE, "recogniser"), 320, folder)
        cal_lines, held_lines = text_lines()
        x_cal, x = samples(cal_lines, 64, 320, seed=0), {"x": samples(held_lines, min(n_val, 96), 320, seed=1)}
        ref = [decode(r) for r in outputs(onnx.load(str(path)), x, True)]
        return path, lambda: batches(x_cal), x, lambda out: float(np.mean([decode(o) == r for o, r in zip(out, ref)]))
    if kind == "minilm":
        import random

        from encoder_vs_peers import find_model_dir, prepared, sentences, tokenize, torch_export

        model_dir = find_model_dir(None)
        torch_export(model_dir, False, folder / "raw.onnx")
        path = folder / "fp32.onnx"
        prepared(onnx.load(str(folder / "raw.onnx")), False, path)
        texts = sentences()
        random.Random(0).shuffle(texts)
        x_cal, x = tokenize(model_dir / "tokenizer.json", texts[:128]), tokenize(model_dir / "tokenizer.json",
                                                                              texts[128 : 128 + n_val])  # fmt: skip
        ref = outputs(onnx.load(str(path)), x, True)

        def cosine(out: np.ndarray) -> float:  # mean cosine of the pooled embeddings with FP32's
            return float(((out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)).mean())

        return path, lambda: (take(x_cal, i, i + 1) for i in range(128)), x, cosine
    raise SystemExit(f"unknown network {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--networks", default="digits,efficientnet,ocr_rec")
    ap.add_argument("--validation", type=int, default=256, help="held-out samples (digits: all 360)")
    ap.add_argument("--iterations", type=int, default=50, help="timed batch-1 runs per model (p50 printed)")
    args = ap.parse_args()

    from pipeline.execution import cpu_kernels

    cap = cpu_kernels.this_machine()
    print(f"# CPU: {cpu_kernels.describe(cap)}; int8 flags: {', '.join(cap['int8_flags']) or 'none'}")
    print("# exact: ORT graph optimisations off; kernels: on (this CPU's fused int8 kernels); latency: batch 1, "
          "1 thread, p50, kernels\n")  # fmt: skip
    for kind in args.networks.split(","):
        one_network(kind, args)


def one_network(kind: str, args: argparse.Namespace) -> None:
    from pipeline.calibration.calibrator import calibrate
    from pipeline.execution import cpu_kernels
    from pipeline.transforms import dynamic

    folder = Path(tempfile.mkdtemp(prefix=f"int8pipe-portability-{kind}-"))
    path, batches, x, score = network(kind, folder, args.validation)
    fp32 = onnx.load(str(path))
    print(f"## {kind}: FP32 scores {score(outputs(fp32, x, True)):.4f} on {count(x)} held-out samples")
    print("| INT8 model | exact | kernels | layers departing | p50 ms | build s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| FP32 | | | | {latency_ms(fp32, x, args.iterations):.3f} | |", flush=True)
    if kind == "minilm":  # mode: dynamic, the README's recipe for transformers on ORT's CPU provider
        for name, scheme in cpu_kernels.SCHEMES.items():
            report(f"int8pipe dynamic, weights {name}",
                   lambda s=scheme: dynamic.quantize_dynamic(fp32, True, (), (), scheme=s), score, x,
                   args.iterations)  # fmt: skip
        print()
        return
    start = time.perf_counter()
    cal = calibrate(path, batches, "mse")
    print(f"<!-- calibration (mse, every tensor): {time.perf_counter() - start:.0f} s -->", flush=True)
    for name, scheme in cpu_kernels.SCHEMES.items():
        report(f"int8pipe static, weights {name}: {scheme.detail}",
               lambda s=name: static_model(fp32, batches, cal, s), score, x, args.iterations)  # fmt: skip
    for rr in (False, True):
        report(f"ORT quantize_static (u8/s8, per channel{', reduce_range' if rr else ''})",
               lambda rr=rr: ort_model(path, folder, batches, rr), score, x, args.iterations)  # fmt: skip
    if kind == "ocr_rec":  # mode: dynamic, what the README recommends for recognisers
        for name, scheme in cpu_kernels.SCHEMES.items():
            report(f"int8pipe dynamic, weights {name}",
                   lambda s=scheme: dynamic.quantize_dynamic(fp32, True, (), (), scheme=s), score, x,
                   args.iterations)  # fmt: skip
    print()


if __name__ == "__main__":
    main()
