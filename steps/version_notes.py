"""The registry version's description: the facts a person reads on the version page but does not
filter on (steps/promote.py tags only those). MLflow's UI renders it as Markdown; a tag would put each
fact on its own row of the version list."""

from __future__ import annotations

import json
from typing import Any

from pipeline.execution import cpu_kernels
from steps.context import StepContext

# the benchmark provider that runs a target's model as it is deployed
DEPLOYED_PROVIDER = {"onnxruntime": "cpu", "tensorrt": "tensorrt"}


def details(ctx: StepContext, int8_sha256: str, data_digest: str | None) -> str:
    """A bullet per subject: the gate, the model, where it was validated, latency, the step runs."""
    lines = [gate(ctx, data_digest), model(ctx, int8_sha256), *cpu(ctx), latency(ctx), runs(ctx)]
    return "\n".join(f"- {line}" for line in lines if line)


def _report(ctx: StepContext, name: str) -> dict[str, Any]:
    path = ctx.inputs.get(name)
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def gate(ctx: StepContext, data_digest: str | None) -> str:
    metric = ctx.facts.gate_metric
    if metric is None:
        return "**Gate**: not run (no validate step)"
    up = ctx.upstream_metrics
    # promote runs only after validate passed the gate; gate_* are its scores on the gated metric
    said = f"**Gate** passed on {metric}: INT8 {up['gate_int8']:.6g}, FP32 {up['gate_fp32']:.6g}"
    if "accuracy_drop" in up:
        said += f", drop {up['accuracy_drop']:.4g}"
    if "validation_samples" in up:  # how much the drop can be trusted
        said += f", on {up['validation_samples']:.0f} validation samples"
    return said + (f" (validation data SHA-256 `{data_digest}`)" if data_digest else "")


def model(ctx: StepContext, int8_sha256: str) -> str:
    up = ctx.upstream_metrics
    nodes = [f"{up[k]:.0f} {label} nodes" for k, label in (("int8_nodes", "INT8"), ("fp_nodes", "float")) if k in up]
    return f"**{ctx.facts.precision.upper()} model**: {', '.join([*nodes, f'SHA-256 `{int8_sha256}`'])}"


def cpu(ctx: StepContext) -> list[str]:
    """Where the model was validated and, for ORT's CPU kernels, on which CPUs it computes the same."""
    report = _report(ctx, "validation_report")
    cap = report.get("cpu")
    lines = []
    if cap is not None:
        numerics = (report.get("kernel_fidelity") or {}).get("gated_on", "exact")
        lines.append(f"**Validated on** {cpu_kernels.describe(cap)}; INT8 numerics {numerics}")
    facts = ctx.facts
    if facts.cpu_kernels:
        sentence = cpu_kernels.portability(facts.weight_scheme, list(facts.cpu_fleet), cap)
        lines.append(f"**CPU fleet** {facts.fleet_label}, weight scheme {facts.weight_scheme.name}: {sentence}")
    return lines


def latency(ctx: StepContext) -> str | None:
    """Latency only as timed where the target runs it, with its spread and the machine, or why not.

    A ``target: tensorrt`` model timed on ONNX Runtime's CPU provider dequantizes and computes in
    float there (benchmark.placement_note): no deployment figure. A p99 alone, timed on a shared or
    loaded machine, says more about the machine than the model, so it comes beside p50, never alone."""
    up, target = ctx.upstream_metrics, ctx.facts.target
    provider = DEPLOYED_PROVIDER[target]
    run = f"benchmark run `{ctx.upstream_runs.get('benchmark')}`"
    if f"{provider}.int8.latency_p50_ms" not in up:
        measured = sorted({k.split(".")[0] for k in up if k.endswith(".speedup")})
        if not measured:
            return None
        return (
            f"**Latency**: not timed where target {target} runs it ({provider}); the {run} timed "
            f"{', '.join(measured)}, no deployment figure"
        )

    def spread(precision: str) -> str:
        p50, p99 = up[f"{provider}.{precision}.latency_p50_ms"], up.get(f"{provider}.{precision}.latency_p99_ms")
        return f"{precision.upper()} p50 {p50:.3g} ms" + (f", p99 {p99:.3g} ms" if p99 is not None else "")

    said = f"**Latency** ({run}, first batch size): {spread('int8')}"
    if f"{provider}.fp32.latency_p50_ms" in up:
        said += f"; {spread('fp32')}"
    if f"{provider}.speedup" in up:
        said += f"; INT8 at {up[f'{provider}.speedup']:.2f}x FP32's speed (p50)"
    # the machine was not reserved for the benchmark: p99 shows how much else it ran, so compare p50s
    return said + f"; timed on {_machine(ctx, provider)}, not reserved: compare p50s measured on one machine"


def _machine(ctx: StepContext, provider: str) -> str:
    env = _report(ctx, "environment")
    if provider == "cpu":
        cpu = env.get("cpu", {})
        flags = ",".join(f for f in cpu.get("flags", []) if "avx" in f or "vnni" in f or "amx" in f)
        where = cpu.get("model", "unknown CPU")
        return f"{where} ({flags or 'no AVX flags read'}), onnxruntime {env.get('onnxruntime')}"
    gpus = "; ".join(env.get("gpus", [])) or "unknown GPU"
    return f"{gpus} (name, driver, compute capability), TensorRT {env.get('tensorrt')}"


def runs(ctx: StepContext) -> str:
    listed = ", ".join(f"{step} `{run_id}`" for step, run_id in ctx.upstream_runs.items())
    return f"**Runs** of pipeline '{ctx.pipeline.name}': {listed}"
