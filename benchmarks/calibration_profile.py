"""Where int8pipe's entropy calibration spends its time on EfficientNet-Lite0 (no peer; see calibration_vs_ort.py).

    pip install -e ".[efficientnet]"
    python benchmarks/calibration_profile.py [--samples 256] [--repeats 3]

Prints medians over --repeats of: plain inference; inference with the pass-1 and pass-2 tensors
exposed (with ORT's full optimisations and without its NCHWc layout); pass 1 with and without the
derived Relu/Clip ranges; pass 2; and the |x| histogram per value, compiled kernel against numpy.
The crops are decoded once up front, so data loading is not in these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "efficientnet_lite0")]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from accuracy_vs_ort import fp32_model
    from data import crops

    from pipeline.calibration import histogram
    from pipeline.calibration.collect import CHUNK, BoundOutputs, expose, run_pass
    from pipeline.calibration.derived import derivable
    from pipeline.calibration.histogram import TensorStats, add_abs_histogram
    from pipeline.graph import model as onnx_model
    from pipeline.transforms.quantization import quantized_activations

    model = onnx.load(str(fp32_model(Path(tempfile.mkdtemp(prefix="int8pipe-profile-")), args.samples)))
    batches = list(crops(args.samples, 32))
    chunks = [{k: v[i : i + CHUNK] for k, v in b.items()} for b in batches for i in range(0, len(b["input"]), CHUNK)]
    tensors = onnx_model.activation_tensors(model)
    inputs = {vi.name for vi in onnx_model.graph_inputs(model)}
    hist = [t for t in quantized_activations(model, "tensorrt") or tensors if t not in inputs]
    derived = derivable(model, tensors, measure=set())
    pass1 = [t for t in tensors if t not in derived and t not in inputs]
    print(f"# EfficientNet-Lite0, {args.samples} samples in chunks of {CHUNK}, median of {args.repeats}")
    print(
        f"# {len(tensors)} activation tensors; pass 1 exposes {len(pass1)} ({len(derived)} derived), pass 2 {len(hist)}"
    )

    def session(names: list[str] | None, level: object) -> object:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        data = model.SerializeToString() if names is None else expose(model, names)
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def infer(names: list[str] | None, level: object) -> float:
        sess = session(names, level)
        if names is None:
            return median_seconds(lambda: [sess.run(None, c) for c in chunks], args.repeats)  # type: ignore[attr-defined]
        bound = BoundOutputs(sess, names)
        return median_seconds(lambda: [bound.run(c) for c in chunks], args.repeats)

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "no NCHWc": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    for label, level in levels.items():
        plain, first, second = infer(None, level), infer(pass1, level), infer(hist, level)
        print(
            f"inference ({label}): plain {plain:.2f} s, pass-1 tensors exposed {first:.2f} s, "
            f"pass-2 tensors exposed {second:.2f} s"
        )

    def measure(names: list[str]) -> dict[str, TensorStats]:
        stats = {t: TensorStats(histogram=False) for t in names}
        run_pass(model, stats, iter(batches), "profile", digest=False)
        return stats

    everything = [t for t in tensors if t not in inputs]
    print(f"pass 1, every tensor exposed: {median_seconds(lambda: measure(everything), args.repeats):.2f} s")
    print(f"pass 1, derived ranges not exposed: {median_seconds(lambda: measure(pass1), args.repeats):.2f} s")
    stats = measure(everything)

    def second_pass() -> None:
        live = {t: TensorStats() for t in hist}
        for t, st in live.items():
            st.min, st.max, st.count = stats[t].min, stats[t].max, stats[t].count
            st.start_histogram_pass()
        run_pass(
            model, {t: st for t, st in live.items() if st.fine is not None}, iter(batches), "profile", digest=False
        )

    print(f"pass 2 (histograms, {histogram.KERNEL} kernel): {median_seconds(second_pass, args.repeats):.2f} s")

    values = session(hist, levels["all"]).run(hist, chunks[0])  # type: ignore[attr-defined]
    n = sum(v.size for v in values)
    for compiled in (True, False):

        def count(compiled: bool = compiled) -> None:
            for t, v in zip(hist, values):
                if stats[t].amax > 0:
                    add_abs_histogram(v.copy(), 2048 / stats[t].amax, np.zeros(2048, np.int64), compiled=compiled)

        copy = median_seconds(lambda: [v.copy() for v in values], args.repeats)
        seconds = median_seconds(count, args.repeats) - copy
        name = "compiled" if compiled and histogram.KERNEL == "compiled" else "numpy"
        print(f"|x| histogram, {name}: {seconds / n * 1e9:.2f} ns per value ({n} values of one chunk)")


if __name__ == "__main__":
    main()
