"""Float regions in FP16 or BF16 around the quantized layers: what TensorRT 11 runs is what the model says.

TensorRT 11 builds every network strongly typed: a layer runs in the type its ONNX tensors carry. A
Q/DQ model whose float parts are FP32 therefore runs them in FP32, slower than the FP16 engine a user
compares against. :func:`lower_float_regions` rewrites the float computation of a model (Q/DQ or
plain) to FP16 or BF16 and keeps in FP32 what the narrow type cannot hold:

- ops whose result is a long reduction or normalisation statistic (Softmax, LayerNorm, Reduce*, Exp,
  Pow): their sums overflow or lose the small terms in 10 mantissa bits;
- nodes that read or write an activation whose calibrated max |x| exceeds FP16's largest value
  with :data:`FP16_HEADROOM` to spare (the validation data may reach further than calibration did);
- nodes that read an initializer FP16 cannot hold (beyond 65504, or all of it below FP16's normal
  range, such as a LayerNorm epsilon of 1e-12, which FP16 rounds to 0);
- ops without a rule here: an unknown op is never guessed into a narrow type.

Typing follows the ONNX (and TensorRT strongly typed) rules: a DequantizeLinear outputs its scale's
type, so a DQ whose readers all compute in FP16 gets an FP16 scale (a weight's channels scaled below
FP16's normal range are refitted to a scale FP16 holds: a Cast between a DQ and its Conv would make
TensorRT run that Conv in FP16, not INT8); a QuantizeLinear's scale has its input's type; a Cast is
inserted wherever a tensor crosses between regions. Graph inputs and outputs
stay FP32 so a caller feeds and reads what it did before. BF16 has FP32's exponent range, so only the
op rules apply to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import ModelError, fail
from pipeline.graph.model import (
    drop_unused_initializers,
    name_taker,
    opset_of,
    subgraph_inputs,
    tensor_types,
    toposort,
)
from pipeline.transforms import scale_grid

PRECISIONS = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP16_MAX = 65504.0
FP16_NORMAL = 2.0**-14  # smallest normal: a Q/DQ scale below it loses its relative precision
# calibrated activations may grow by this factor on unseen data before an FP16 region overflows
FP16_HEADROOM = 4.0
# Q/DQ with a non-FP32 scale (FP16/BF16 regions, FLOAT8 zero points) exist from opset 19; most ops
# accept BF16 (Conv among them) only from opset 22
MIN_OPSET = {"fp16": 19, "bf16": 22}

# Ops whose every float input and output share one type T, safe to compute in FP16/BF16.
LOW_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu",
        "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Neg", "Abs", "Max",
        "Min", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather",
        "Pad", "Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
        "Identity", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Sqrt", "Where",
    }
)  # fmt: skip
# Long reductions and normalisation statistics: FP32 by rule, whatever their range.
REDUCTION_OPS = frozenset(
    {
        "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
        "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
        "ReduceProd", "CumSum", "Exp", "Log", "Pow", "Einsum",
    }
)  # fmt: skip
# Inputs that are parameters of a fixed float type, not data of type T: (op, input index).
FIXED_INPUTS = frozenset({("Resize", 1), ("Resize", 2)})
# Ops that read only a tensor's shape (any element type will do), and constants (TensorRT folds their Casts).
SHAPE_READERS = frozenset({"Shape", "Size", "Constant"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass
class Lowered:
    """The rewritten model and, per node kept in FP32, why (a node without float data is in neither)."""

    model: onnx.ModelProto
    precision: str
    low_nodes: list[str] = field(default_factory=list)
    kept_fp32: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"precision": self.precision, "low_nodes": self.low_nodes, "kept_fp32": self.kept_fp32}


def lower_float_regions(
    model: onnx.ModelProto, precision: str, activation_max: Mapping[str, float] | None = None
) -> onnx.ModelProto:
    """``model`` with its float computation in ``precision`` (fp16 | bf16; fp32 returns it unchanged).

    ``activation_max``: tensor name -> the largest |x| calibration saw (None: no activation rule)."""
    return lower(model, precision, activation_max).model


def lower(
    model: onnx.ModelProto,
    precision: str,
    activation_max: Mapping[str, float] | None = None,
    keep_fp32: Mapping[str, str] | None = None,
) -> Lowered:
    """:func:`lower_float_regions` with the record of which nodes went low and why the others did not.

    ``keep_fp32``: node name -> reason, nodes kept FP32 whatever the rules say (a record of an earlier
    lowering, so a model changed since, such as recovery's, is lowered the same way)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown float precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return Lowered(model, precision)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    toposort(out)  # shape inference reads nodes in order: ORT's quantizer appends its Q/DQ nodes at the end
    version = MIN_OPSET[precision]
    raise_opset(
        out,
        version,
        f"{precision.upper()} float regions (steps.quantize.float_precision: {precision}) need",
        "Set steps.quantize.float_precision: fp32 (FP32 float regions keep the model's opset), or export the "
        f"model at opset {version} or later (torch.onnx.export(..., opset_version={version})).",
    )
    return _Rewrite(out, PRECISIONS[precision], precision, activation_max or {}, keep_fp32 or {}).run()


def raise_opset(model: onnx.ModelProto, version: int, needed_by: str, remedy: str) -> None:
    """Bring ``model``'s default-domain opset to at least ``version``, in place (ONNX's version converter).

    The converter has no adapter for some ops and refuses some valid nodes (a BatchNormalization with its
    training outputs cannot go past opset 13): that is a ModelError saying what needed the opset
    (``needed_by``, a phrase ending before "opset N"), the converter's reason, and ``remedy``."""
    have = opset_of(model)
    if have >= version:
        return
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, version)
    except Exception as exc:  # RuntimeError (a failed adapter assertion), ConvertError, InferenceError, ...
        fail(
            ModelError,
            f"{needed_by} ONNX opset {version}, and ONNX's version converter cannot bring this model from "
            f"opset {have} to {version}: {converter_reason(exc)}. {remedy}",
        )
    model.CopyFrom(converted)


