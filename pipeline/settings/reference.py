"""The YAML reference (docs/yaml-reference.md), generated from the config dataclasses.

Types and defaults come from the dataclasses the YAML is parsed into, so they cannot drift; every
key must have a line in ``DESCRIPTIONS`` (a test fails otherwise, and when the committed file is
stale). Regenerate with ``int8pipe reference > docs/yaml-reference.md``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.settings.config import RawPipeline, StepSpec
from pipeline.settings.schema import _describe
from pipeline.sources.spec import DataSource

DESCRIPTIONS = {
    "name": "Name of the pipeline: its MLflow runs are named after it (with method and target).",
    "experiment": "MLflow experiment the runs go to (default: `name`). Reuse is per experiment.",
    "model": "The FP32 model: exactly one of `onnx`, `mlflow`, `pytorch`.",
    "model.onnx": "Path of an ONNX file, relative to the YAML file's folder.",
    "model.mlflow": "`models:/name@alias`, `models:/name/version` or `runs:/id/path` of an ONNX-flavour MLflow "
    "model; resolved and downloaded before any run starts.",
    "model.pytorch": "A PyTorch model exported with the TorchScript exporter (needs the `[torch]` extra).",
    "model.pytorch.factory": "`package.module:function` returning a `torch.nn.Module`; looked up next to the YAML "
    "file and in the working directory.",
    "model.pytorch.inputs": "Input name -> shape of the example input used for tracing, e.g. "
    "`{input: [1, 3, 224, 224]}`.",
    "model.pytorch.args": "Keyword arguments for the factory.",
    "model.pytorch.dtypes": "Input name -> dtype of its example input: `float32` (where absent), `float16`, "
    "`int64`, `int32` or `bool`. Token ids and attention masks are `int64`; integer inputs are traced with ones "
    "(a valid id, a full mask).",
    "data": "Calibration and validation data: `data.calibration` and `data.validation`, each a source below.",
    "data.calibration": "Samples the ranges are measured on (needed by calibrate unless `from_cache`).",
    "data.validation": "Samples FP32 and INT8 are compared on (needed by validate); may carry `labels`.",
    "data.*.npz": "An `.npz` file: one array per model input, named after it, first axis = samples; "
    "optionally `labels`.",
    "data.*.npy": "Input name -> `.npy` file, memory-mapped (for data larger than memory); `labels` may be one.",
    "data.*.python": "`package.module:function` yielding batches `{input_name: ndarray, 'labels': ...}`; "
    "looked up next to the YAML file and in the working directory.",
    "data.*.args": "Keyword arguments for the `python:` function.",
    "data.*.images": "A folder of images, resized and normalised into the model's (single) image input.",
    "data.*.images.dir": "The folder (jpg, png, bmp, ppm, tif, webp), relative to the YAML file.",
    "data.*.images.size": "`[height, width]` the images are resized to (bilinear).",
    "data.*.images.mean": "Per-channel mean subtracted after scaling.",
    "data.*.images.std": "Per-channel standard deviation divided by after subtracting the mean.",
    "data.*.images.scale": "Pixel values are divided by this first (255 maps 8-bit pixels to [0, 1]).",
    "data.*.images.layout": "`NCHW` or `NHWC`.",
    "data.*.images.channels": "`RGB`, `BGR` or `L` (grey).",
    "data.*.images.input": "The model input fed (default: the first).",
    "data.*.limit": "Use at most this many samples.",
    "data.*.deps": "For `python:` sources: files or folders the function reads. Declared, their content "
    "proves the data unchanged for step reuse without calling the function; otherwise the samples "
    "themselves are hashed (the function runs once more).",
    "data.*.batch_axes": "Input name -> the axis that indexes samples, for inputs whose samples are not on "
    "axis 0 (a recurrent state `[layers, batch, hidden]`: `{state: 1}`). Batches are cut, joined and "
    "benchmarked along it; the data is stored and fed in the model's own layout.",
    "data.*.constants": "Inputs that are the same for every sample (a scalar sample rate, an initial state "
    "without a batch dim): stored once (an npz member of their own shape) and passed unchanged with every "
    "batch; the benchmark keeps their shape.",
    "steps": "The steps to run, in the order export, calibrate, quantize, validate, benchmark, engine, promote; "
    "an absent step is skipped, an empty mapping `{}` runs it with defaults.",
    "steps.export": "Load the model, check it, raise its opset, make the batch dynamic, fold BatchNorm.",
    "steps.calibrate": "Measure per-tensor ranges; write ranges.json, the TensorRT cache and the ORT table.",
    "steps.quantize": "Build the explicit Q/DQ INT8 model from ranges.json.",
    "steps.validate": "Compare FP32 and INT8 on the validation data; the accuracy gate.",
    "steps.benchmark": "Latency and throughput of FP32 and INT8 per provider and batch size.",
    "steps.engine": "Where `tensorrt` imports and a CUDA GPU is present: build the strongly typed TensorRT engine "
    "of the Q/DQ model and the FP16 engine of the same FP32 model, log both plans, their inspector JSON and "
    "`engine/layers_table.json` (engine layer -> ONNX nodes -> precision), and time both on the GPU. Elsewhere "
    "the step logs why it skipped (tag `int8pipe.engine.skip_reason`) and does nothing else. Needs "
    "`target: tensorrt`.",
    "steps.promote": "Register the INT8 model in the MLflow Model Registry and decide its alias.",
    "steps.export.opset": "Opset the model is converted to when its own is below 13 (per-channel Q/DQ needs 13).",
    "steps.export.dynamic_batch": "Make the first axis of every input and output symbolic.",
    "steps.export.fold_batchnorm": "Fold BatchNormalization into the preceding convolutions, as TensorRT does.",
    "steps.calibrate.method": "`minmax` (max |x|), `entropy` (TensorRT's EntropyCalibration2), `percentile`, "
    "`mse` (squared error of fake quantisation; the default, by measurement), or `auto`: with a validate "
    "step, a search that stops at the first trial passing the gate: mse (the defaults), percentile, percentile "
    "with `weight_rounding: gptq`, entropy, minmax, in that order (one calibration serves every method; a `sweep` "
    "section without `grid` or `trials`, e.g. `{executor: ray}`, says where the search runs); with a "
    "`sweep.grid` of yours, the four methods are added to it and the validate metric chooses.",
    "steps.calibrate.batch_size": "Samples per batch read from the data source.",
    "steps.calibrate.num_bins": "Bins of the |x| histogram (at least 128).",
    "steps.calibrate.percentile": "Percentile of |x| kept by `method: percentile`.",
    "steps.calibrate.from_cache": "Take the ranges from an existing TensorRT calibration cache instead of data.",
    "steps.calibrate.trt_version": "TensorRT release written into the cache header (`TRT-101401-...`).",
    "steps.calibrate.plots": "How many of the most clipped tensors get a histogram plot.",
    "steps.calibrate.minmax_inputs": "Graph inputs keep their full range whatever the method.",
    "steps.calibrate.passes": "2: exact histograms over the global range (batch-order independent); 1: one "
    "streaming pass for read-once sources.",
    "steps.calibrate.tensors": "`quantized`: the histogram method for the tensors the Q/DQ model quantizes, "
    "max |x| elsewhere; `all`: every tensor (for TensorRT implicit INT8 caches).",
    "steps.calibrate.workers": "More than 1: that many Ray workers each calibrate a shard of the data and the "
    "driver merges them; the ranges are identical to one process's. Needs `passes: 2` (or `minmax`).",
    "steps.calibrate.ray": "The Ray cluster a sharded calibration (`workers` > 1) runs on.",
    "steps.calibrate.ray.address": "Its address (default: `$RAY_ADDRESS`, which a Ray sweep sets for its trials).",
    "steps.calibrate.ray.num_cpus": "CPUs each calibration worker reserves.",
    "steps.calibrate.memory_mb": "Activation memory while calibrating, correcting biases and validating: samples "
    "per ONNX Runtime call are sized from the first sample's activation bytes to stay within it (at most 8; "
    "validate's layer comparison at most 2, and in groups of tensors, a pass over the data each, when one "
    "sample's are too many). Raise it for speed on large machines; results do not change with `passes: 2`.",
    "steps.quantize.target": "`tensorrt` (Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul, symmetric) or "
    "`onnxruntime` (every op type ORT's QDQ quantizer supports).",
    "steps.quantize.per_channel": "Weights: one scale per output channel (max |w| / 127) instead of one per tensor.",
    "steps.quantize.exclude": "Nodes kept in float, inputs and weights included.",
    "steps.quantize.exclude.nodes": "Node names (see `quantize/nodes_table.json`).",
    "steps.quantize.exclude.op_types": "Op types, e.g. `[Gemm]`.",
    "steps.quantize.activations": "`auto` (symmetric for tensorrt, asymmetric for onnxruntime), `symmetric` (int8, "
    "zero point 0) or `asymmetric` (uint8 with a zero point; onnxruntime only).",
    "steps.quantize.mode": "`static` (Q/DQ from the calibrated ranges; TensorRT and ONNX Runtime) or `dynamic` "
    "(ONNX Runtime's dynamic quantization: weight MatMul/Gemm INT8 per channel, activations quantized per batch "
    "at run time, activation x activation MatMuls float, embedding Gathers 8-bit weight-only, Conv float; "
    "needs `target: onnxruntime`, CPU; no recovery, no bias correction). Needs no calibrate step.",
    "steps.quantize.activation_matmuls": "Also quantize MatMuls whose both operands are activations (attention's "
    "Q·Kᵀ and P·V; both per tensor, neither can take per-channel scales). Off: they stay float, the weight "
    "MatMuls around them INT8.",
    "steps.quantize.smoothing": "Activation smoothing (SmoothQuant): divide each smoothable layer input (Conv "
    "without groups, MatMul/Gemm with a constant weight) per channel by max|x|^alpha / max|W|^(1-alpha) through an "
    "explicit Mul and multiply the weights' input channels by it; the smoothed tensors are calibrated anew. For "
    "transformers: on all-MiniLM-L6-v2 `smoothing: {}` (alpha 0.95, minmax) with `bias_correction: false` took the "
    "`target: tensorrt` model's embedding cosine from 0.967 to 0.998 and nearest-neighbour agreement from 0.77 to "
    "0.97, every weight MatMul INT8. On CNNs it never paid (Conv inputs at alpha 0.5: EfficientNet-Lite0 "
    "agreement unchanged, PP-OCRv4 detector text boxes kept 0.967 -> 0.965). `auto` (default): on, with these "
    "defaults, for a transformer (activations multiplied together, no Conv), off (null) for every other graph; the "
    "quantize run's tags `int8pipe.graph_kind` and `int8pipe.auto_choices` say what it became.",
    "steps.quantize.smoothing.alpha": "0 keeps the spread in the activation, 1 moves all of it into the weights. "
    "0.95 is what measured best on MiniLM (0.5: cosine 0.959 against 0.997).",
    "steps.quantize.smoothing.op_types": "Layer types whose inputs are smoothed (add `Conv` to smooth convolutions).",
    "steps.quantize.smoothing.samples": "Calibration samples the per-channel maxima come from (whole batches).",
    "steps.quantize.smoothing.method": "Threshold method for the smoothed tensors (the others keep the calibrate "
    "step's). minmax: smoothing flattens their channels, and clipping the few large values left cost more than it "
    "saved (MiniLM at alpha 0.95: cosine 0.997 minmax, 0.994 mse; nearest-neighbour agreement 0.945 against 0.883).",
    "steps.quantize.normalization": "Also quantize normalization layers (LayerNormalization, InstanceNormalization, "
    "GroupNormalization, a BatchNormalization left unfolded); only `target: onnxruntime` quantizes them. Off: "
    "they stay float, as transformers need.",
    "steps.quantize.equalization": "Cross-layer equalization (Data-Free Quantization) for per-tensor weights "
    "(`per_channel: false`): for each Conv -> Relu/ReLU6 (Clip(0, hi)) -> Conv pair, scale the first Conv's "
    "output channels down and the second's input channels up so both get range sqrt(r1 r2) per channel; exact "
    "in float (a ReLU6 becomes Relu + a per-channel Min). The tensors between the pair are renamed "
    "`<tensor>_equalized` and calibrated anew with the calibrate step's method; the equalized float model is "
    "handed on as `model/model_float.onnx` so recovery reverts a node to its own float weights. On "
    "EfficientNet-Lite0 with per-tensor weights top-1 agreement 0.703 -> 0.758; with per-channel weights it "
    "hurt (0.879 -> 0.762: range moves into the per-tensor activations), so it warns there. Needs "
    "`data.calibration`; off when calibrating `from_cache`.",
    "steps.quantize.depthwise_scales": "One INT8 scale per channel for the inputs of depthwise Convs, in the "
    "per-tensor form TensorRT runs: each channel is divided by its max |x| (on up to 64 calibration samples) in an "
    "explicit Mul before the QuantizeLinear and the depthwise weights of that channel are multiplied back, so the "
    "float output is unchanged and the weights' per-channel rounding too; the divided tensor is calibrated anew "
    "with the calibrate step's method. After BatchNorm folding and a hardswish, a depthwise input's channels can "
    "span 100x, and one scale per tensor leaves the quiet ones a level or two (NNCF uses per-channel activation "
    "scales there, which TensorRT does not run). On a PP-PicoDet layout detector box F1 0.915 -> 0.983, on "
    "EfficientNet-Lite0 top-1 agreement 0.898 -> 0.916 on 1024 crops, every Conv still INT8 (benchmarks/results/"
    "depthwise_scales.md). Metric `depthwise_scaled_inputs`. `auto` (default): on for `target: tensorrt` with "
    "per-channel INT8 weights and `data.calibration` samples (a no-op without depthwise Convs); off for `target: "
    "onnxruntime`, whose u8 activations gained nothing from it on EfficientNet-Lite0 while the Mul, which splits "
    "ORT's fused int8 Conv chain, took batch-1 CPU latency from 2.4 to 4.1 ms (each channel divided by max |x| "
    "spans [-1, 1], which leaves an asymmetric grid's zero point nothing to fit; `true` there warns). `true` "
    "needs `per_channel: true`.",
    "steps.quantize.shift_activations": "Give (almost) one-signed Conv inputs, such as ReLU/ReLU6 outputs, the whole "
    "symmetric INT8 grid: quantize x - c over [-(hi-lo)/2, (hi-lo)/2] (c the middle of the calibrated [lo, hi]) "
    "and add c times the sum of the INT8 weights to the bias; a Conv that pads gets an explicit Pad with -c. "
    "TensorRT runs the added Sub (and Pad) in float; the Conv stays INT8. Applied where the step gets at least "
    "1.25x finer (metric `shifted_inputs`); symmetric activations only. `auto` (default): on wherever activations "
    "are symmetric (`target: tensorrt`). It took every CNN and detector measured up, a layout detector's box F1 "
    "from 0.70 to 0.92 (benchmarks/results/defaults_across_networks.md).",
    "steps.quantize.bias_correction": "Measure each INT8 Conv/Gemm's mean output shift per channel (quantized "
    "weights and input against FP32, on calibration samples) and subtract it from the float bias. Free at "
    "inference; on EfficientNet-Lite0 top-1 agreement 0.81 -> 0.88-0.91. It hurt a transformer (all-MiniLM-L6-v2: "
    "embedding cosine 0.978 -> 0.967). `auto` (default): on, except for a transformer (activations multiplied "
    "together, no Conv). Needs `data.calibration`; off when calibrating `from_cache`.",
    "steps.quantize.bias_correction_samples": "Calibration samples the shift is measured on (whole batches). 64: "
    "every network the defaults were chosen on measured on at most 64, and on EfficientNet-Lite0 (1024 held-out "
    "crops, the default as written) 128, 64 and 32 samples scored 0.923, 0.925 and 0.922 top-1 agreement "
    "(benchmarks/results/bias_correction_samples.md).",
    "steps.quantize.weight_rounding": "`nearest`: every weight to its nearest INT8 value. `gptq`: each INT8 Conv's "
    "weights rounded together so that its output error on calibration samples is smallest (GPTQ: one input "
    "position at a time, the rounding error moved onto the positions not yet rounded, weighted by the inverse "
    "of the receptive fields' second moments). Same scales and graph, so it runs wherever `nearest` does; "
    "metric `gptq_rounded_nodes`. On EfficientNet-Lite0 (percentile + `shift_activations`) top-1 agreement "
    "0.910 -> 0.940; it costs one pass over the samples plus about 30 s there. Conv only: MatMul/Gemm keep "
    "`nearest`. Needs `data.calibration`; off when calibrating `from_cache`.",
    "steps.quantize.weight_rounding_samples": "Calibration samples the second moments come from (whole batches).",
    "steps.quantize.precision": "What the quantized layers compute in. `int8` (default). `fp8`: FP8 E4M3 Q/DQ for "
    "Hopper, Ada and Blackwell GPUs (`target: tensorrt` only): the same placement and calibrated thresholds, scale "
    "= amax/448, zero point 0, weights per output channel from max |w|, opset 19. Thresholds come from the "
    "calibration method as for INT8; `shift_activations` and `weight_rounding: gptq` are INT8-grid tools and are "
    "refused with fp8. Validated exactly on CPU: ONNX Runtime's CPU provider runs FLOAT8E4M3FN Q/DQ.",
    "steps.quantize.float_precision": "What the layers left float compute in. TensorRT 11 builds strongly typed "
    "networks: each layer runs in the type its ONNX tensors carry, so FP32 float regions run in FP32. `auto` "
    "(default): `fp16` for `target: tensorrt`, `fp32` for `target: onnxruntime`. `fp16`: float layers in FP16, "
    "except what FP16 cannot hold, kept FP32 and listed with the reason in `quantize/float_regions.json`: "
    "reductions and normalisation statistics (Softmax, LayerNorm, Reduce*, Exp, Pow), nodes whose calibrated "
    "|x| exceeds 65504/4, initializers beyond 65504 or wholly below 2^-14 (an epsilon). `bf16`: FP32's range, "
    "8 bits of mantissa (opset 22). Graph inputs and outputs stay FP32. `fp16`/`bf16` need `target: tensorrt`.",
    "steps.quantize.keep_fp32_nodes": "Node names whose float computation stays FP32 whatever `float_precision` "
    "says, e.g. the nodes a validate overflow message names.",
    "steps.quantize.cpu_fleet": "`target: onnxruntime`: the CPUs the model must compute the same on, a list of "
    "`avx2`, `avx512bw`, `avx_vnni`, `avx512_vnni`, `amx_int8`, `arm64`, `arm64_dotprod` (`null` or `[all]`: every "
    "CPU, the default). ONNX Runtime's int8 kernels on x86 without VNNI (`avx2`, `avx512bw`) sum pairs of uint8 x "
    "int8 products in 16 bits and saturate; a fleet with such a CPU gets 7-bit weights (`reduce_range`; depthwise "
    "Convs, whose kernel sums in 32 bits, keep 8), which cannot. A fleet whose CPUs all have VNNI or arm64 dot "
    "products keeps 8-bit weights. The scheme is tagged `int8pipe.weight_scheme` on the quantize run and named in "
    "the registry version's description. See the README's CPU portability section.",
    "steps.validate.metric": "`top1`, `top5` (need labels), `agreement` (top-1 agreement with FP32), `cosine`, "
    "or `package.module:function` called as `fn(outputs, labels, reference)`; higher is better.",
    "steps.validate.max_drop": "The gate: FP32 score - INT8 score may be at most this (a number >= 0, not NaN).",
    "steps.validate.batch_size": "Samples per validation batch.",
    "steps.validate.output": "Output(s) scored: a name or a list (default: the first output; all of them for a "
    "custom metric on a multi-output model).",
    "steps.validate.layer_samples": "Samples used for the per-tensor error table.",
    "steps.validate.layer_report": "`auto`: the per-tensor error table (`validation/layer_errors_table.json`, "
    "`layer_sqnr.png`, `sqnr_db_min`, `quantized_nodes`) only when it is read: when the gate fails or recovery "
    "runs (it runs every layer of both models, the longest part of validate on a large network); `always`; "
    "`never` (recovery still ranks its candidates on it).",
    "steps.validate.recover": "Accuracy recovery (null: off): when the gate fails, keep the quantized nodes that "
    "hurt the metric most in float, one more at a time, until it passes; the recovered model is handed on.",
    "steps.validate.recover.max_fp_nodes": "At most this many quantized nodes are kept in float.",
    "steps.validate.recover.time_budget_s": "No new evaluation starts after this many seconds (null: no limit).",
    "steps.validate.recover.ranking_samples": "Each candidate node is ranked on the first this-many validation "
    "samples (kept float alone).",
    "steps.validate.recover.sensitivity_samples": "When there are more quantized nodes than candidates, every one "
    "is kept float alone on the first this-many validation samples and the candidates are those that raise the "
    "output's cosine to FP32 most.",
    "steps.benchmark.providers": "Execution providers timed: `cpu`, `cuda`, `tensorrt`; one that is not really "
    "available is reported as such.",
    "steps.benchmark.batch_sizes": "Batch sizes timed; the first also gives the unsuffixed metric names.",
    "steps.benchmark.iterations": "Timed runs per configuration (at least 1).",
    "steps.benchmark.warmup": "Untimed runs first (0 or more).",
    "steps.benchmark.threads": "ONNX Runtime intra-op threads (default: ORT's choice).",
    "steps.benchmark.shapes": "Input name -> full shape for inputs with symbolic dimensions besides the batch "
    "(default: taken from the validation or calibration data).",
    "steps.engine.batch_size": "The batch both engines are built for (min = opt = max of the optimisation "
    "profile) and timed at.",
    "steps.engine.iterations": "Timed inferences per repeat; each is one enqueue between two CUDA events, inputs "
    "already on the GPU (GPU compute time, as trtexec reports it).",
    "steps.engine.warmup": "Untimed inferences before the first repeat (clocks up, lazy initialisation done).",
    "steps.engine.repeats": "Timing repeats; p50, p99 and throughput are over all of them, and "
    "`repeat_spread` is how far the repeats' medians lie apart, relative to their median.",
    "steps.engine.workspace_mb": "Limit of TensorRT's builder workspace pool in MiB (default: TensorRT's).",
    "steps.engine.shapes": "Input name -> full shape for inputs with symbolic dimensions besides the batch "
    "(default: taken from the validation or calibration data), as `steps.benchmark.shapes`.",
    "steps.promote.registered_model": "Registered model name in the MLflow Model Registry; checked before anything "
    "runs (not empty, no `/`, `:` or `'`, not ending in `.int8pipe-lock`).",
    "steps.promote.alias": "Alias given to the version when the gate passed and the policy chooses it (null: none); "
    "letters, digits, `_` and `-`, not `latest` or `v<number>`.",
    "steps.promote.description": "The version description's first paragraph (default: generated from the "
    "pipeline); the FP32 parent, gate, model, latency, runs and evidence follow it.",
    "steps.promote.policy": "How the alias is chosen while this run's version is the newest: `better`, the best "
    "validated version on its metric and validation data (ties: the newer); `always`, the newest validated version.",
    "steps.promote.require_int8_faster_than_fp16": "Refuse promotion (a failed gate, exit 3, nothing registered) "
    "unless the engine step measured the INT8 engine faster than the FP16 engine at the median. Needs "
    "`steps.engine`. Where that step built nothing (no TensorRT or no GPU), the requirement is off for the run "
    "and promote logs a warning saying why.",
    "sweep": "Optional: run one trial per combination of `grid`, compare them, promote the best.",
    "sweep.grid": "Dotted key (as `--set` takes it) -> list of values, e.g. `{steps.calibrate.method: [minmax, mse]}`.",
    "sweep.trials": "Instead of `grid`: the trials themselves, in the order they run, each a mapping of dotted "
    "keys to values, e.g. `[{steps.calibrate.method: mse}, {steps.quantize.weight_rounding: gptq}]`.",
    "sweep.stop_at_first_pass": "Start no trial once one has passed the gate (that one is selected); trials "
    "already running finish. With `executor: ray` the trials are submitted in order, at most as many at once as "
    "the cluster's free CPUs (and GPUs) held when the sweep started (`sweep.ray.num_cpus` each, at least 1).",
    "sweep.parallel": "Trials run at once, as processes on this machine (`executor: local`).",
    "sweep.time_budget_s": "No trial starts after this many seconds; the finished ones are compared.",
    "sweep.executor": "`local` (this machine) or `ray` (each trial a Ray task on a cluster; needs the `[ray]` "
    "extra and an http(s):// tracking server). See README, Scaling out.",
    "sweep.ray": "Where and how trials run with `executor: ray`.",
    "sweep.ray.address": "The Ray cluster, the address `ray start --head` prints (default: `$RAY_ADDRESS`).",
    "sweep.ray.num_cpus": "CPUs each trial reserves; the cluster's free CPUs decide how many trials run at once.",
    "sweep.ray.num_gpus": "GPUs each trial reserves (a benchmark on `cuda` or `tensorrt` needs one).",
    "sweep.ray.upload": "Ship the YAML's folder with each trial (Ray's runtime_env `working_dir`) instead of "
    "reading it at the same path on every node.",
}


def _nested(tp: Any) -> type | None:
    args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    if args:
        return typing.cast(type, args[0])
    return typing.cast(type, tp) if dataclasses.is_dataclass(tp) else None


def keys(steps: Mapping[str, StepSpec]) -> Iterator[tuple[str, str, str]]:
    """(documented key, type, default) for every YAML key, in file order; ``steps`` as config.parse takes them."""

    def walk(cls: type, prefix: str) -> Iterator[tuple[str, str, str]]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = f"{prefix}.{f.name}" if prefix else f.name
            if f.default is not dataclasses.MISSING:
                default = json.dumps(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                default = json.dumps(value) if not dataclasses.is_dataclass(value) else "{}"
            else:
                default = "required"
            yield key, _describe(hints[f.name]), default
            inner = _nested(hints[f.name])
            if inner is DataSource:
                continue  # documented once, under data.*
            if inner is not None:
                yield from walk(inner, key)
            if key == "steps":
                for name, step in steps.items():
                    yield f"steps.{name}", "a mapping", "absent: skipped"
                    yield from walk(step.Config, f"steps.{name}")

    yield from walk(RawPipeline, "")
    yield from walk(DataSource, "data.*")


def render(steps: Mapping[str, StepSpec]) -> str:
    lines = [
        "# Pipeline YAML reference",
        "",
        "Generated from the configuration classes by `int8pipe reference`; every key, its type",
        "and its default. `data.*` stands for `data.calibration` and `data.validation`, which take the",
        "same keys. Unknown keys, wrong types and missing files are errors naming the key, raised before",
        "anything runs; `--set a.b.c=value` overrides any key (the value is read as YAML).",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, tp, default in keys(steps):
        text = DESCRIPTIONS.get(key, "")
        lines.append(f"| `{key}` | {tp} | `{default}` | {text} |".replace("`required`", "required"))
    return "\n".join(lines) + "\n"
