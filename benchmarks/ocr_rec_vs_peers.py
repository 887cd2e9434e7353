"""INT8 text recognition with attention: int8pipe (static TensorRT placement with and without the
attention products, smoothing, target onnxruntime, dynamic mode) against ONNX Runtime's
quantize_dynamic and quantize_static and NNCF, on the PP-OCRv4 recogniser, same data for every tool.

    pip install rapidocr-onnxruntime nncf   # rapidocr ships ch_PP-OCRv4_rec_infer.onnx (10.9 MB)
    python benchmarks/ocr_rec_vs_peers.py [--model PATH] [--width 320] [--samples 64] [--validation 96]

The model is the recogniser the PyPI package rapidocr-onnxruntime ships (not kept in this
repository; it is licensed separately): a CNN backbone and two SVTR mixing blocks (multi-head
self-attention: MatMul, Softmax, LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div) and a
6625-class CTC head. Input ``x`` [N,3,48,W], a BGR text line scaled to [0, 1] and normalised to
[-1, 1] ((img/255 - 0.5)/0.5); output [N,W/8,6625] per-step character probabilities (index 0 is
the CTC blank; the character list is in the model's ``character`` metadata). The script fixes W to
``--width`` (one static shape for calibration and every Q/DQ tool), moves the export's Constant
nodes into initializers and converts it to opset 13, as benchmarks/detector_vs_peers.py does.

Text lines: scikit-image's bundled scanned page (``data.page()``, 7 lines). Lines are cut where
the horizontal projection of the ink (pixels darker than their local background) has rows with
ink; each line is resized to height 48 keeping its aspect ratio (700-1000 px wide). The page's
lines 1, 3, 5, 7 (top to bottom) are for calibration, lines 2, 4, 6 held out, so no held-out line
was seen by calibration. ``data.text()`` is not used: its handwriting is slanted and crossed by
ruled lines, no row profile (nor a deskewed one) separates its lines, and FP32 reads nothing on
its bands. A sample is a random window of ``--width`` pixels of a line (a segment of it, padded
with 0 after normalisation, as PaddleOCR pads, where the line is shorter), shifted by up to 2 px
vertically, with random contrast and brightness; calibration samples use seed 0, held-out samples
seed 1.

Scores are against the FP32 model (there is no ground truth; the question is whether INT8 reads
what FP32 reads): CTC greedy decoding (argmax per step, repeats merged, blanks dropped), then
exact string agreement with FP32's string, mean character error rate (edit distance to FP32's
string / its length, 1 per character when FP32 read nothing and INT8 did), and the mean cosine
of the logits (the input of the final Softmax, per sample flattened over steps and classes).
Every Q/DQ model is scored with ORT's graph optimisations off: the quantised arithmetic computed
exactly in float, which is what TensorRT computes. Latency: batch 1, ORT graph optimisations on
(its fused INT8 kernels on CPU), ``--threads`` intra-op threads, p50 of ``--iterations`` runs
after 5 warm-up runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from detector_vs_peers import constants_to_initializers, cpu_flags, find_model, progress  # noqa: E402
from peers import nncf_builds, ort_quantize_static, print_layer_report  # noqa: E402

MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
HEIGHT = 48
BATCH = 8
LOGITS = "int8pipe_bench_logits"


# ---------------------------------------------------------------- model


def fold_constant_casts(m: onnx.ModelProto) -> int:
    """Replace each Cast of an initializer by the cast initializer; returns how many.

    Once the Constants are initializers, the export's 23 Casts of them (shape and scalar
    arithmetic) are the only thing NNCF 3.4 cannot read: its eliminate_nop_cast pass looks the
    Cast's input up among value infos, gets the initializer and fails (AttributeError: type).
    Folding them changes no value, and every tool gets the folded model.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    kept, folded = [], 0
    for node in m.graph.node:
        if node.op_type == "Cast" and node.input[0] in inits:
            to = helper.get_attribute_value(node.attribute[0])
            array = numpy_helper.to_array(inits[node.input[0]]).astype(helper.tensor_dtype_to_np_dtype(to))
            m.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            inits[node.output[0]] = m.graph.initializer[-1]
            folded += 1
        else:
            kept.append(node)
    del m.graph.node[:]
    m.graph.node.extend(kept)
    return folded