def converter_reason(exc: BaseException) -> str:
    """The readable part of a version converter error: its C++ assertions read
    ``/path/adapter.h:18: adapt_x: Assertion `cond` failed: reason``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    failed = re.search(r"Assertion `.*` failed: (.+)$", text)
    if failed:
        text = failed.group(1)
    else:
        text = re.sub(r"^\S+\.(?:h|cc|cpp):\d+: (?:\w+: )?", "", text)
    return text.rstrip(". ")


class _Rewrite:
    def __init__(
        self,
        model: onnx.ModelProto,
        low: int,
        precision: str,
        activation_max: Mapping[str, float],
        keep_fp32: Mapping[str, str],
    ):
        self.model, self.low, self.precision, self.activation_max = model, low, precision, activation_max
        self.keep_fp32 = keep_fp32
        self.graph = model.graph
        self.opset = opset_of(model)
        self.types = tensor_types(model)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.types.update({name: i.data_type for name, i in self.inits.items()})
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for t in node.input:
                if t:
                    self.readers.setdefault(t, []).append(node)
        # outer tensors an If/Loop/Scan body reads keep their type: the body was typed against it
        self.read_by_bodies = set().union(*(subgraph_inputs(n) for n in self.graph.node))
        self.positions = {id(n): k for k, n in enumerate(self.graph.node)}
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.taken = set(self.inits) | {t for n in self.graph.node for t in [*n.input, *n.output]}

    def run(self) -> Lowered:
        kept: dict[str, str] = {}
        low: set[int] = set()
        for k, node in enumerate(self.graph.node):
            if node.op_type in QDQ_OPS or node.op_type in SHAPE_READERS or not self._float_tensors(node):
                continue
            reason = self._why_fp32(node)
            if reason is None:
                low.add(k)
            else:
                kept[node.name or f"#{k}"] = reason
        names = [self.graph.node[k].name or f"#{k}" for k in sorted(low)]
        low_dq = {k for k, n in enumerate(self.graph.node) if n.op_type == "DequantizeLinear" and self._dq_low(n, low)}
        arrival = self._arrival_types(low | low_dq)
        self._keep_outputs_fp32(arrival)
        for k, node in enumerate(self.graph.node):
            self._retype_inputs(node, k in low, arrival)
            if k in low_dq:
                if self.low == TensorProto.FLOAT16:
                    self._fit_weight_scale(node)
                node.input[1] = self._typed(node.input[1], self.low, arrival)
            elif node.op_type == "QuantizeLinear":
                node.input[1] = self._typed(node.input[1], arrival.get(node.input[0], TensorProto.FLOAT), arrival)
        self.graph.node.extend(self.new_nodes)
        del self.graph.value_info[:]  # element types changed: stale entries would contradict them
        toposort(self.model)
        drop_unused_initializers(self.model)  # the FP32 originals of initializers converted for one region
        return Lowered(self.model, self.precision, names, kept)

    # which nodes compute low

    def _float_tensors(self, node: onnx.NodeProto) -> list[str]:
        return [t for t in [*node.input, *node.output] if t and self.types.get(t) == TensorProto.FLOAT]

    def _why_fp32(self, node: onnx.NodeProto) -> str | None:
        if node.name in self.keep_fp32:
            return self.keep_fp32[node.name]
        if node.op_type in REDUCTION_OPS:
            return "a reduction or normalisation statistic: stays FP32 by rule"
        if node.op_type not in LOW_OPS:
            return f"no {self.precision} rule for {node.op_type}"
        if not _accepts(node.op_type, self.low, self.opset):
            return f"ONNX opset {self.opset} has no {self.precision} {node.op_type}"
        read = [t for t in node.output if t in self.read_by_bodies]
        if read:
            return f"{read[0]} is read inside an If/Loop/Scan body"
        others = [t for t in [*node.input, *node.output] if t and self.types.get(t) not in (None, TensorProto.FLOAT)]
        if any(self.types[t] in (TensorProto.DOUBLE,) for t in others):
            return "reads or writes float64"
        if self.low != TensorProto.FLOAT16:
            return None  # BF16 keeps FP32's exponent range
        limit = FP16_MAX / FP16_HEADROOM
        for t in [*node.input, *node.output]:
            seen = self.activation_max.get(t)
            if seen is not None and seen > limit:
                return f"{t} reached |x| = {seen:.4g} in calibration, beyond FP16's {FP16_MAX:.0f}/{FP16_HEADROOM:.0f}"
        for t in node.input:
            init = self.inits.get(t)
            if init is None or init.data_type != TensorProto.FLOAT:
                continue
            values = np.abs(numpy_helper.to_array(init))
            if values.size and float(values.max()) > FP16_MAX:
                return f"initializer {t} holds {float(values.max()):.4g}, beyond FP16's {FP16_MAX:.0f}"
            # a tensor whose every value sits below FP16's normal range (an epsilon) loses itself; a weight
            # tensor with a few tiny entries among larger ones loses nothing that matters
            if values.size and 0 < float(values.max()) < FP16_NORMAL:
                return f"initializer {t} holds only values below FP16's normal range (max {float(values.max()):.3g})"
        return None

    def _dq_low(self, dq: onnx.NodeProto, low: set[int]) -> bool:
        """A DequantizeLinear outputs low when every reader computes low and its scale fits the type."""
        # a Shape reads any element type: it must not keep its tensor FP32 (a Cast between a DequantizeLinear
        # and its Conv is a Conv TensorRT runs in FP16, not INT8)
        readers = [r for r in self.readers.get(dq.output[0], []) if r.op_type not in SHAPE_READERS]
        if not readers or any(self.positions[id(r)] not in low for r in readers) or dq.output[0] in self.read_by_bodies:
            return False
        if dq.output[0] in {o.name for o in self.graph.output}:
            return False
        scale = self.inits.get(dq.input[1])
        if scale is None or scale.data_type != TensorProto.FLOAT:
            return False
        if self.low == TensorProto.FLOAT16:
            s = np.abs(numpy_helper.to_array(scale))
            return bool(np.all(s <= FP16_MAX) and (np.all(s >= FP16_NORMAL) or self._weight_of(dq) is not None))
        return True

    def _weight_of(self, dq: onnx.NodeProto) -> onnx.TensorProto | None:
        """The INT8 initializer ``dq`` dequantizes symmetrically, read by nothing else; else None."""
        if not scale_grid.symmetric_int8_weight(dq, self.inits) or len(self.readers.get(dq.input[0], [])) != 1:
            return None
        return self.inits[dq.input[0]]

    def _fit_weight_scale(self, dq: onnx.NodeProto) -> None:
        """Give a weight DequantizeLinear whose scale has channels below FP16's normal range a scale FP16 holds.

        A channel whose weights all sit near 0 (dead after BatchNorm folding: scales of 1e-10 in
        EfficientNet-Lite2) has a scale FP16 rounds to 0 or to a subnormal far from it, and keeping that
        DequantizeLinear FP32 instead puts a Cast before its Conv, which TensorRT then runs in FP16, not
        INT8. So such a channel's scale moves up to the next FP16 value and its INT8 values are refitted
        (scale_grid.fit_weight): each dequantized weight moves by at most half its new scale, the spacing
        FP16 itself has around such a weight. A model whose scales the recipe already fitted is unchanged."""
        q = self._weight_of(dq)
        if q is None:
            return
        s = numpy_helper.to_array(self.inits[dq.input[1]]).astype(np.float32)
        if np.all(np.abs(s) >= FP16_NORMAL):
            return
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        refitted, up = scale_grid.fit_weight(numpy_helper.to_array(q), s, axis, "fp16")
        fitted: list[tuple[str, np.ndarray]] = [(q.name, refitted), (dq.input[1], up)]
        for i, (name, array) in enumerate(fitted):
            fresh = self._fresh(f"{name}_fp16_fit")
            self.graph.initializer.append(numpy_helper.from_array(array, fresh))
            self.inits[fresh] = self.graph.initializer[-1]
            dq.input[i] = fresh

    # typing

    def _arrival_types(self, low_nodes: set[int]) -> dict[str, int]:
        """tensor -> the element type it will have once the nodes in ``low_nodes`` compute low."""
        arrival = dict(self.types)
        for k, node in enumerate(self.graph.node):
            if k in low_nodes:
                for t in node.output:
                    if t and self.types.get(t) == TensorProto.FLOAT:
                        arrival[t] = self.low
        return arrival

    def _keep_outputs_fp32(self, arrival: dict[str, int]) -> None:
        """A graph output computed low is renamed inside the graph and cast back under its own name."""
        for out in self.graph.output:
            if arrival.get(out.name) != self.low:
                continue
            inner = self._fresh(f"{out.name}_{self.precision}")
            for node in self.graph.node:
                node.output[:] = [inner if t == out.name else t for t in node.output]
                node.input[:] = [inner if t == out.name else t for t in node.input]
            for reader in self.readers.pop(out.name, []):
                self.readers.setdefault(inner, []).append(reader)
            arrival[inner] = self.low
            arrival[out.name] = TensorProto.FLOAT
            self.new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                                   name=self._fresh(f"{out.name}_to_fp32")))  # fmt: skip

    def _retype_inputs(self, node: onnx.NodeProto, low: bool, arrival: dict[str, int]) -> None:
        if node.op_type in QDQ_OPS or node.op_type in SHAPE_READERS:
            return
        for i, t in enumerate(node.input):
            if not t or (node.op_type, i) in FIXED_INPUTS or arrival.get(t) not in (TensorProto.FLOAT, self.low):
                continue
            want = self.low if low else TensorProto.FLOAT
            if arrival[t] != want or (t in self.inits and self.inits[t].data_type != want):
                node.input[i] = self._typed(t, want, arrival)

    def _typed(self, tensor: str, want: int, arrival: dict[str, int]) -> str:
        """The name under which ``tensor`` is available as ``want``: itself, a converted initializer
        copy, or the output of a Cast."""
        have = self.inits[tensor].data_type if tensor in self.inits else arrival.get(tensor, TensorProto.FLOAT)
        if have == want:
            return tensor
        key = (tensor, want)
        if key in self.casts:
            return self.casts[key]
        name = self._fresh(f"{tensor}_{_short(want)}")
        if tensor in self.inits:
            values = numpy_helper.to_array(self.inits[tensor])
            self.graph.initializer.append(numpy_helper.from_array(_as_type(values, want), name))
        else:
            self.new_nodes.append(helper.make_node("Cast", [tensor], [name], to=want, name=self._fresh(f"{name}_cast")))
        arrival[name] = want
        self.casts[key] = name
        return name

    def _fresh(self, base: str) -> str:
        name = base
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name


def _accepts(op_type: str, elem_type: int, opset: int) -> bool:
    """Whether the ONNX schema of ``op_type`` at ``opset`` lets its type T (its data input's) be ``elem_type``."""
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    type_str = f"tensor({onnx.helper.tensor_dtype_to_string(elem_type).split('.')[-1].lower()})"
    data = schema.inputs[0].type_str if schema.inputs else ""
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == data), [])
    return type_str in allowed


