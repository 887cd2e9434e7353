"""validate: FP32 vs INT8 on the validation set, the accuracy gate, and accuracy recovery.

The work lives beside the numerics, free of tracking: :mod:`pipeline.analysis.scoring` (the metric, the FP32
reference, INT8 scores), :mod:`pipeline.analysis.layers` (per-tensor error, the quantized nodes ranked) and
:mod:`pipeline.analysis.recovery` (keeping the nodes that hurt the metric in float). This step reads the
config, runs them, logs what they found and decides the gate.

For ``target: tensorrt`` the INT8 model runs with graph optimisations off: ORT then executes each
QuantizeLinear/DequantizeLinear in float, which is the arithmetic TensorRT performs. ORT's fused
int8 kernels on x86 without VNNI saturate and would charge TensorRT for a CPU artefact.

For ``target: onnxruntime`` the model is scored both ways, exact and through this CPU's fused
kernels (:mod:`pipeline.analysis.kernel_fidelity`), and the gate reads the numerics it will be served with
(:func:`pipeline.execution.cpu_kernels.deployed_numerics`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import onnx

from pipeline.analysis import evaluation, kernel_fidelity, layers, plots, recovery, scoring, suggestions
from pipeline.calibration.collect import activation_sizes
from pipeline.calibration.ranges import Ranges
from pipeline.errors import ConfigError, GateFailed, ModelError, fail
from pipeline.execution import cpu_kernels, runtime
from pipeline.graph import model as onnx_model
from pipeline.graph.layout import Layout
from pipeline.log import logger
from pipeline.sources import data
from pipeline.tag_names import INT8_NUMERICS_TAG
from pipeline.transforms import float_precision, recipe
from pipeline.transforms.quantization import node_table
from steps.base import Step
from steps.context import StepContext

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig


WORST_NODES = 3  # quantized nodes the gate message names
FIDELITY_SAMPLES = 16  # validation samples the layer-by-layer kernel check runs on
UNSURE_WARN = 0.25  # share of unsure FP32 samples above which an agreement gate gets a warning
# Below this many validation samples a gate's verdict is warned about: the drop's standard error is
# itself too uncertain to read (a t-interval on fewer than ~30 samples is much wider than +-2 SE),
# and one sample moves an accuracy by 1/n, more than any usual max_drop.
MIN_GATE_SAMPLES = 30
# samples whose every FP16 tensor is read for inf/NaN: the first ones, and as many from the first sample
# whose outputs are not finite where FP32's are
OVERFLOW_PROBE_SAMPLES = 4


class Sizing(NamedTuple):
    score_chunk: int  # samples per ONNX Runtime call while scoring
    layer_chunk: int  # samples per call while comparing layers
    groups: list[list[str]] | None  # tensors compared a group per pass (None: all at once)


@dataclass
class RecoverConfig:
    max_fp_nodes: int = 8  # at most this many quantized nodes are kept in float
    time_budget_s: float | None = None  # no new evaluation starts after this long (null: no limit)
    ranking_samples: int = 64  # the first validation samples each candidate is ranked on
    sensitivity_samples: int = 8  # the first validation samples every quantized node is preselected on


@dataclass
class ValidateConfig:
    metric: str = "top1"  # top1 | top5 | agreement | cosine | "pkg.mod:fn"
    max_drop: float = 0.01
    batch_size: int = 64
    # model output(s) to score; default: the first for built-in metrics, all of them for a custom metric
    output: str | list[str] | None = None
    layer_samples: int = 64  # samples used for the per-layer error table
    # auto: the per-layer table only when it is read (a failed gate, recovery); always; never (recovery
    # still ranks its candidates on it)
    layer_report: Literal["auto", "always", "never"] = "auto"
    recover: RecoverConfig | None = None  # when the gate fails, keep the nodes that hurt most in float


class Validate(Step):
    name = "validate"
    Config = ValidateConfig
    needs_steps = ("export", "quantize")
    needs_data = ("validation",)
    # int8_* takes int8_nodes too, and fp_nodes goes with it: after a recovery both describe the recovered model
    parent_metrics = (
        "fp32_*",
        "int8_*",
        "gate_fp32",
        "gate_int8",
        "accuracy_drop",
        "accuracy_drop_se",
        "recovered_fp_nodes",
        "fp_nodes",
        "validation_samples",
    )
    dataset, dataset_samples = "validation", "validation_samples"
    next_artifact = "validation/report.json"

    @classmethod
    def summary_line(cls, cfg: ValidateConfig) -> str:
        return f"Gate: {cfg.metric} may drop by at most {cfg.max_drop}."

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
        if not cfg.max_drop >= 0:  # NaN too: every comparison with it is False, so no gate could fail
            fail(ConfigError, f"steps.validate.max_drop: expected a number >= 0, got {cfg.max_drop}.")
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
        rc = cfg.recover
        if rc is not None and pipeline.facts.mode == "dynamic":
            fail(
                ConfigError,
                "steps.validate.recover works on Q/DQ models (quantize.mode: static); with mode: dynamic keep "
                "nodes float with steps.quantize.exclude.nodes instead.",
            )
        if rc is not None:
            if rc.max_fp_nodes < 0:
                fail(
                    ConfigError,
                    f"steps.validate.recover.max_fp_nodes: expected >= 0 (the most quantized nodes recovery "
                    f"may keep in float), got {rc.max_fp_nodes}.",
                )
            for key in ("ranking_samples", "sensitivity_samples"):
                if getattr(rc, key) < 1:
                    fail(ConfigError, f"steps.validate.recover.{key}: expected >= 1, got {getattr(rc, key)}.")
            if rc.time_budget_s is not None and rc.time_budget_s < 0:
                fail(
                    ConfigError,
                    f"steps.validate.recover.time_budget_s: expected seconds >= 0 or null (no limit), "
                    f"got {rc.time_budget_s}.",
                )

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        src = ctx.pipeline.data.validation
        assert src is not None
        key = {"data": data.source_digest(src, data.search_dirs(ctx.pipeline.base_dir)), "target": ctx.facts.target}
        if ctx.facts.cpu_kernels:  # ORT's int8 kernels compute differently per ISA: another CPU validates anew
            cap = cpu_kernels.this_machine()
            key["cpu"] = f"{cap['isa']} onnxruntime {cap['onnxruntime']}"
        return key

    def _batches(self, ctx: StepContext, cfg: ValidateConfig, specs: data.Specs) -> Iterator[data.Batch]:
        src = ctx.pipeline.data.validation
        assert src is not None
        return data.batches(src, cfg.batch_size, specs, data.search_dirs(ctx.pipeline.base_dir), "data.validation")

    def _sizing(
        self, ctx: StepContext, cfg: ValidateConfig, specs: data.Specs, fp32: onnx.ModelProto, layout: Layout
    ) -> Sizing:
        """How the ONNX Runtime calls are sized so the activations alive stay within
        ``steps.calibrate.memory_mb`` (a 640x640 detector's are hundreds of MB per sample): one sample's
        activations are measured on the first batch."""
        memory_mb = ctx.facts.memory_mb
        it = self._batches(ctx, cfg, specs)
        try:
            first = next(it, None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if first is None:
            return Sizing(scoring.RUN_CHUNK, layers.LAYER_CHUNK, None)
        sizes = activation_sizes(fp32, first, layout)
        per_sample = sum(sizes.values())
        budget = memory_mb << 20
        score = max(1, min(scoring.RUN_CHUNK, budget // max(1, scoring.SCORE_COPIES * per_sample)))
        layer = max(1, min(layers.LAYER_CHUNK, budget // max(1, layers.LAYER_COPIES * per_sample)))
        groups = None
        if layers.LAYER_COPIES * per_sample > budget:  # not even one sample's tensors at once
            groups = layers.tensor_groups(sizes, budget // layers.LAYER_COPIES)
        logger.info(
            "validate: %.0f MB of activations per sample: %d sample(s) per call while scoring, %d while "
            "comparing layers%s, to stay near %d MB (steps.calibrate.memory_mb)",
            per_sample / 1e6,
            score,
            layer,
            f" in {len(groups)} groups of tensors" if groups else "",
            memory_mb,
        )
        return Sizing(score, layer, groups)

    @staticmethod
    def _scored(cfg: ValidateConfig, names: list[str]) -> tuple[list[str], bool]:
        """The outputs the metric scores, and whether it receives them as {name: array}."""
        return scoring.scored_outputs(cfg.metric, cfg.output, names, "steps.validate")

    def run(self, ctx: StepContext, cfg: ValidateConfig) -> None:
        fp32_path, int8_path = ctx.input("fp32_model"), ctx.input("int8_model")
        facts = ctx.facts
        cap = cpu_kernels.this_machine()
        ctx.set_tags(cpu_kernels.tags(cap))
        # TensorRT computes the Q/DQ arithmetic exactly; ORT's CPU kernels are checked against it
        check_kernels = facts.cpu_kernels
        numerics = cpu_kernels.deployed_numerics(facts.weight_scheme, cap) if check_kernels else "exact"
        exact = numerics == "exact"
        ctx.set_tags({INT8_NUMERICS_TAG: numerics})
        fp32_model = onnx_model.load(fp32_path, check=False)
        specs = onnx_model.input_specs(fp32_model)
        fp32 = runtime.session(fp32_path)
        int8_model = onnx_model.load(int8_path, check=False)
        # a dynamic model's MatMulInteger is a kernel even unoptimised: its exact twin computes it in float64
        twin = kernel_fidelity.exact_twin(int8_model) if kernel_fidelity.is_dynamic(int8_model) else None
        exact_session = runtime.session(twin.SerializeToString() if twin else int8_path, optimize=False)
        kernel_session = runtime.session(int8_path, optimize=True) if check_kernels else None
        int8 = exact_session if exact or kernel_session is None else kernel_session
        if exact and check_kernels:
            logger.warning(
                "validate: this CPU (%s) saturates ORT's int8 kernels on %s weights, which steps.quantize.cpu_fleet "
                "(%s) chose for CPUs that do not: the gate reads the exact arithmetic those CPUs compute, not "
                "this machine's kernels.",
                cap["isa"],
                facts.weight_scheme.name,
                facts.fleet_label,
            )
        names = [o.name for o in fp32.get_outputs()]
        # resolved before the long loop: a typo in a custom metric fails fast
        metric = scoring.resolve_metric(cfg.metric, cfg.output, names, data.search_dirs(ctx.pipeline.base_dir))
        layout = Layout.of(ctx.pipeline.data.validation)
        sizing = self._sizing(ctx, cfg, specs, fp32_model, layout)
        scorer = scoring.Scorer(
            fp32,
            metric,
            lambda: self._batches(ctx, cfg, specs),
            int8_optimize=not exact,
            layout=layout,
            chunk=sizing.score_chunk,
        )
        scores = scorer.first(int8)
        self._refuse_overflow(ctx, scorer, scores, int8_model)
        # before recovery spends time on a gate that may be measuring FP32's own indecision
        unsure = evaluation.unsure_share(scores.reference[metric.outputs[0]])
        if unsure is not None and unsure > UNSURE_WARN and cfg.metric == "agreement":
            logger.warning(
                "validate: FP32 itself is unsure on %.0f%% of the validation samples (its top two classes "
                "less than %.1f apart in probability): any perturbation flips top-1 there, so agreement "
                "measures little on them. Validate on data the model is meant for, with labels (metric: "
                "top1), or gate on metric: cosine.",
                100 * unsure,
                evaluation.UNSURE_MARGIN,
            )
        fidelity = None
        if kernel_session is not None:
            other = "the int8 kernels" if exact else "the exact arithmetic"  # the one the gate does not read
            other_scores = scorer.score(kernel_session if exact else exact_session, label=f"validate: scoring {other}")
            sessions = (kernel_session, exact_session)
            fidelity = self._fidelity(
                ctx, cfg, scorer, int8_model, twin, sessions, (scores, other_scores), numerics, sizing.layer_chunk
            )
        failing = not evaluation.gate_passed(scores.drop, cfg.max_drop)
        recovering = cfg.recover is not None and failing
        errors = None
        if cfg.layer_report == "always" or (cfg.layer_report == "auto" and failing) or recovering:
            errors = _layer_errors(cfg, scorer, fp32_model, twin if exact and twin else int8_model, exact, sizing)
        else:
            logger.info(
                "validate: no per-layer table (%s; steps.validate.layer_report: always computes it)",
                "the gate passed" if cfg.layer_report == "auto" else "layer_report: never",
            )
        samples = scorer.kept
        result = None
        if recovering:
            assert errors is not None
            # the quantize step's float model when it changed it (equalization, smoothing): a node reverts
            # to its own float weights, which the FP32 model no longer holds
            changed = ctx.inputs.get("float_model")
            float_model = onnx_model.load(changed, check=False) if changed else fp32_model
            result = self._recover(ctx, cfg, fp32_model, float_model, int8_model, scorer, scores, errors)
            if result.model is not None:  # from here on, everything describes the recovered model
                scores = result.scores
                errors = _layer_errors(cfg, scorer, fp32_model, result.model, exact, sizing)
                samples = scorer.kept_outputs(result.model)
        if errors is None:  # what the report and the gate message read when there is no table
            errors = layers.LayerErrors([], [], [])
        name, primary = metric.name, metric.outputs[0]
        ref, out = scores.reference[primary], scores.outputs[primary]
        cosines = scores.cosines()
        drop_se = scores.drop_se  # built-in metrics only: a custom one returns a single number
        if fidelity is not None:
            metrics_fidelity = {
                f"int8_{name}_exact": fidelity["exact"],
                f"int8_{name}_kernels": fidelity["kernels"],
                "kernel_drop": fidelity["exact"] - fidelity["kernels"],
                "kernel_departing_layers": sum(r["departs"] for r in fidelity["layers"]),
            }
        metrics = {
            **(metrics_fidelity if fidelity is not None else {}),
            f"fp32_{name}": scores.fp32,
            f"int8_{name}": scores.int8,
            # the same scores under names every pipeline shares, whatever it gates on: runs compare on one row
            "gate_fp32": scores.fp32,
            "gate_int8": scores.int8,
            "accuracy_drop": scores.drop,
            **({"accuracy_drop_se": drop_se} if drop_se is not None else {}),
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            **({"sqnr_db_min": errors.sqnr_db_min} if errors.rows else {}),
            "recovered_fp_nodes": len(result.reverted) if result is not None else 0,
            "validation_samples": scores.samples,  # what the gate's verdict rests on
        }
        if evaluation.class_scores(ref) is not None:  # an argmax over anything else (a detector's boxes) means nothing
            metrics["top1_agreement"] = evaluation.score("agreement", out, None, ref)
        passed = evaluation.gate_passed(scores.drop, cfg.max_drop)
        advice = []
        if not passed and errors.quantized_nodes:
            ranges = Ranges.read(ctx.inputs["ranges"]) if "ranges" in ctx.inputs else None
            final = result.model if result is not None and result.model is not None else int8_model
            advice = suggestions.suggest(fp32_model, final, errors.quantized_nodes, ranges, facts.target)
        np.savez(ctx.output("validation_samples", "validation/samples.npz"), **samples)  # type: ignore[arg-type]
        if errors.rows:
            ctx.log_table(errors.rows, "validation/layer_errors_table.json")
            plots.bars(
                [r["tensor"] for r in errors.rows],
                [r["sqnr_db"] for r in errors.rows],
                ctx.workdir / "validation" / "layer_sqnr.png",
                "FP32 vs INT8 per tensor (higher is better)",
                "SQNR (dB)",
            )
        report = {
            "metric": name,
            "max_drop": cfg.max_drop,
            "passed": passed,
            "samples": scores.samples,
            "accuracy_drop_se": drop_se,  # null for a custom metric
            "outputs": metric.outputs,
            "metric_receives": "dict" if metric.as_dict else "array",
            "fp32_unsure_share": unsure,  # class scores only: see evaluation.unsure_share
            "int8_execution": "exact Q/DQ in float (graph optimisations off)" if exact else "onnxruntime optimised",
            "cpu": cap,  # the int8 capability of the machine that validated (cpu_kernels.this_machine)
            # target onnxruntime: this CPU's int8 kernels against the exact arithmetic (the model before recovery)
            "kernel_fidelity": fidelity,
            "metrics": metrics,
            "output_cosine": {
                k: {"mean": float(c.mean()), "min": float(c.min())}
                for k, c in ((k, scores.cosines(k)) for k in metric.outputs)
            },
            "quantized_nodes": errors.quantized_nodes,
            "layers": errors.rows,
            "layer_report": "computed" if errors.rows else "skipped",
            # a failed gate: the settings most likely to pass, by the share of the measured error they address
            "suggestions": [{"setting": a.setting, "share": a.share, "why": a.why} for a in advice],
        }
        if result is not None:
            report["recovery"] = {
                "reverted": result.reverted,
                "stopped": result.stopped,
                "model": "model/model_int8.onnx" if result.model is not None else None,  # None: nothing reverted
            }
        ctx.output("validation_report", "validation/report.json").write_text(json.dumps(report, indent=1))
        ctx.log_metrics(metrics)
        logger.info(
            "validate: fp32 %s %.4f, int8 %.4f, drop %.4f%s (max %.4f)",
            name,
            scores.fp32,
            scores.int8,
            scores.drop,
            f" +- {drop_se:.4f} (standard error, {scores.samples} samples)" if drop_se is not None else "",
            cfg.max_drop,
        )
        narrow = near_gate(scores.drop, cfg.max_drop, drop_se, scores.samples)
        if passed and narrow:
            logger.warning("validate: the gate passed narrowly.%s", narrow)
        few = few_samples(scores.samples, passed)
        if few:
            logger.warning("validate: %s", few)
        if not passed:
            message = gate_message(
                name,
                scores.fp32,
                scores.int8,
                scores.drop,
                cfg.max_drop,
                errors.quantized_nodes,
                result,
                cfg.recover,
                drop_se,
                scores.samples,
            )
            # only when the gate read the kernels: then they, not the model, may have failed it
            if fidelity is not None and fidelity["departing"] and numerics == "kernels":
                message = kernels_note(name, fidelity, cap) + " " + message
            if advice:
                ranked = "; ".join(f"({i}) {a.line()}" for i, a in enumerate(advice, 1))
                message += f" By what this run measured, most likely to pass: {ranked}."
            fail(GateFailed, message)

    def _fidelity(
        self,
        ctx: StepContext,
        cfg: ValidateConfig,
        scorer: scoring.Scorer,
        int8_model: onnx.ModelProto,
        twin: onnx.ModelProto | None,
        sessions: tuple[Any, Any],
        scored: tuple[scoring.Scores, scoring.Scores],
        numerics: str,
        chunk: int,
    ) -> dict[str, Any]:
        """This CPU's int8 kernels against the model's exact arithmetic: both scores, how far the model's
        outputs differ on the first validation samples and, when beyond rounding, the layers where the
        kernels' results depart."""
        exact_scores, kernel_scores = scored if numerics == "exact" else scored[::-1]
        samples = min(cfg.layer_samples, FIDELITY_SAMPLES)
        # in chunks the memory budget allows: every layer input of a chunk is alive at once
        feeds = list(scorer.layout.chunks(scorer.inputs(samples), chunk))
        output_error, rows = kernel_fidelity.check(int8_model, twin, sessions, feeds)
        departing = kernel_fidelity.first_departures(rows)
        if rows:
            ctx.log_table(rows, "validation/kernel_fidelity_table.json")
        name = scorer.metric.name
        if departing:
            logger.warning(
                "validate: this CPU's int8 kernels depart from the model's exact arithmetic, first at %s: %s "
                "%.4f exact, %.4f through the kernels (table: validation/kernel_fidelity_table.json)",
                ", ".join(departing),
                name,
                exact_scores.int8,
                kernel_scores.int8,
            )
        else:
            logger.info(
                "validate: this CPU's int8 kernels compute the model's exact arithmetic up to rounding (outputs "
                "%.2g apart, relative RMS, on %d samples; %s %.4f exact, %.4f through the kernels)",
                output_error,
                samples,
                name,
                exact_scores.int8,
                kernel_scores.int8,
            )
        return {
            "gated_on": numerics,
            "exact": exact_scores.int8,
            "kernels": kernel_scores.int8,
            "output_relative_error": output_error,
            "departing": departing,
            "samples": samples,
            "layers": rows,
        }

    def _refuse_overflow(
        self, ctx: StepContext, scorer: scoring.Scorer, scores: scoring.Scores, int8_model: onnx.ModelProto
    ) -> None:
        """A model whose FP16 regions overflow on the validation data fails here, the tensors and the
        nodes to keep FP32 named, instead of scoring NaN.

        Every FP16 tensor is read on the first samples, and on the samples from the first one whose
        outputs are not finite where FP32's are (an overflow that reaches the outputs, on any sample).
        An overflow past the first samples that a quantizer saturates into a finite number is not seen:
        reading every FP16 tensor of every sample costs more than the scoring pass itself
        (EfficientNet-Lite0, 256 samples: 99 s against 61 s)."""
        record = _regions_record(ctx)
        if record is None:
            return
        layout, n = scorer.layout, OVERFLOW_PROBE_SAMPLES
        windows = [(0, next(iter(scorer.inputs(n)), None))]
        late = [np.flatnonzero(_finite(scores.reference[k]) & ~_finite(v)) for k, v in scores.outputs.items()]
        first = min((int(i[0]) for i in late if i.size), default=None)
        if first is not None and first >= n:
            windows.append((first, _window(scorer, first, n)))
        probes = [(start, feeds) for start, feeds in windows if feeds is not None]
        found = float_precision.first_overflow(int8_model, [f for _, f in probes], layout.count)
        if found is not None:
            tensors, nodes = found.tensors, _overflowing_nodes(int8_model, found.tensors)
            # first_sample counts over the probes: 0 is the first one's, anything else the second's
            start, count = probes[0][0] if found.first_sample == 0 else probes[-1][0], found.samples
        elif first is not None:  # in the outputs only: the probed FP16 tensors stayed finite
            tensors, nodes, start, count = [], [], first, 1
        else:
            return
        keep = f"steps.quantize.keep_fp32_nodes: [{', '.join(nodes)}]" if nodes else "steps.quantize.keep_fp32_nodes"
        where = f"first in {', '.join(tensors)}, " if tensors else "in the outputs, "
        fail(
            ModelError,
            f"validate: the model's {str(record.get('precision', 'fp16')).upper()} float regions overflow on the "
            f"validation data (inf or NaN {where}on validation samples {start}-{start + count - 1}): calibration "
            f"never saw values this large. Keep the nodes computing them FP32 with {keep}, calibrate on data that "
            "reaches as far as the validation data, or set steps.quantize.float_precision: bf16 (FP32's range) or "
            "fp32.",
        )

    def _recover(
        self,
        ctx: StepContext,
        cfg: ValidateConfig,
        fp32_model: onnx.ModelProto,
        float_model: onnx.ModelProto,
        int8_model: onnx.ModelProto,
        scorer: scoring.Scorer,
        scores: scoring.Scores,
        errors: layers.LayerErrors,
    ) -> recovery.Recovery:
        """Keep the quantized nodes that hurt the metric most in float (see :mod:`pipeline.analysis.recovery`);
        writes ``validation/recovery.json`` and, when a node was reverted, hands the model on."""
        rc = cfg.recover
        assert rc is not None
        name = scorer.metric.name
        logger.info(
            "validate: gate failed (%s drop %.4f > %.4f); recovering: at most %d node(s) in float",
            name,
            scores.drop,
            cfg.max_drop,
            rc.max_fp_nodes,
        )

        def logged(step: int, it: recovery.Iteration) -> None:
            ctx.log_metrics({f"recovery_{name}": it.scores.int8}, step=step)

        # with FP16/BF16 regions, nodes revert on the Q/DQ model before lowering and every candidate is
        # lowered as the quantize step lowered its model
        record = _regions_record(ctx)
        base = int8_model
        if record is not None:
            base = onnx_model.load(ctx.input("fp32_regions_model"), check=False)
            scorer.prepare = lambda m: recipe.lowered_like(m, record)
        try:
            result = self._recover_from(base, float_model, scorer, scores, errors, cfg, logged)
        finally:
            scorer.prepare = None
        (ctx.workdir / "validation").mkdir(parents=True, exist_ok=True)
        (ctx.workdir / "validation" / "recovery.json").write_text(json.dumps(result.to_json(), indent=1))
        logger.info(
            "validate: recovery stopped (%s) after %.1fs: %d node(s) in float%s",
            result.stopped,
            result.seconds,
            len(result.reverted),
            f" ({', '.join(result.reverted)})" if result.reverted else "",
        )
        if result.model is not None:
            rows = node_table(fp32_model, result.model)
            if record is not None:
                result.model = recipe.lowered_like(result.model, record)
                low = set(record.get("low_nodes", []))
                for row in rows:
                    if row["precision"] == "fp32" and row["node"] in low | set(result.reverted):
                        row["precision"] = str(record["precision"])
            onnx_model.save_checked(result.model, ctx.output("int8_model", "model/model_int8.onnx"))
            ctx.log_table(rows, "validation/nodes_table.json")
            int8 = sum(r["precision"] in ("int8", "fp8") for r in rows)
            ctx.log_metrics({"int8_nodes": int8, "fp_nodes": len(rows) - int8})
        return result

    @staticmethod
    def _recover_from(
        qdq: onnx.ModelProto,
        float_model: onnx.ModelProto,
        scorer: scoring.Scorer,
        scores: scoring.Scores,
        errors: layers.LayerErrors,
        cfg: ValidateConfig,
        logged: Callable[[int, recovery.Iteration], None],
    ) -> recovery.Recovery:
        rc = cfg.recover
        assert rc is not None
        return recovery.recover(
            qdq,
            float_model,
            scorer,
            scores,
            errors.candidates,
            cfg.max_drop,
            rc.max_fp_nodes,
            rc.time_budget_s,
            rc.ranking_samples,
            on_iteration=logged,
            sensitivity_samples=rc.sensitivity_samples,
        )


def _finite(outputs: np.ndarray) -> np.ndarray:
    """Per sample (first axis): whether every value of ``outputs`` is finite."""
    return np.isfinite(outputs).reshape(len(outputs), -1).all(axis=1)


def _window(scorer: scoring.Scorer, first: int, n: int) -> data.Batch | None:
    """Up to ``n`` validation samples from sample ``first`` on (within the batch holding it)."""
    seen = 0
    for feeds in scorer.inputs():
        count = scorer.layout.count(feeds)
        if first < seen + count:
            return scorer.layout.take(feeds, first - seen, min(first - seen + n, count))
        seen += count
    return None


def _overflowing_nodes(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """The nodes steps.quantize.keep_fp32_nodes would keep FP32 for an overflow in ``tensors``: each
    tensor's writer, or, when lowering wrote it (a Cast into FP16 of a value from an FP32 node), the
    nodes that read it in FP16."""
    writers = {t: n for n in model.graph.node for t in n.output}
    out: list[str] = []
    for t in tensors:
        writer = writers.get(t)
        if writer is not None and writer.op_type != "Cast":
            names = [writer.name]
        else:
            names = [n.name for n in model.graph.node if t in n.input and n.op_type not in ("Cast", "QuantizeLinear")]
        out.extend(n for n in names if n and n not in out)
    return out


def _regions_record(ctx: StepContext) -> dict[str, Any] | None:
    """The quantize step's record of its FP16/BF16 regions (None: its float layers are FP32)."""
    path = ctx.inputs.get("float_regions")
    return json.loads(Path(path).read_text()) if path is not None else None


def _layer_errors(
    cfg: ValidateConfig,
    scorer: scoring.Scorer,
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    exact: bool,
    sizing: Sizing,
) -> layers.LayerErrors:
    """The layer table and node ranking of ``int8`` on the first ``layer_samples`` validation samples."""
    return layers.layer_errors(
        fp32,
        int8,
        lambda: scorer.inputs(cfg.layer_samples),
        cfg.layer_samples,
        not exact,
        scorer.layout,
        sizing.layer_chunk,
        sizing.groups,
    )


def kernels_note(metric: str, fidelity: dict[str, Any], cap: dict[str, Any]) -> str:
    """The sentence that tells a failed gate caused by this CPU's kernels from a model that lost accuracy."""
    return (
        f"The quantized model computes {metric} {fidelity['exact']:.4f} exactly, but this CPU's int8 kernels "
        f"({cap['isa']}, onnxruntime {cap['onnxruntime']}) give {fidelity['kernels']:.4f}: their results depart from "
        f"the exact arithmetic first at {', '.join(fidelity['departing'])}. That is the CPU, not the model: list "
        "this CPU in steps.quantize.cpu_fleet (or leave it null, every CPU) so the weights cannot saturate."
    )


def gate_message(
    metric: str,
    fp32_score: float,
    int8_score: float,
    drop: float,
    max_drop: float,
    nodes: list[dict[str, Any]],
    result: recovery.Recovery | None = None,
    recover: RecoverConfig | None = None,
    drop_se: float | None = None,
    samples: int = 0,
) -> str:
    """The failed gate's paragraph: the numbers, what recovery did (if it ran), the quantized nodes
    worth keeping in FP32 and, when the drop is within two standard errors of ``max_drop``, that more
    validation samples would settle it."""
    noise = near_gate(drop, max_drop, drop_se, samples)
    worst = [r["node"] for r in nodes[:WORST_NODES]]
    if result is None or recover is None:
        head = (
            f"accuracy gate failed: {metric} dropped by {drop:.4f} (FP32 {fp32_score:.4f} -> INT8 {int8_score:.4f}), "
            f"more than steps.validate.max_drop={max_drop}. Try another steps.calibrate.method"
        )
        if not worst:
            return head + "." + noise
        return (
            f"{head}, or keep the {len(worst)} quantized node(s) that add the most error in FP32: "
            f"steps.quantize.exclude.nodes: {json.dumps(worst)} (every quantized node is ranked under "
            "quantized_nodes in validation/report.json; per-tensor errors and the nodes reading them are in "
            "validation/layer_errors_table.json)." + noise
        )
    why = {
        recovery.MAX_FP_NODES: f"its limit, steps.validate.recover.max_fp_nodes={recover.max_fp_nodes}",
        recovery.TIME_BUDGET: f"its time budget, steps.validate.recover.time_budget_s={recover.time_budget_s}",
        recovery.EXHAUSTED: f"the end of its {len(result.candidates)} candidate node(s)",
    }.get(result.stopped, result.stopped)
    before = result.iterations[0].scores.int8
    keep = [*result.reverted, *(n for n in worst if n not in result.reverted)]
    return (
        f"accuracy gate failed after recovery: {metric} dropped by {drop:.4f} (FP32 {fp32_score:.4f} -> INT8 "
        f"{int8_score:.4f} with {len(result.reverted)} node(s) kept in FP32; {before:.4f} before recovery), more "
        f"than steps.validate.max_drop={max_drop}. Recovery stopped at {why}"
        + (f" after keeping {json.dumps(result.reverted)} in FP32" if result.reverted else " before reverting any node")
        + " (every model it scored is in validation/recovery.json). Raise that limit, try another "
        "steps.calibrate.method, or keep these quantized nodes in FP32"
        + (f": steps.quantize.exclude.nodes: {json.dumps(keep)}." if keep else ".")
        + noise
    )


def few_samples(samples: int, passed: bool) -> str:
    """A sentence when the gate was decided on fewer than MIN_GATE_SAMPLES samples (else "")."""
    if samples >= MIN_GATE_SAMPLES:
        return ""
    return (
        f"the gate {'passed' if passed else 'failed'} on {samples} validation sample(s), fewer than "
        f"{MIN_GATE_SAMPLES}: one sample moves an accuracy by {1 / max(samples, 1):.2g}, and the drop's "
        "standard error means little on so few. Give data.validation more samples before trusting the "
        "verdict (the count is the metric validation_samples of this run and its pipeline run)."
    )


def near_gate(drop: float, max_drop: float, drop_se: float | None, samples: int) -> str:
    """A sentence when ``drop`` is within two standard errors of ``max_drop`` (else ""): the gate's
    verdict then says more about which samples were drawn than about the model."""
    if not drop_se or abs(drop - max_drop) > 2 * drop_se:  # None, or 0: every sample moved alike, no noise
        return ""
    return (
        f" The drop is within two standard errors (+-{drop_se:.4f} on {samples} samples) of max_drop, so "
        "another draw of validation samples could decide the gate the other way: validate on more samples "
        "(data.validation) before reading much into it."
    )


STEP = Validate
