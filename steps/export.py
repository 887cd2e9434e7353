"""export: bring the FP32 model in (ONNX file, MLflow registry, or PyTorch) and prepare it.

Preparation: ONNX checker, opset raised to one with per-channel Q/DQ (13+), a dynamic batch axis,
and BatchNorm folded into the preceding convolutions by ONNX Runtime's basic graph optimiser (the
same folding TensorRT does, so calibrated tensor names match what gets deployed); initializers the
optimiser creates get names of their own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from pipeline.errors import ModelError, fail
from pipeline.execution import runtime
from pipeline.graph import model as onnx_model
from pipeline.graph import torch_export
from pipeline.graph.layout import Layout
from pipeline.graph.subgraphs import control_flow_report
from pipeline.log import logger
from pipeline.sources.data import search_dirs
from pipeline.transforms import float_precision
from steps.base import Step
from steps.context import StepContext

MIN_QDQ_OPSET = 13


@dataclass
class ExportConfig:
    opset: int = 17
    dynamic_batch: bool = True
    fold_batchnorm: bool = True


def _from_pytorch(ctx: StepContext, cfg: ExportConfig, dst: Path) -> None:
    src = ctx.pipeline.model.pytorch
    assert src is not None
    torch_export.export(
        src.factory,
        args=src.args,
        inputs=src.inputs,
        opset=cfg.opset,
        dynamic_batch=cfg.dynamic_batch,
        dst=dst,
        search_dirs=search_dirs(ctx.pipeline.base_dir),
        dtypes=src.dtypes,
    )


def _fold(src: Path, dst: Path) -> None:
    rt = runtime.ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable ONNX ops only
    so.optimized_model_filepath = str(dst)
    try:
        rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if shutil.disk_usage(dst.parent).free < src.stat().st_size:  # ORT says "serialization failed"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst)) from exc
        fail(ModelError, f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}")


GENERATED_PREFIX = "int8pipe_export_"


def _rename_generated(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    """Give the initializers ORT's optimiser created (``after`` has them, ``before`` not) names of
    their own. MatMulAddFusion turns a MatMul+Add on 3-D inputs into Reshape/Gemm/Reshape whose shape
    initializers it names itself (``gemm_input_shape``, ...); when ORT later loads the INT8 model with
    optimisations on, it fuses the MatMuls it could not fuse here under the same generated names and
    refuses the model ("Attempt to replace the existing tensor")."""
    known = {i.name for i in before.graph.initializer}
    renamed = {i.name: GENERATED_PREFIX + i.name for i in after.graph.initializer if i.name not in known}
    if not renamed:
        return 0
    for init in after.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in after.graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    for info in [*after.graph.input, *after.graph.value_info]:  # an older IR lists initializers as inputs
        info.name = renamed.get(info.name, info.name)
    return len(renamed)


def _plain_gemm(node: onnx.NodeProto) -> bool:
    """A Gemm computing exactly A @ B + C (what MatMulAddFusion writes): no scaling, no transposes."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
        and not attrs.get("transA", 0)
        and not attrs.get("transB", 0)
    )


