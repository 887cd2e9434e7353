"""quantize: the explicit Q/DQ INT8 model, built from ``ranges.json`` (never by calibrating again)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import onnx

from pipeline import model as onnx_model
from pipeline.calibration.ranges import Ranges
from pipeline.context import StepContext
from pipeline.log import logger
from pipeline.quantization import QuantizeOptions, node_table, quantize
from steps.base import Step


@dataclass
class Exclude:
    nodes: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)


@dataclass
class QuantizeConfig:
    target: Literal["tensorrt", "onnxruntime"] = "tensorrt"
    per_channel: bool = True
    exclude: Exclude = field(default_factory=Exclude)


class Quantize(Step):
    name = "quantize"
    Config = QuantizeConfig
    needs_steps = ("export", "calibrate")
    parent_metrics = ("size_mb_fp32", "size_mb_int8")

    def run(self, ctx: StepContext, cfg: QuantizeConfig) -> None:
        fp32_path = ctx.input("fp32_model")
        ranges = Ranges.read(ctx.input("ranges"))
        ranges.check_model(onnx_model.sha256(fp32_path), "steps.quantize")
        fp32 = onnx_model.load(fp32_path, check=False)
        opts = QuantizeOptions(cfg.target, cfg.per_channel, tuple(cfg.exclude.nodes), tuple(cfg.exclude.op_types))
        qdq = quantize(fp32, ranges.amax(), opts)
        out = ctx.output("int8_model", "model/model_int8.onnx")
        onnx.save(qdq, str(out))
        rows = node_table(fp32, qdq)
        if rows:
            ctx.log_table(rows, "quantize/nodes_table.json")
        int8 = sum(r["precision"] == "int8" for r in rows)
        logger.info("quantize: %d of %d nodes run in INT8 (target %s)", int8, len(rows), cfg.target)
        ctx.log_metrics(
            {
                "int8_nodes": int8,
                "fp_nodes": len(rows) - int8,
                "size_mb_fp32": fp32_path.stat().st_size / 1e6,
                "size_mb_int8": out.stat().st_size / 1e6,
            }
        )


STEP = Quantize
