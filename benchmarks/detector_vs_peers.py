"""INT8 detection quality of int8pipe (default, other methods, target onnxruntime) against ONNX
Runtime's quantize_static and NNCF, on the PP-OCRv4 text detector, same data for every tool.

    pip install rapidocr-onnxruntime nncf   # rapidocr ships ch_PP-OCRv4_det_infer.onnx (4.7 MB)
    python benchmarks/detector_vs_peers.py [--model PATH] [--frames text|mosaic] [--size 640]
                                           [--samples 32] [--validation 32]

The model is the DBNet-style detector that the PyPI package rapidocr-onnxruntime ships (not kept in
this repository; it is licensed separately): input ``x`` [N,3,H,W], an image scaled to [0, 1] and
normalised with the ImageNet mean and std, channels in OpenCV's BGR order as PaddleOCR and RapidOCR
feed it; output a [N,1,H,W] text probability map. The export has dynamic H and W; the script fixes
them to ``--size`` (calibration and the Q/DQ tools then see one static shape) and keeps N dynamic.

Frames (``--frames``), calibration with seed 0, every number on held-out frames of seed 1:

- ``text`` (default): a random crop of one of scikit-image's bundled photos (the astronaut, the
  rocket, coffee, coins, the scanned page, ...) with 3-8 lines of 1-4 English words written on it
  (words of the stdlib's ``pydoc_data.topics``, Pillow's built-in TrueType font at 14-43 px, dark or
  light by the background). This is what a text detector is for: FP32 finds the written lines with
  confident probability maps.
- ``mosaic``: 2x2 mosaics of random crops of the same photos and nothing written on them, the case
  of the earlier results. Most photos hold no text, so most FP32 detections are faint texture blobs
  near the threshold, which any perturbation, INT8 weights alone included, splits or drops.

Detection metrics, written against the FP32 model's output (there are no ground-truth boxes; the
question is how much of what the FP32 detector finds the INT8 model still finds). Per image, FP32
and INT8 detections are matched one to one, greedily by box IoU, pairs with IoU >= 0.5 only;
recall = matched pairs / FP32 detections, precision = matched pairs / INT8 detections, pooled over
the held-out images. Two definitions of a detection:

- DB boxes (what RapidOCR keeps, its config.yaml: ``thresh 0.3``, ``box_thresh 0.5``,
  ``use_dilation``): the map binarised at 0.3 and dilated by a 2x2 kernel, 4-connected components
  with both sides >= 3 px, kept when the mean probability over the component is >= 0.5 (RapidOCR
  averages over the box polygon of the component's contour; the component itself is close to it);
  the box is the component's bounding box.
- components (the earlier, stricter metric): every 4-connected component of the map binarised at
  0.3 with at least ``--min-area`` pixels, whatever its score.

Also: mask IoU, |FP32 mask ∩ INT8 mask| / |FP32 mask ∪ INT8 mask| of the maps binarised at 0.3,
pooled; cosine, per image, of the flattened FP32 and INT8 maps, averaged.

Every Q/DQ model runs with ORT's graph optimisations off: the quantised arithmetic computed exactly
in float, which is what TensorRT computes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from peers import ort_quantize_static, ort_static_variants, print_layer_report  # noqa: E402

from examples.metrics.text_detection import BOX_THRESH, bounding_box, components, matched, text_boxes  # noqa: E402
from examples.ppocr_det.data import MEAN, STD, photos, text_frames  # noqa: E402

MODEL_FILE = "ch_PP-OCRv4_det_infer.onnx"
THRESH = 0.3  # DB's binarisation threshold
BATCH = 4


# ---------------------------------------------------------------- model


def find_model(given: str | None, model_file: str = MODEL_FILE, what: str = "detector") -> Path:
    """--model, else ``model_file`` inside an installed rapidocr_onnxruntime, else say how to get it."""
    if given:
        path = Path(given)
        if not path.is_file():
            sys.exit(f"--model {given}: no such file.")
        return path
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "models" / model_file
            if candidate.is_file():
                return candidate
    sys.exit(
        f"The PP-OCRv4 {what} ({model_file}) was not found. Install the package that ships it, "
        "`pip install rapidocr-onnxruntime`, or pass --model PATH (unzip it from the wheel: "
        f"rapidocr_onnxruntime/models/{model_file})."
    )


def constants_to_initializers(m: onnx.ModelProto) -> int:
    """Move every Constant node's value into an initializer, as int8pipe's export step does.

    Paddle2ONNX writes all 62 Conv weights and biases as Constant nodes and no initializer. Every
    quantizer here only quantizes weights that are initializers: on the raw export ORT's
    quantize_static and NNCF leave 52-53 of the 62 Convs FP32 ("Expected bias ... to be an
    initializer"), and int8pipe's quantize() called directly none. Pass --raw-export to see that
    (it also keeps opset 12, see fixed_size).
    """
    from pipeline.graph import model as onnx_model

    return onnx_model.constants_to_initializers(m)


def fixed_size(path: Path, size: int, folder: Path, raw: bool = False) -> Path:
    """The detector with H and W fixed to ``size``, its constants as initializers (unless ``raw``)
    and every node named (node tables and exclusion work by name)."""
    from pipeline.graph import model as onnx_model

    m = onnx.load(str(path))
    if not raw:
        progress(f"moved {constants_to_initializers(m)} Constant nodes into initializers")
        # opset 12 has no per-channel DequantizeLinear (axis came in 13): int8pipe's quantize writes
        # the attribute anyway (ORT refuses to load the result), NNCF falls back to per-tensor weights
        m = onnx.version_converter.convert_version(m, 13)
    for vi in (*m.graph.input, *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param = "N"
        for d in dims[2:]:
            d.dim_value = size
    onnx_model.name_nodes(m)
    m = onnx.shape_inference.infer_shapes(m)
    out = folder / f"ppocr_det_{size}.onnx"
    onnx_model.save_checked(m, out)
    return out


def probability_maps(model: bytes, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    from pipeline.execution import runtime

    sess = runtime.session(model, "cpu", optimize=optimize)
    return np.concatenate([sess.run(None, {"x": x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])[:, 0]


# ---------------------------------------------------------------- data


def mosaics(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` normalised BGR NCHW frames, each a 2x2 mosaic of random crops of the bundled photos."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    images = photos()
    half = size // 2
    out = np.empty((n, 3, size, size), np.float32)
    for k in range(n):
        frame = np.empty((size, size, 3), np.float32)
        for ty in range(2):
            for tx in range(2):
                img = images[rng.integers(len(images))]
                h, w = img.shape[:2]
                side = int(min(h, w) * rng.uniform(0.4, 1.0))
                y, x = rng.integers(h - side + 1), rng.integers(w - side + 1)
                tile = resize(img[y : y + side, x : x + side], (half, half), anti_aliasing=True)
                frame[ty * half : (ty + 1) * half, tx * half : (tx + 1) * half] = tile
        out[k] = ((frame[:, :, ::-1] - MEAN) / STD).transpose(2, 0, 1)  # RGB -> BGR, as OpenCV reads
    return out


def frames(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    return text_frames(n, size, seed) if kind == "text" else mosaics(n, size, seed)


def batches(x: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), BATCH):
        yield {"x": x[i : i + BATCH]}


# ---------------------------------------------------------------- detection metric


def detections(prob: np.ndarray, min_area: int) -> np.ndarray:
    """Boxes [k, 4] (y0, x0, y1, x1; ends exclusive) of every component of ``prob > THRESH`` of at
    least ``min_area`` pixels, whatever its score (the components metric)."""
    boxes = [bounding_box(runs) for runs in components(prob > THRESH) if sum(b - a for _, a, b in runs) >= min_area]
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def score(
    out: np.ndarray, ref: np.ndarray, ref_boxes: list[np.ndarray], min_area: int, ref_db: list[np.ndarray] | None = None
) -> dict[str, float]:
    """Both metrics of ``out`` against the FP32 maps ``ref`` (their boxes precomputed: ``ref_boxes``
    by ``detections``, ``ref_db`` by ``text_boxes``)."""
    ref_db = ref_db if ref_db is not None else [text_boxes(r) for r in ref]
    n_ref = n_out = pairs = inter = union = db_ref = db_out = db_pairs = 0
    for prob, r, boxes, kept in zip(out, ref, ref_boxes, ref_db):
        found = detections(prob, min_area)
        n_ref, n_out, pairs = n_ref + len(boxes), n_out + len(found), pairs + matched(boxes, found)
        found = text_boxes(prob)
        db_ref, db_out, db_pairs = db_ref + len(kept), db_out + len(found), db_pairs + matched(kept, found)
        a, b = r > THRESH, prob > THRESH
        inter, union = inter + int((a & b).sum()), union + int((a | b).sum())
    flat_o, flat_r = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (flat_o * flat_r).sum(1) / np.maximum(np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_r, axis=1), 1e-12)
    return {
        "recall": pairs / max(n_ref, 1),
        "precision": pairs / max(n_out, 1),
        "mask_iou": inter / max(union, 1),
        "cosine": float(cos.mean()),
        "detections": n_out,
        "db_recall": db_pairs / max(db_ref, 1),
        "db_precision": db_pairs / max(db_out, 1),
        "db_detections": db_out,
    }


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help=f"path to {MODEL_FILE} (default: the one rapidocr-onnxruntime installs)")
    ap.add_argument("--size", type=int, default=640, help="frame side in pixels (multiple of 32)")
    ap.add_argument("--frames", choices=("text", "mosaic"), default="text", help="what the frames show (docstring)")
    ap.add_argument("--samples", type=int, default=32, help="calibration frames (seed 0)")
    ap.add_argument("--validation", type=int, default=32, help="held-out scoring frames (seed 1)")
    ap.add_argument("--min-area", type=int, default=9, help="smallest component counted as a detection")
    ap.add_argument("--raw-export", action="store_true", help="keep the export's Constant nodes (see the docstring)")
    ap.add_argument("--layers", type=int, default=4, help="held-out frames for the per-layer check (0: skip)")
    args = ap.parse_args()
    if args.size % 32:
        sys.exit(f"--size {args.size}: the detector downsamples by 32; use a multiple of 32.")

    from pipeline.calibration.calibrator import calibrate, rethreshold
    from pipeline.transforms import bias_correction, shift, smoothing, weight_rounding
    from pipeline.transforms.quantization import QuantizeOptions, node_table, quantize, quantized_activations

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-det-peers-"))
    path = fixed_size(find_model(args.model), args.size, folder, args.raw_export)
    fp32 = onnx.load(str(path))
    kind = "text frames" if args.frames == "text" else "mosaics"
    progress(f"model {path.name}; building {args.samples} calibration and {args.validation} held-out {kind}")
    x_cal = frames(args.frames, args.samples, args.size, seed=0)
    x_val = frames(args.frames, args.validation, args.size, seed=1)
    ref = probability_maps(fp32.SerializeToString(), x_val, optimize=True)
    ref_boxes = [detections(p, args.min_area) for p in ref]
    ref_db = [text_boxes(p) for p in ref]
    convs = sum(n.op_type == "Conv" for n in fp32.graph.node)
    lines = [
        f"# PP-OCRv4 text detector ({MODEL_FILE}), {args.size}x{args.size}: {args.samples} calibration, "
        f"{args.validation} held-out {kind}; on the held-out frames FP32 finds {sum(map(len, ref_db))} DB boxes "
        f"(thresh {THRESH}, box_thresh {BOX_THRESH}) and {sum(map(len, ref_boxes))} components (area >= "
        f"{args.min_area} px)",
        f"# CPU flags: {cpu_flags()}; every Q/DQ model computed exactly (ORT graph optimisations off)",
        "",
        "| INT8 model | Conv nodes INT8 | DB boxes recall | DB boxes precision | components recall "
        "| components precision | mask IoU | cosine mean | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)

    def row(name: str, model: onnx.ModelProto | None, seconds: float, note: str = "") -> None:
        if model is None:
            print(f"| {name} | failed: {note} | | | | | | | {seconds:.0f} |", flush=True)
            return
        progress(f"scoring {name}")
        s = score(probability_maps(model.SerializeToString(), x_val), ref, ref_boxes, args.min_area, ref_db)
        conv_int8 = sum(r["precision"] == "int8" and r["op_type"] == "Conv" for r in node_table(fp32, model))
        print(
            f"| {name} | {conv_int8}/{convs} | {s['db_recall']:.3f} | {s['db_precision']:.3f} | {s['recall']:.3f} "
            f"| {s['precision']:.3f} | {s['mask_iou']:.3f} | {s['cosine']:.4f} | {seconds:.0f} |",
            flush=True,
        )

    # int8pipe: one two-pass calibration; every method's thresholds come from its histograms
    progress("int8pipe: calibrating (mse, two passes)")
    start = time.perf_counter()
    quantized_inputs = quantized_activations(fp32, "tensorrt")
    cal = calibrate(path, lambda: batches(x_cal), "mse", histogram_tensors=quantized_inputs)
    calibration_s = time.perf_counter() - start
    plain, models, corrected_s = {}, {}, {}
    for method in ("mse", "minmax", "entropy", "percentile"):
        progress(f"int8pipe: quantizing ({method}) and bias correction")
        ranges = rethreshold(cal.ranges, cal.histograms, method, 99.99)
        start = time.perf_counter()
        plain[method] = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
        quantize_s = time.perf_counter() - start
        models[method] = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
        start = time.perf_counter()
        bias_correction.correct(fp32, models[method], batches(x_cal), 128)  # the step's default
        corrected_s[method] = calibration_s + quantize_s + time.perf_counter() - start
        plain_s = calibration_s + quantize_s
        if method == "mse":
            row("int8pipe default (mse, bias correction)", models["mse"], corrected_s["mse"])
            row("int8pipe mse without bias correction", plain["mse"], plain_s)
        else:
            row(f"int8pipe {method} (bias correction)", models[method], corrected_s[method])
    row("int8pipe entropy without bias correction (the first default)", plain["entropy"], calibration_s)
    for method in ("mse", "percentile"):  # steps.quantize.shift_activations: true
        progress(f"int8pipe: {method}, shifted activations, bias correction")
        ranges = rethreshold(cal.ranges, cal.histograms, method, 99.99)
        start = time.perf_counter()
        shifted = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
        count = len(shift.shift_inputs(shifted, {k: (v.min, v.max) for k, v in ranges.tensors.items()}))
        bias_correction.correct(fp32, shifted, batches(x_cal), 128)
        row(f"int8pipe {method} + shift_activations ({count} Conv inputs), bias correction", shifted,
            calibration_s + time.perf_counter() - start)  # fmt: skip
    for method, shifted_too in (("mse", False), ("mse", True)):  # steps.quantize.weight_rounding: gptq
        progress(f"int8pipe: {method}{', shifted activations' if shifted_too else ''}, GPTQ, bias correction")
        ranges = rethreshold(cal.ranges, cal.histograms, method, 99.99)
        start = time.perf_counter()
        rounded = quantize(fp32, ranges.amax(), QuantizeOptions(target="tensorrt"))
        count, _ = weight_rounding.round_weights(fp32, rounded, batches(x_cal), 128)
        if shifted_too:
            shift.shift_inputs(rounded, {k: (v.min, v.max) for k, v in ranges.tensors.items()})
        bias_correction.correct(fp32, rounded, batches(x_cal), 128)
        name = f"{method}{' + shift_activations' if shifted_too else ''} + GPTQ weight rounding ({count} Convs)"
        row(f"int8pipe {name}, bias correction", rounded, calibration_s + time.perf_counter() - start)

    progress("int8pipe: smoothing (alpha 0.5), mse, bias correction")
    start = time.perf_counter()
    ranges = rethreshold(cal.ranges, cal.histograms, "mse", 99.99)
    smoothed, new = smoothing.smooth_and_calibrate(
        fp32, lambda: batches(x_cal), ["Conv", "MatMul", "Gemm"], [], 0.5, 128, "mse", 99.99, 512
    )
    amax = {**ranges.amax(), **{k: v.amax for k, v in new.items()}}
    smooth_q = quantize(smoothed, amax, QuantizeOptions(target="tensorrt"))
    bias_correction.correct(smoothed, smooth_q, batches(x_cal), 128)
    row(f"int8pipe smoothing alpha 0.5 ({len(new)} inputs), mse, bias correction", smooth_q,
        calibration_s + time.perf_counter() - start)  # fmt: skip

    progress("int8pipe: target onnxruntime")
    ranges = rethreshold(cal.ranges, cal.histograms, "mse", 99.99)
    observed = {k: (v.min, v.max) for k, v in ranges.tensors.items()}
    start = time.perf_counter()
    ort_opts = QuantizeOptions(target="onnxruntime", activations="asymmetric")
    try:
        ort_target = quantize(fp32, ranges.amax(), ort_opts, observed)
        bias_correction.correct(fp32, ort_target, batches(x_cal), 128)
        row("int8pipe target onnxruntime (mse, u8 asymmetric, bias correction)", ort_target,
            calibration_s + time.perf_counter() - start)  # fmt: skip
    except Exception as exc:  # reported in the table, not hidden
        row("int8pipe target onnxruntime", None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")

    # ONNX Runtime's quantize_static, MinMax, per-channel weights, its default u8 activations and s8 symmetric
    for name, options in ort_static_variants().items():
        progress(f"{name}: quantizing")
        start = time.perf_counter()
        try:
            model = ort_quantize_static(path, folder / "ort.onnx", lambda: batches(x_cal), **options)
            row(name, model, time.perf_counter() - start)
        except Exception as exc:  # reported in the table, not hidden
            row(name, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")

    try:
        import nncf
    except ImportError:
        print("| NNCF | not installed (pip install nncf) | | | | | | | |")
    else:
        progress("NNCF: quantizing")
        samples = [{"x": x_cal[i : i + 1]} for i in range(len(x_cal))]
        start = time.perf_counter()
        quantized = nncf.quantize(fp32, nncf.Dataset(samples), subset_size=len(samples))
        row(f"NNCF {nncf.__version__} quantize (defaults)", quantized, time.perf_counter() - start)

    if args.layers:
        # where the default model's error comes from: quantized nodes ranked by the error their own
        # quantization adds (pipeline.layers), on a few held-out frames
        from pipeline.analysis.layers import layer_errors

        progress(f"per-layer check of the default model on {args.layers} held-out frames")
        feeds = lambda: batches(x_val[: args.layers])  # noqa: E731
        errs = layer_errors(fp32, models["mse"], feeds, args.layers, int8_optimize=False)
        print_layer_report(errs, "int8pipe default", 6)


if __name__ == "__main__":
    main()
