"""validate: FP32 vs INT8 on the validation set, the accuracy gate, and where the error comes from.

For ``target: tensorrt`` the INT8 model runs with graph optimisations off: ORT then executes each
QuantizeLinear/DequantizeLinear in float, which is the arithmetic TensorRT performs. ORT's fused
int8 kernels on x86 without VNNI saturate and would charge TensorRT for a CPU artefact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import data, evaluation, plots, runtime
from pipeline import model as onnx_model
from pipeline.calibration.collect import expose
from pipeline.context import StepContext
from pipeline.errors import ConfigError, DataError, GateFailed, fail
from pipeline.log import logger, progress
from pipeline.quantization import dequantized_names, node_table
from steps.base import Step

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


LAYER_CHUNK = 2  # samples per call while comparing every tensor
SAMPLES = 8  # validation samples handed on in validation/samples.npz
WORST_NODES = 3  # quantized nodes the gate message names


@dataclass
class ValidateConfig:
    metric: str = "top1"  # top1 | top5 | agreement | cosine | "pkg.mod:fn"
    max_drop: float = 0.01
    batch_size: int = 64
    # model output(s) to score; default: the first for built-in metrics, all of them for a custom metric
    output: str | list[str] | None = None
    layer_samples: int = 64  # samples used for the per-layer error table


class Validate(Step):
    name = "validate"
    Config = ValidateConfig
    needs_steps = ("export", "calibrate", "quantize")
    needs_data = ("validation",)
    parent_metrics = ("fp32_*", "int8_*", "accuracy_drop")

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        super().check(pipeline)
        cfg: ValidateConfig = pipeline.steps["validate"]
        if cfg.metric not in evaluation.BUILTIN_METRICS and ":" not in cfg.metric:
            fail(
                ConfigError,
                f"steps.validate.metric: {cfg.metric!r} is neither one of "
                f"{', '.join(evaluation.BUILTIN_METRICS)} nor 'pkg.mod:function'.",
            )
        if cfg.max_drop < 0:
            fail(ConfigError, f"steps.validate.max_drop: expected >= 0, got {cfg.max_drop}.")
        if isinstance(cfg.output, list):
            if not cfg.output:
                fail(ConfigError, "steps.validate.output: the list is empty; name at least one model output, or null.")
            if cfg.metric in evaluation.BUILTIN_METRICS and len(cfg.output) > 1:
                fail(
                    ConfigError,
                    f"steps.validate.output: metric {cfg.metric} scores one output, got {len(cfg.output)} "
                    f"({', '.join(cfg.output)}). Name one output, or use a custom metric 'pkg.mod:fn' that "
                    "receives them all as {output name: array}.",
                )

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        src = ctx.pipeline.data.validation
        assert src is not None
        target = ctx.pipeline.steps["quantize"].target
        return {"data": data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir)), "target": target}

    def _batches(self, ctx: StepContext, cfg: ValidateConfig, specs: data.Specs) -> Iterator[data.Batch]:
        src = ctx.pipeline.data.validation
        assert src is not None
        return data.batches(src, cfg.batch_size, specs, data.search_dirs(ctx.pipeline.base_dir), "data.validation")

    @staticmethod
    def _scored(cfg: ValidateConfig, names: list[str]) -> tuple[list[str], bool]:
        """The outputs the metric scores, and whether it receives them as {name: array}.

        A dict goes to a custom metric when ``output`` is a list, or null on a multi-output model;
        otherwise the metric receives one array, as before multi-output support.
        """
        custom = cfg.metric not in evaluation.BUILTIN_METRICS
        if cfg.output is None:
            return (list(names), True) if custom and len(names) > 1 else (names[:1], False)
        wanted = [cfg.output] if isinstance(cfg.output, str) else list(dict.fromkeys(cfg.output))
        for name in wanted:
            if name not in names:
                fail(
                    ConfigError,
                    f"steps.validate.output: the model has no output {name!r}; its outputs are {', '.join(names)}.",
                )
        return wanted, custom and isinstance(cfg.output, list)

    def run(self, ctx: StepContext, cfg: ValidateConfig) -> None:
        fp32_path, int8_path = ctx.input("fp32_model"), ctx.input("int8_model")
        exact = ctx.pipeline.steps["quantize"].target == "tensorrt"
        fp32_model = onnx_model.load(fp32_path, check=False)
        specs = onnx_model.input_specs(fp32_model)
        fp32 = runtime.session(fp32_path)
        int8 = runtime.session(int8_path, optimize=not exact)
        names = [o.name for o in fp32.get_outputs()]
        scored, as_dict = self._scored(cfg, names)
        metric = cfg.metric
        fn = None
        if metric not in evaluation.BUILTIN_METRICS:  # import before the long loop: a typo fails fast
            fn = data.import_object(metric, data.search_dirs(ctx.pipeline.base_dir), "steps.validate.metric")
            try:
                evaluation.metric_arity(fn)
            except ValueError as exc:
                fail(ConfigError, f"steps.validate.metric: {metric} {exc}.")
        cmp = evaluation.Comparison()
        kept: dict[str, list[np.ndarray]] = {}
        n_kept = 0
        for batch in progress(self._batches(ctx, cfg, specs), "validation batches"):
            feeds = {k: v for k, v in batch.items() if k != data.LABELS}
            take = SAMPLES - n_kept
            fetch = names if take > 0 else scored  # every output only while samples are being kept
            a = dict(zip(fetch, fp32.run(fetch, feeds)))
            b = dict(zip(fetch, int8.run(fetch, feeds)))
            if take > 0:
                n_kept += _keep(kept, feeds, a, b, take)
            cmp.add({k: a[k] for k in scored}, {k: b[k] for k in scored}, batch.get(data.LABELS))
        ref_all, out_all, labels = cmp.arrays()
        primary = scored[0]
        ref, out = ref_all[primary], out_all[primary]
        classes = evaluation.class_scores(ref) is not None
        if fn is None:
            if metric in ("top1", "top5") and labels is None:
                fail(
                    DataError,
                    f"steps.validate.metric {metric} needs labels: add a 'labels' array to data.validation, "
                    "or use metric: agreement.",
                )
            if metric in evaluation.CLASS_SCORE_METRICS and not classes:
                fail(
                    DataError,
                    f"steps.validate.metric {metric} needs class scores ([N, C] with C >= 2), but model output "
                    f"{primary!r} has shape {list(ref.shape)}. Use metric: cosine (FP32-vs-INT8 output "
                    "similarity), or a task metric 'pkg.mod:fn' called as fn(outputs, labels, reference) "
                    "(an example for detectors: examples/metrics/detection.py).",
                )
            fp32_score = evaluation.score(metric, ref, labels, ref)
            int8_score = evaluation.score(metric, out, labels, ref)
        else:
            fp32_score = _custom(fn, metric, ref_all if as_dict else ref, labels, ref_all if as_dict else ref)
            int8_score = _custom(fn, metric, out_all if as_dict else out, labels, ref_all if as_dict else ref)
            metric = metric.rpartition(":")[2]
        drop = fp32_score - int8_score
        cosines = evaluation.cosine_rows(ref, out)
        layers, nodes = self._layer_errors(ctx, cfg, fp32_model, fp32_path, int8_path, exact, specs)
        sqnr_min = min((r["sqnr_db"] for r in layers), default=math.inf)
        metrics = {
            f"fp32_{metric}": fp32_score,
            f"int8_{metric}": int8_score,
            "accuracy_drop": drop,
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            "sqnr_db_min": sqnr_min if math.isfinite(sqnr_min) else 999.0,
        }
        if classes:  # an argmax over anything else (a detector's boxes) means nothing
            metrics["top1_agreement"] = evaluation.score("agreement", out, None, ref)
        passed = evaluation.gate_passed(drop, cfg.max_drop)
        samples = {k: _stack(v) for k, v in kept.items()}
        np.savez(ctx.output("validation_samples", "validation/samples.npz"), **samples)  # type: ignore[arg-type]
        report = {
            "metric": metric,
            "max_drop": cfg.max_drop,
            "passed": passed,
            "samples": len(ref),
            "outputs": scored,
            "metric_receives": "dict" if as_dict else "array",
            "int8_execution": "exact Q/DQ in float (graph optimisations off)" if exact else "onnxruntime optimised",
            "metrics": metrics,
            "output_cosine": {
                k: {"mean": float(c.mean()), "min": float(c.min())}
                for k, c in ((k, evaluation.cosine_rows(ref_all[k], out_all[k])) for k in scored)
            },
            "quantized_nodes": nodes,
            "layers": layers,
        }
        ctx.output("validation_report", "validation/report.json").write_text(json.dumps(report, indent=1))
        ctx.log_metrics(metrics)
        logger.info(
            "validate: fp32 %s %.4f, int8 %.4f, drop %.4f (max %.4f)",
            metric,
            fp32_score,
            int8_score,
            drop,
            cfg.max_drop,
        )
        if not passed:
            fail(GateFailed, gate_message(metric, fp32_score, int8_score, drop, cfg.max_drop, nodes))

    def _layer_errors(
        self,
        ctx: StepContext,
        cfg: ValidateConfig,
        fp32_model: Any,
        fp32_path: Any,
        int8_path: Any,
        exact: bool,
        specs: data.Specs,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per tensor FP32-vs-INT8 error (the layer table) and the quantized nodes, worst first."""
        int8_model = onnx_model.load(int8_path, check=False)
        graph_inputs = {vi.name for vi in onnx_model.graph_inputs(int8_model)}
        int8_producer = {o: n for n in int8_model.graph.node for o in n.output}
        seen_as = dequantized_names(int8_model)
        tensors = [t for t in onnx_model.activation_tensors(fp32_model) if t in int8_producer or t in seen_as]
        producer = onnx_model.producers(fp32_model)
        int8_names = [seen_as.get(t, t) for t in tensors]
        # the float value a QuantizeLinear reads (graph inputs are exact, nothing to measure)
        before_q: dict[str, str] = {}
        for t, n in zip(tensors, int8_names):
            q_input = _quantizer_input(n, int8_producer)
            if q_input is not None and q_input not in graph_inputs:
                before_q[t] = q_input
        fetch = list(dict.fromkeys([*int8_names, *before_q.values()]))
        a = runtime.session(expose(fp32_model, tensors))
        b = runtime.session(expose(int8_model, fetch), optimize=not exact)
        acc = {t: evaluation.ErrorAccumulator() for t in tensors}
        acc_before = {t: evaluation.ErrorAccumulator() for t in before_q}
        seen = 0
        # tiny chunks: every tensor of both models is alive at once here
        for feeds in data.rechunk(self._batches(ctx, cfg, specs), LAYER_CHUNK):
            if seen >= cfg.layer_samples:
                break
            feeds = {k: v[: cfg.layer_samples - seen] for k, v in feeds.items()}
            seen += len(next(iter(feeds.values())))
            got = dict(zip(fetch, b.run(fetch, feeds)))
            for t, n, x in zip(tensors, int8_names, a.run(tensors, feeds)):
                acc[t].update(x, got[n])
                if t in before_q:
                    acc_before[t].update(x, got[before_q[t]])
        readers: dict[str, list[str]] = {}
        for node in int8_model.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                for i in node.input:
                    readers.setdefault(i, []).append(node.name)
        rows: list[dict[str, Any]] = [
            {
                "tensor": t,
                # the quantized nodes that read this tensor's dequantized value
                "node": ", ".join(readers.get(n, [])) if _is_dequantized(n, int8_producer) else "",
                "producer": producer.get(t, ""),
                "int8_value": "dequantized" if t in seen_as else "float",
                "sqnr_db": acc[t].sqnr_db,
                "cosine": acc[t].cosine,
                "max_abs_err": acc[t].max_abs_err,
            }
            for t, n in zip(tensors, int8_names)
        ]
        nodes = _rank_quantized_nodes(
            fp32_model,
            int8_model,
            {t: acc[t].sqnr_db for t in tensors},
            {t: acc_before[t].sqnr_db for t in before_q},
            dict(zip(tensors, int8_names)),
            before_q,
        )
        finite = [dict(r, sqnr_db=_cap(r["sqnr_db"])) for r in rows]
        if finite:
            ctx.log_table(finite, "validation/layer_errors_table.json")
            plots.bars(
                [r["tensor"] for r in finite],
                [r["sqnr_db"] for r in finite],
                ctx.workdir / "validation" / "layer_sqnr.png",
                "FP32 vs INT8 per tensor (higher is better)",
                "SQNR (dB)",
            )
        return finite, nodes


