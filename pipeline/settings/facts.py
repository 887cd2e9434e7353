"""What the whole pipeline is for, resolved once from its YAML: the facts several steps act on.

A step reads its own config and these facts, never another step's config: calibrate needs the
target (which tensors get histograms) before quantize runs, validate and promote need the weight
scheme quantize chose, everything that runs inference passes needs the memory budget. Where a fact
is written in the YAML (``steps.quantize.target``, ``steps.calibrate.memory_mb``) stays where users
know it; only its reading moves here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.execution.cpu_kernels import ALL, SCHEMES, Scheme, choose
from pipeline.limits import DEFAULT_MEMORY_MB

DEFAULT_BATCH_SIZE = 32  # samples per inference pass when there is no calibrate step to say


@dataclass(frozen=True)
class Facts:
    target: str = "tensorrt"  # tensorrt | onnxruntime: where the INT8 model is served
    mode: str = "static"  # static (Q/DQ) | dynamic (ORT's run-time activation ranges)
    weight_scheme: Scheme = SCHEMES["int8"]  # how weights are stored (cpu_kernels: what the CPU fleet allows)
    cpu_fleet: tuple[str, ...] = (ALL,)  # target onnxruntime: the CPUs it must compute the same on
    memory_mb: int = DEFAULT_MEMORY_MB  # activations alive during any inference pass (steps.calibrate.memory_mb)
    batch_size: int = DEFAULT_BATCH_SIZE  # samples per inference pass over calibration data
    gate_metric: str | None = None  # the metric a validate step gates on (None: not validated)
    precision: str = "int8"  # what the quantized layers compute in: int8 | fp8
    float_precision: str = "fp32"  # what the float layers compute in: fp32 | fp16 | bf16

    @property
    def cpu_kernels(self) -> bool:
        """Whether the model is served by ONNX Runtime's int8 CPU kernels (and so checked against them)."""
        return self.target == "onnxruntime"

    @property
    def fleet_label(self) -> str:
        return ",".join(self.cpu_fleet)


def resolve(steps: dict[str, Any]) -> Facts:
    """The facts of a pipeline whose step configs are ``steps`` (validated dataclasses by step name)."""
    quantize, calibrate = steps.get("quantize"), steps.get("calibrate")
    validate = steps.get("validate")
    out: dict[str, Any] = {"gate_metric": validate.metric if validate is not None else None}
    if calibrate is not None:
        out.update(memory_mb=calibrate.memory_mb, batch_size=calibrate.batch_size)
    if quantize is not None:
        target = quantize.target
        out.update(
            target=target,
            mode=quantize.mode,
            cpu_fleet=tuple(quantize.cpu_fleet or [ALL]),
            # TensorRT runs 8-bit weights; ORT's CPU kernels get what every CPU of the fleet computes exactly
            weight_scheme=SCHEMES["int8"] if target == "tensorrt" else choose(quantize.cpu_fleet),
            precision=quantize.precision,
            float_precision=quantize.float_scheme if quantize.mode == "static" else "fp32",
        )
    return Facts(**out)