def fixed_width(path: Path, width: int, folder: Path) -> Path:
    """The recogniser with H = 48 and W = ``width``, constants as initializers, opset 13, nodes named."""
    from pipeline.graph import model as onnx_model

    m = onnx.load(str(path))
    progress(f"moved {constants_to_initializers(m)} Constant nodes into initializers")
    progress(f"folded {fold_constant_casts(m)} Casts of initializers")
    # opset 12 has no per-channel DequantizeLinear (see detector_vs_peers.fixed_size)
    m = onnx.version_converter.convert_version(m, 13)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "N"
    dims[2].dim_value, dims[3].dim_value = HEIGHT, width
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    out_dims[0].dim_param = "N"
    out_dims[1].dim_value = width // 8
    onnx_model.name_nodes(m)
    m = onnx.shape_inference.infer_shapes(m)
    out = folder / f"ppocr_rec_{width}.onnx"
    onnx_model.save_checked(m, out)
    return out


def characters(m: onnx.ModelProto) -> list[str]:
    """Class index -> character: the blank, the model's dictionary, then the space PaddleOCR appends."""
    chars = next((p.value for p in m.metadata_props if p.key == "character"), "")
    return ["", *chars.splitlines(), " "]


def with_logits(m: onnx.ModelProto) -> bytes:
    """``m`` with the input of the Softmax that makes its output (the CTC head's logits) also as an output.

    The opset 12 -> 13 conversion wraps that Softmax in Reshapes, so its input may be [N*T, C]."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    producer = {o: n for n in out.graph.node for o in n.output}
    softmax = producer[out.graph.output[0].name]
    while softmax.op_type != "Softmax":  # back through the Reshapes (and a quantizer's Q/DQ)
        softmax = producer[softmax.input[0]]
    out.graph.output.append(onnx.helper.make_tensor_value_info(softmax.input[0], onnx.TensorProto.FLOAT, None))
    return out.SerializeToString()


def logits(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    """[N, T, C] pre-Softmax scores of the CTC head."""
    from pipeline.execution import runtime

    sess = runtime.session(with_logits(model), "cpu", optimize=optimize)
    out = []
    for i in range(0, len(x), BATCH):
        probs, scores = sess.run(None, {"x": x[i : i + BATCH]})
        out.append(scores.reshape(probs.shape))
    return np.concatenate(out)


# ---------------------------------------------------------------- data


def _lines(img: np.ndarray, min_rows: int) -> list[np.ndarray]:
    """Horizontal bands of ``img`` (grey, uint8) whose rows hold ink, each with a 3-row margin."""
    from scipy import ndimage

    grey = img.astype(np.float32)
    background = ndimage.maximum_filter(ndimage.uniform_filter(grey, 5), size=25)
    ink = (background - grey) > 40  # darker than the paper around it: handles the page's shading
    rows = ink.mean(1) > 0.02
    bands, start = [], None
    for y, on in enumerate([*rows, False]):
        if on and start is None:
            start = y
        elif not on and start is not None:
            if y - start >= min_rows:
                bands.append(img[max(start - 3, 0) : min(y + 3, len(img))])
            start = None
    return bands


def text_lines() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration lines, held-out lines) of the scanned page, each [48, w] grey uint8: alternate lines."""
    from skimage import data
    from skimage.transform import resize

    cal: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for k, band in enumerate(_lines(np.asarray(data.page()), 8)):
        w = max(int(round(band.shape[1] * HEIGHT / band.shape[0])), 8)
        line = resize(band, (HEIGHT, w), anti_aliasing=True, preserve_range=True).astype(np.uint8)
        (cal if k % 2 == 0 else held).append(line)
    return cal, held