def gate_message(
    metric: str, fp32_score: float, int8_score: float, drop: float, max_drop: float, nodes: list[dict[str, Any]]
) -> str:
    """The failed gate's paragraph: the numbers, and the quantized nodes worth keeping in FP32."""
    head = (
        f"accuracy gate failed: {metric} dropped by {drop:.4f} (FP32 {fp32_score:.4f} -> INT8 {int8_score:.4f}), "
        f"more than steps.validate.max_drop={max_drop}. Try another steps.calibrate.method"
    )
    worst = [r["node"] for r in nodes[:WORST_NODES]]
    if not worst:
        return head + "."
    return (
        f"{head}, or keep the {len(worst)} quantized node(s) that add the most error in FP32: "
        f"steps.quantize.exclude.nodes: {json.dumps(worst)} (every quantized node is ranked under "
        "quantized_nodes in validation/report.json; per-tensor errors and the nodes reading them are in "
        "validation/layer_errors_table.json)."
    )


def _cap(sqnr_db: float) -> float:
    return min(sqnr_db, 999.0)


def _is_dequantized(name: str, producer: dict[str, Any]) -> bool:
    node = producer.get(name)
    return node is not None and node.op_type == "DequantizeLinear"


def _quantizer_input(name: str, producer: dict[str, Any]) -> str | None:
    """For the output of a DequantizeLinear fed by a QuantizeLinear: the float tensor quantized."""
    if not _is_dequantized(name, producer):
        return None
    q = producer.get(producer[name].input[0])
    return str(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None


def _rank_quantized_nodes(
    fp32_model: Any,
    int8_model: Any,
    sqnr: dict[str, float],
    sqnr_before_q: dict[str, float],
    int8_name: dict[str, str],
    before_q: dict[str, str],
) -> list[dict[str, Any]]:
    """The INT8 nodes, the ones whose quantization adds the most error first.

    A node's inputs arrive with the error of everything upstream (the float tensor before its
    QuantizeLinear, measured against FP32); its output (as its consumers see it) carries that plus what
    quantizing this node's activations and weights added. In relative noise power (noise / signal,
    10^(-SQNR/10)) the node adds output noise minus the noisiest input's; ``added_sqnr_db`` is the SQNR
    that added noise alone would give (lower is worse). Excluding a node removes that share.
    """
    fp32_nodes = {n.name: n for n in fp32_model.graph.node if n.name}
    int8_nodes = {n.name: n for n in int8_model.graph.node if n.name}
    row_of = {n: t for t, n in int8_name.items()}  # INT8-model tensor -> layer-table tensor
    row_before = {n: t for t, n in before_q.items()}  # float tensor a QuantizeLinear reads -> table tensor
    ranked = []
    for entry in node_table(fp32_model, int8_model):
        if entry["precision"] != "int8" or entry["node"] not in int8_nodes:
            continue
        node, original = int8_nodes[entry["node"]], fp32_nodes[entry["node"]]
        noise_in, dq_sqnr = 0.0, math.inf
        for i in node.input:
            t = row_of.get(i)
            if t is None:  # a weight or a float input
                continue
            dq_sqnr = min(dq_sqnr, sqnr[t])
            dq = evaluation.relative_noise(sqnr[t])
            # min: where ORT deleted a Relu/Clip the quantizer's input is the unclipped tensor
            before = evaluation.relative_noise(sqnr_before_q[t]) if t in sqnr_before_q else 0.0
            noise_in = max(noise_in, min(dq, before))
        out = node.output[0] if node.output else ""
        if out in row_before:  # output quantized (target onnxruntime): what consumers see is its DQ
            out_sqnr = sqnr[row_before[out]]
        elif out in row_of:
            out_sqnr = sqnr[row_of[out]]
        elif original.output and original.output[0] in sqnr:
            out_sqnr = sqnr[original.output[0]]
        else:  # no float output measured: the error of its dequantized inputs
            out_sqnr = dq_sqnr
        added = max(evaluation.relative_noise(out_sqnr) - noise_in, 0.0)
        ranked.append(
            {
                "node": entry["node"],
                "op_type": entry["op_type"],
                "input_sqnr_db": _cap(-10.0 * math.log10(noise_in)) if noise_in > 0 else 999.0,
                "output_sqnr_db": _cap(out_sqnr),
                "added_sqnr_db": _cap(-10.0 * math.log10(added)) if added > 0 else 999.0,
            }
        )
    ranked.sort(key=lambda r: r["added_sqnr_db"])
    return ranked


def _custom(fn: Callable[..., Any], spec: str, outputs: Any, labels: Any, reference: Any) -> float:
    value = evaluation.call_metric(fn, outputs, labels, reference)
    try:
        return float(value)
    except (TypeError, ValueError):
        fail(ConfigError, f"steps.validate.metric: {spec} returned {value!r}; a metric must return a number.")


def _keep(
    kept: dict[str, list[np.ndarray]],
    feeds: dict[str, np.ndarray],
    fp32: dict[str, np.ndarray],
    int8: dict[str, np.ndarray],
    take: int,
) -> int:
    """Append up to ``take`` samples' inputs and FP32/INT8 outputs to ``kept``; returns how many."""
    for prefix, arrays in (("input", feeds), ("fp32", fp32), ("int8", int8)):
        for name, value in arrays.items():
            kept.setdefault(f"{prefix}.{name}", []).append(np.array(value[:take] if value.ndim else value))  # a copy
    return min(take, len(next(iter(feeds.values()))))


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts[0].ndim else parts[0]


STEP = Validate