def _short(elem_type: int) -> str:
    names: dict[int, str] = {int(v): k for k, v in PRECISIONS.items()}
    return names.get(elem_type, str(elem_type))


def _as_type(values: np.ndarray, elem_type: int) -> np.ndarray:
    if elem_type == TensorProto.FLOAT16:
        return values.astype(np.float16)
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes  # installed with onnx >= 1.18; only BF16 regions need it

        return values.astype(np.float32).astype(ml_dtypes.bfloat16)
    return values.astype(np.float32)


class Overflow(NamedTuple):
    """Where a model's FP16/BF16 regions first held inf or NaN on a stream of batches."""

    tensors: list[str]  # the first few narrow tensors (graph order) that did, in the first batch that did
    first_sample: int  # that batch's first sample, counted from 0 over the stream
    samples: int  # that batch's samples


def nonfinite_tensors(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], limit: int = 5) -> list[str]:
    """The first ``limit`` FP16/BF16 tensors of ``model`` (graph order) that hold inf or NaN on ``feeds``:
    where a narrow region overflowed."""
    found = first_overflow(model, [dict(feeds)], lambda _: 1, limit)
    return found.tensors if found is not None else []


def first_overflow(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    count: Callable[[Mapping[str, np.ndarray]], int],
    limit: int = 5,
) -> Overflow | None:
    """The first batch of ``batches`` on which an FP16/BF16 tensor of ``model`` holds inf or NaN, and
    the first ``limit`` such tensors in graph order (the first is where the overflow started; the
    others mostly carry it on); None when every narrow tensor stays finite. ``count``: a batch's samples.

    Every narrow tensor gets a reader that sums it in FP32 to one number, finite exactly when the
    tensor is (FP16 values cannot overflow an FP32 sum): the probe hands back a few bytes per tensor
    and batch instead of every activation. It still runs the whole model (its explicit-rounding twin,
    unoptimised): callers choose the samples."""
    from pipeline.execution import runtime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = tensor_types(probe)
    outputs = {o.name for o in probe.graph.output}
    narrow = [
        t for n in probe.graph.node for t in n.output
        if t and t not in outputs and types.get(t) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    ]  # fmt: skip
    if not narrow:
        return None
    fresh = name_taker(probe)

    sums = []
    for t in narrow:
        wide, total = fresh(f"{t}_overflow_probe_fp32"), fresh(f"{t}_overflow_probe_sum")
        probe.graph.node.extend([
            helper.make_node("Cast", [t], [wide], to=TensorProto.FLOAT, name=fresh(f"{wide}_cast")),
            helper.make_node("ReduceSum", [wide], [total], keepdims=0, name=fresh(f"{total}_reduce")),
        ])  # fmt: skip
        probe.graph.output.append(helper.make_tensor_value_info(total, TensorProto.FLOAT, []))
        sums.append(total)
    sess = runtime.session(probe, optimize=False)
    start = 0
    for feeds in batches:
        values = sess.run(sums, dict(feeds))
        bad = [t for t, v in zip(narrow, values) if not np.isfinite(v)]
        n = count(feeds)
        if bad:
            return Overflow(bad[:limit], start, n)
        start += n
    return None