def samples(lines: list[np.ndarray], n: int, width: int, seed: int) -> np.ndarray:
    """``n`` normalised BGR NCHW samples: random windows of random lines, shifted, contrast changed."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, HEIGHT, width), np.float32)  # 0: PaddleOCR's padding after normalisation
    for k in range(n):
        line = lines[rng.integers(len(lines))].astype(np.float32)
        x0 = rng.integers(max(line.shape[1] - width, 0) + 1)
        window = line[:, x0 : x0 + width]
        window = np.roll(window, int(rng.integers(-2, 3)), axis=0)
        mean = window.mean()
        window = np.clip((window - mean) * rng.uniform(0.6, 1.3) + mean + rng.uniform(-30, 30), 0, 255)
        out[k, :, :, : window.shape[1]] = (window / 255.0 - 0.5) / 0.5  # grey: B = G = R
    return out


def batches(x: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), BATCH):
        yield {"x": x[i : i + BATCH]}


# ---------------------------------------------------------------- metric


def decode(scores: np.ndarray) -> list[int]:
    """CTC greedy: argmax per step, repeats merged, blanks (0) dropped."""
    best = scores.argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(c) for c in best[keep] if c != 0]


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def score(out: np.ndarray, ref: np.ndarray, ref_text: list[list[int]]) -> dict[str, float]:
    texts = [decode(o) for o in out]
    cer = [edit_distance(t, r) / max(len(r), 1) if r else float(len(t) > 0) for t, r in zip(texts, ref_text)]
    flat_o, flat_r = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (flat_o * flat_r).sum(1) / np.maximum(np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_r, axis=1), 1e-12)
    return {
        "exact": float(np.mean([t == r for t, r in zip(texts, ref_text)])),
        "cer": float(np.mean(cer)),
        "cosine": float(cos.mean()),
    }


# ---------------------------------------------------------------- benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help=f"path to {MODEL_FILE} (default: the one rapidocr-onnxruntime installs)")
    ap.add_argument("--width", type=int, default=320, help="line width in pixels (multiple of 8)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (calibration lines, seed 0)")
    ap.add_argument("--validation", type=int, default=96, help="held-out samples (held-out lines, seed 1)")
    ap.add_argument("--iterations", type=int, default=30, help="timed batch-1 runs per model")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency column")
    ap.add_argument("--layers", type=int, default=16, help="held-out samples for the per-layer check (0: skip)")
    ap.add_argument("--no-nncf", action="store_true", help="skip NNCF even when it is installed")
    args = ap.parse_args()
    if args.width % 8:
        sys.exit(f"--width {args.width}: the recogniser downsamples the width by 8; use a multiple of 8.")

    from pipeline.calibration.calibrator import DEFAULT_MEMORY_MB, calibrate
    from pipeline.execution import runtime
    from pipeline.transforms import bias_correction, dynamic, shift, smoothing, weight_rounding
    from pipeline.transforms.keep_float import keep_float_inputs
    from pipeline.transforms.quantization import (
        QuantizeOptions,
        float_nodes,
        node_table,
        quantize,
        quantized_activations,
    )
    from pipeline.transforms.roles import activation_matmuls

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-rec-peers-"))
    path = fixed_width(find_model(args.model, MODEL_FILE, "recogniser"), args.width, folder)
    fp32 = onnx.load(str(path))
    chars = characters(fp32)
    cal_lines, held_lines = text_lines()
    progress(f"{len(cal_lines)} calibration and {len(held_lines)} held-out text lines")
    x_cal = samples(cal_lines, args.samples, args.width, seed=0)
    x_val = samples(held_lines, args.validation, args.width, seed=1)
    ref = logits(fp32, x_val, optimize=True)
    ref_text = [decode(r) for r in ref]
    counts = {op: sum(n.op_type == op for n in fp32.graph.node) for op in ("MatMul", "Conv")}
    feed = {"x": x_val[:1]}

    def latency(m: onnx.ModelProto) -> float:
        sess = runtime.session(m.SerializeToString(), "cpu", optimize=True, threads=args.threads)
        return float(np.median(runtime.time_session(sess, feed, args.iterations, 5)))

    fp32_ms = latency(fp32)
    lines = [
        f"# PP-OCRv4 recogniser ({MODEL_FILE}), [N,3,{HEIGHT},{args.width}]: {args.samples} calibration samples "
        f"from {len(cal_lines)} lines, {args.validation} held-out samples from {len(held_lines)} other lines; "
        f"FP32 reads {sum(map(len, ref_text))} characters on them, {sum(not t for t in ref_text)} samples empty",
        f"# {counts['MatMul']} MatMul ({len(activation_matmuls(fp32))} of two activations: attention), "
        f"{counts['Conv']} Conv; FP32 {path.stat().st_size / 1e6:.1f} MB, batch-1 p50 {fp32_ms:.2f} ms",
        f"# CPU flags: {cpu_flags()}; accuracy of every Q/DQ model computed exactly (ORT graph optimisations "
        f"off); latency with optimisations on, {args.threads} thread(s)",
        "# FP32 reads, e.g.: " + " | ".join(repr("".join(chars[c] for c in t)) for t in ref_text[:4]),
        "",
        "| INT8 model | MatMul INT8 | Conv INT8 | exact string | CER | logits cosine | MB | p50 ms | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)

    def row(name: str, model: onnx.ModelProto | None, seconds: float, rows: list[dict[str, Any]] | None = None,
            note: str = "") -> None:  # fmt: skip
        if model is None:
            print(f"| {name} | failed: {note} | | | | | | | {seconds:.0f} |", flush=True)
            return
        progress(f"scoring {name}")
        s = score(logits(model, x_val), ref, ref_text)
        table = rows if rows is not None else node_table(fp32, model)
        int8 = {op: sum(r["precision"] == "int8" and r["op_type"] == op for r in table) for op in counts}
        mb = len(model.SerializeToString()) / 1e6
        print(
            f"| {name} | {int8['MatMul']}/{counts['MatMul']} | {int8['Conv']}/{counts['Conv']} | {s['exact']:.3f} "
            f"| {s['cer']:.4f} | {s['cosine']:.4f} | {mb:.1f} | {latency(model):.2f} | {seconds:.0f} |",
            flush=True,
        )

    def attempt(name: str, build: Any, before_s: float = 0.0) -> onnx.ModelProto | None:
        """Build and score one model; a failure becomes a table row, not a hidden skip.

        ``before_s``: time already spent on its behalf (a calibration shared by several rows)."""
        start = time.perf_counter() - before_s
        try:
            model, rows = build()
        except Exception as exc:  # reported in the table
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            progress(f"{name} failed: {message}")
            row(name, None, time.perf_counter() - start, note=message)
            return None
        row(name, model, time.perf_counter() - start, rows)
        return model

    # int8pipe static, what steps/quantize.py does: mse ranges, TensorRT placement, bias correction
    progress("int8pipe: calibrating (mse, two passes, TensorRT's quantized tensors)")
    start = time.perf_counter()
    cal_trt = calibrate(path, lambda: batches(x_cal), "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    trt_s = time.perf_counter() - start

    def static(
        opts: QuantizeOptions,
        cal: Any,
        smooth: tuple[list[str], float, str] | None = None,
        shifted: bool = False,
        gptq: bool = False,
    ) -> tuple[onnx.ModelProto, None]:
        """Smoothing ``(op_types, alpha, method)``, Q/DQ, keep_float, GPTQ, shift_activations, bias correction."""
        tensors = dict(cal.ranges.tensors)
        source = fp32
        if smooth:
            source, new = smoothing.smooth_and_calibrate(
                fp32, lambda: batches(x_cal), smooth[0], float_nodes(fp32, opts), smooth[1], 128, smooth[2], 99.99,
                DEFAULT_MEMORY_MB,
            )  # fmt: skip
            progress(f"smoothing: {len(new)} smoothed inputs")
            tensors.update(new)
        observed = {k: (v.min, v.max) for k, v in tensors.items()}
        qdq = quantize(source, {k: v.amax for k, v in tensors.items()}, opts, observed)
        qdq = keep_float_inputs(qdq, fp32, float_nodes(fp32, opts))
        if gptq:
            rounded, _ = weight_rounding.round_weights(source, qdq, batches(x_cal), 128)
            progress(f"GPTQ weight rounding: {rounded} Convs")
        if shifted:
            progress(f"shift_activations: {len(shift.shift_inputs(qdq, observed))} Conv inputs")
        changed, _ = bias_correction.correct(source, qdq, batches(x_cal), 128)
        progress(f"bias correction on {changed} nodes")
        return qdq, None

    built: dict[str, onnx.ModelProto | None] = {}
    trt = QuantizeOptions(target="tensorrt")
    trt_attention = QuantizeOptions(target="tensorrt", activation_matmuls=True)
    for label, opts, smooth in (
        ("tensorrt, attention products float (default)", trt, None),
        ("tensorrt, activation_matmuls: true", trt_attention, None),
        ("tensorrt + smoothing alpha 0.5 on Conv/MatMul/Gemm, mse", trt, (["Conv", "MatMul", "Gemm"], 0.5, "mse")),
        ("tensorrt + smoothing: {} (alpha 0.95 on MatMul/Gemm, minmax)", trt, (["MatMul", "Gemm"], 0.95, "minmax")),
        # the same with the CNN backbone float: what static INT8 of the MatMuls alone costs (dynamic mode's scope)
        (
            "tensorrt, Conv excluded (MatMuls only)",
            QuantizeOptions(target="tensorrt", exclude_op_types=("Conv",)),
            None,
        ),
    ):
        progress(f"int8pipe static {label}")
        built[label] = attempt(
            f"int8pipe static {label} (mse, bias correction)", lambda o=opts, s=smooth: static(o, cal_trt, s), trt_s
        )

    name = "int8pipe static tensorrt + shift_activations (mse, bias correction)"
    built[name] = attempt(name, lambda: static(trt, cal_trt, shifted=True), trt_s)
    name = "int8pipe static tensorrt + weight_rounding: gptq (mse, bias correction)"
    built[name] = attempt(name, lambda: static(trt, cal_trt, gptq=True), trt_s)
    name = "int8pipe static tensorrt + shift_activations + weight_rounding: gptq (mse, bias correction)"
    built[name] = attempt(name, lambda: static(trt, cal_trt, shifted=True, gptq=True), trt_s)

    progress("int8pipe: calibrating (mse, every tensor) for target onnxruntime")
    start = time.perf_counter()
    cal_all = calibrate(path, lambda: batches(x_cal), "mse", histogram_tensors=None)
    all_s = time.perf_counter() - start
    ort_opts = QuantizeOptions(target="onnxruntime", activations="asymmetric")
    name = "int8pipe static target onnxruntime (mse, u8 asymmetric, bias correction)"
    attempt(name, lambda: static(ort_opts, cal_all), all_s)

    def int8pipe_dynamic() -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
        m = dynamic.quantize_dynamic(fp32, True, (), ())
        return m, dynamic.node_table(fp32, m, True)

    progress("int8pipe mode dynamic")
    attempt("int8pipe mode dynamic (per-channel)", int8pipe_dynamic)

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    def ort_dynamic_model() -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
        out = folder / "ort_dynamic.onnx"
        ort_dynamic(str(path), str(out), per_channel=True, weight_type=QuantType.QInt8)
        m = onnx.load(str(out))
        return m, dynamic.node_table(fp32, m, True)

    progress("ORT quantize_dynamic")
    attempt("ORT quantize_dynamic (per-channel, s8 weights, its defaults otherwise)", ort_dynamic_model)

    def ort_static_model() -> tuple[onnx.ModelProto, None]:
        return ort_quantize_static(path, folder / "ort_static.onnx", lambda: batches(x_cal)), None

    progress("ORT quantize_static")
    attempt("ORT quantize_static (QDQ, per-channel, MinMax, u8 activations)", ort_static_model)

    builds = {} if args.no_nncf else nncf_builds(fp32, [{"x": x_cal[i : i + 1]} for i in range(len(x_cal))])
    if not builds and not args.no_nncf:
        print("| NNCF | not installed (pip install nncf) | | | | | | | |")
    for name, build in builds.items():
        progress(name)
        attempt(name, build)

    default = built.get("tensorrt, attention products float (default)")
    if args.layers and default is not None:
        # where the default model's error comes from: quantized nodes ranked by the error their own
        # quantization adds (pipeline.layers), on a few held-out samples
        from pipeline.analysis.layers import layer_errors

        progress(f"per-layer check of the default model on {args.layers} held-out samples")
        errs = layer_errors(fp32, default, lambda: batches(x_val[: args.layers]), args.layers, int8_optimize=False)
        print_layer_report(errs, "int8pipe static tensorrt (default)", 8)


if __name__ == "__main__":
    main()