def _unfuse_activation_addends(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    """Split back into MatMul + Add each Gemm that ORT's optimiser made of a MatMul and an Add whose
    other input is an activation (a state, a residual), not a constant bias; returns how many.

    MatMulAddFusion takes any addend whose shape broadcasts, but a Gemm's C is a bias to the
    quantizer and to TensorRT: a Gemm adding an activation is left in float, and a streaming model
    (``x @ W + reduce(state)``) then had no node at all to quantize. Split, the MatMul is quantized
    as any other; a constant bias keeps its fusion. The original nodes and tensor names come back
    where the model had them (an exclude list may name them)."""
    constants = {i.name for i in after.graph.initializer}
    gemms_before = {o for n in before.graph.node if n.op_type == "Gemm" for o in n.output}
    made_by = {o: n for n in before.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in after.graph.node:
        fused = node.op_type == "Gemm" and node.output[0] not in gemms_before and len(node.input) == 3
        if not fused or not node.input[2] or node.input[2] in constants or not _plain_gemm(node):
            nodes.append(node)
            continue
        nodes += _matmul_add(node, made_by)
        split += 1
    if split:
        del after.graph.node[:]
        after.graph.node.extend(nodes)
    return split


def _matmul_add(gemm: onnx.NodeProto, made_by: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``gemm`` (A @ B + C) as the MatMul and Add it was made of, named as they were where the source
    model shows them (the Add wrote the Gemm's output, the MatMul one of the Add's inputs)."""
    add = made_by.get(gemm.output[0])
    matmul = None
    if add is not None and add.op_type == "Add" and gemm.input[2] in add.input:
        product = next(i for i in add.input if i != gemm.input[2])  # the other addend may be a MatMul's too
        matmul = made_by.get(product) if made_by.get(product, add).op_type == "MatMul" else None
    product = matmul.output[0] if matmul is not None else f"{gemm.output[0]}_{GENERATED_PREFIX}matmul"
    addends = [product, gemm.input[2]]
    if add is not None and matmul is not None and add.input[0] != product:  # the Add's own order
        addends.reverse()
    return [
        onnx.helper.make_node("MatMul", list(gemm.input[:2]), [product], name=matmul.name if matmul else ""),
        onnx.helper.make_node("Add", addends, list(gemm.output), name=add.name if add and matmul else ""),
    ]


def _layout(ctx: StepContext) -> Layout:
    """The data's sample axes and constants (calibration's, else validation's)."""
    return Layout.of(ctx.pipeline.data.calibration or ctx.pipeline.data.validation)


def prepare(model: onnx.ModelProto, cfg: ExportConfig, layout: Layout | None, out: Path, label: str) -> onnx.ModelProto:
    """What the step does to the source model, written to ``out`` (checked) and returned.

    Constants into initializers, opset raised to 13+, a symbolic batch axis (``cfg.dynamic_batch``),
    ONNX Runtime's basic optimiser (BatchNorm folding, constant folding), every node named.
    A function of its own so that benchmarks measure exactly the model a user's export produces.
    """
    onnx_model.refuse_quantized(model, label, "model")
    moved = onnx_model.constants_to_initializers(model)
    if moved:
        logger.info("export: %d Constant nodes moved into initializers (quantizers find weights there)", moved)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_QDQ_OPSET:
        target = max(cfg.opset, MIN_QDQ_OPSET)
        logger.info("export: converting opset %d -> %d (per-channel Q/DQ needs %d+)", opset, target, MIN_QDQ_OPSET)
        float_precision.raise_opset(
            model,
            target,
            f"export: per-channel Q/DQ (and steps.export.opset: {cfg.opset}) need",
            f"Export the model at opset {MIN_QDQ_OPSET} or later yourself "
            f"(torch.onnx.export(..., opset_version={target})).",
        )
    if cfg.dynamic_batch:
        onnx_model.set_dynamic_batch(model, layout=layout)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged.onnx"
        onnx.save(model, str(staged))
        if cfg.fold_batchnorm:
            _fold(staged, out)
        else:
            out.write_bytes(staged.read_bytes())
    prepared = onnx_model.load(out)
    split = _unfuse_activation_addends(model, prepared)
    if split:
        logger.info("export: %d MatMul + Add of an activation kept apart (a Gemm's addend is a bias)", split)
    _rename_generated(model, prepared)
    onnx_model.name_nodes(prepared)  # exclude lists and per-node tables address nodes by name
    onnx_model.save_checked(prepared, out)
    return prepared


class Export(Step):
    name = "export"
    Config = ExportConfig
    parent_metrics = ()

    def can_reuse(self, ctx: StepContext, cfg: Any) -> bool:
        # A PyTorch factory's result depends on code and weights int8pipe cannot hash without running
        # it; it is exported every time and later steps reuse through the exported file's digest.
        return ctx.source_model is not None

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        # the model's bytes, not its path or URI: a registry alias may point at another version today
        key: dict[str, Any] = {"model_sha256": onnx_model.sha256(ctx.source_model) if ctx.source_model else None}
        layout = _layout(ctx)
        if layout.declared:  # it decides which axes become symbolic
            key["layout"] = layout.describe()
        return key

    def run(self, ctx: StepContext, cfg: ExportConfig) -> None:
        src = ctx.pipeline.model
        label = src.onnx or src.mlflow or "the exported PyTorch model"
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "source.onnx"
            if ctx.source_model is not None:
                raw = ctx.source_model
            else:
                _from_pytorch(ctx, cfg, raw)
            model = onnx_model.load(raw, label=label)
        out = ctx.output("fp32_model", "model/model.onnx")
        before = onnx_model.op_counts(model)
        prepared = prepare(model, cfg, _layout(ctx), out, label)
        flow = control_flow_report(prepared)
        if flow:  # otherwise "2 nodes, 1 parameters" and nothing quantized would go unexplained
            logger.warning("export: %s", flow)
        summary = onnx_model.summary(prepared)
        summary["source"] = {"onnx": src.onnx, "mlflow": src.mlflow, "pytorch": src.pytorch and src.pytorch.factory}
        summary["source_op_counts"] = before
        summary["sha256"] = onnx_model.sha256(out)
        ctx.output("fp32_summary", "model/summary.json").write_text(json.dumps(summary, indent=1, default=str))
        folded = before.get("BatchNormalization", 0) - summary["op_counts"].get("BatchNormalization", 0)
        logger.info(
            "export: %d nodes, %d parameters, %d BatchNorm folded", summary["num_nodes"], summary["num_params"], folded
        )
        ctx.log_metrics(
            {"num_nodes": summary["num_nodes"], "num_params": summary["num_params"], "batchnorm_folded": folded}
        )


STEP = Export
