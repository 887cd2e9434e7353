"""A built TensorRT engine's layers, read from its inspector JSON: what each engine layer computes in,
and which ONNX nodes it runs.

The JSON is what ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` returns and
``trtexec --exportLayerInfo`` writes. Two schemas exist (TensorRT's migration guide, "Migrating
IEngineInspector Usage from TensorRT 10.x to 11.x"): up to 10.x the engine's inputs and outputs are
``"Bindings"``, a list of names; from 11.0 they are ``"I/O Tensors"``, objects with ``Name``, ``IOMode``,
``DataType``, ``Dimensions``, ``Location``, ``IsShapeInferenceIO`` and ``ProfileInfo``. ``"Layers"`` is
the same in both: objects with ``Name``, ``LayerType``, ``Inputs``/``Outputs`` (each with a
``"Format/Datatype"`` string) and, per layer kind, ``Weights``, ``TacticName``, ``Metadata`` (8.6+).
An engine built without ``ProfilingVerbosity.DETAILED`` lists only layer names (strings); their
precision is then unknown.

Nothing here imports TensorRT: the engine step parses what the inspector wrote, and the tests parse
JSON recorded by TensorRT on GPUs (tests/data/tensorrt/README.md).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BINDINGS = "bindings"  # TensorRT <= 10: "Bindings": ["input", "output"]
IO_TENSORS = "io_tensors"  # TensorRT >= 11: "I/O Tensors": [{"Name", "IOMode", "DataType", ...}]
SCHEMA_KEYS = {BINDINGS: "Bindings", IO_TENSORS: "I/O Tensors"}

# Words TensorRT writes for a data type, in format descriptions ("Thirty-two wide channel vectorized
# row major Int8 format", "Channel major FP16 format where channel % 8 == 0", "Row major linear FP32")
# and as bare data type names ("Float", "Half", "Int8", "FP8", "BFloat16"), lower-cased.
TYPE_WORDS = {
    "int8": "int8",
    "fp8": "fp8",
    "float8": "fp8",
    "e4m3": "fp8",
    "int4": "int4",
    "fp4": "fp4",
    "e2m1": "fp4",
    "fp16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp32": "fp32",
    "float": "fp32",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "bool": "bool",
}
# Narrowest first: a layer that takes an INT8 tensor in (or holds INT8 weights) multiplies in INT8,
# whatever type its output is written in (TensorRT's placement quantizes a layer's inputs, so an INT8
# Conv often writes FP16 or FP32).
COMPUTE_ORDER = ("fp4", "int4", "fp8", "int8", "bf16", "fp16", "fp32")
INDEX_TYPES = ("int32", "int64", "uint8", "bool")  # shapes, indices, masks: not what a layer computes in
COUNTED = ("int8", "fp8", "fp16", "bf16", "fp32")  # metrics per precision; the rest count as "other"

COMPUTE, REFORMAT, NOOP = "compute", "reformat", "noop"
# TensorRT's layer types for generated elementwise kernels (TensorRT 8's PointWise, Myelin's kgen)
POINTWISE_TYPES = ("PointWise", "PointWiseV2", "ElementWise", "kgen")
_REFORMAT_PREFIX = re.compile(r"^Reformatting CopyNode for (?:Input|Output) Tensor \d+ to ")
# "[ONNX Layer: /conv1/Conv]" items, joined by U+001E (TensorRT 8.6, 10.1) or U+001F (later 10.x)
_METADATA_ITEM = re.compile(r"\[ONNX Layer: (.*?)\](?=[\x1e\x1f]|\[ONNX Layer: |$)", re.S)
_FOREIGN = re.compile(r"^\{?ForeignNode\[(.*)\]\}?$")  # a Myelin region named after its first...last node


def type_of(text: str | None) -> str:
    """The precision word a ``Format/Datatype`` or ``DataType`` string names, or ``unknown``."""
    for token in re.findall(r"[a-z0-9]+", (text or "").lower()):
        if token in TYPE_WORDS:
            return TYPE_WORDS[token]
    return "unknown"


@dataclass(frozen=True)
class IOTensor:
    name: str
    mode: str  # input | output | "" (not known: a TensorRT 10 binding no layer reads or writes)
    dtype: str  # a precision word (type_of)
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str  # TensorRT's kind: CaskConvolution, Reformat, kgen, ... ("" when names only)
    role: str  # compute | reformat (a type or layout conversion, Q/DQ conversions included) | noop
    precision: str  # what a compute layer multiplies in (compute_precision); unknown without details
    inputs: tuple[str, ...]  # each input's precision word
    outputs: tuple[str, ...]
    weights: str | None  # the precision word of its Weights, when it has any
    onnx_nodes: tuple[str, ...]  # the ONNX nodes this layer runs (node_names)
    origin: str = ""  # TensorRT's "Origin": QDQ for a Q/DQ conversion, REFORMAT, ...
    tactic: str = ""


@dataclass(frozen=True)
class EngineInfo:
    schema: str  # BINDINGS (TensorRT <= 10), IO_TENSORS (TensorRT >= 11), or "" for a single layer's JSON
    detailed: bool  # False: built without ProfilingVerbosity.DETAILED, names only
    layers: tuple[EngineLayer, ...]
    io: tuple[IOTensor, ...]

    def counts(self) -> dict[str, int]:
        """Layers in total, reformats, no-ops, and compute layers per precision (others as ``other``)."""
        roles = Counter(layer.role for layer in self.layers)
        compute = Counter(layer.precision for layer in self.layers if layer.role == COMPUTE)
        out = {"total": len(self.layers), "reformat": roles[REFORMAT], "noop": roles[NOOP]}
        out |= {p: compute[p] for p in COUNTED}
        out["other"] = sum(n for p, n in compute.items() if p not in COUNTED)
        return out

    def node_precisions(self) -> dict[str, list[str]]:
        """ONNX node -> the precisions of the compute layers that run it, in engine order."""
        out: dict[str, list[str]] = {}
        for layer in self.layers:
            if layer.role == COMPUTE:
                for node in layer.onnx_nodes:
                    out.setdefault(node, []).append(layer.precision)
        return out

    def not_int8(self, quantized: Iterable[str]) -> list[str]:
        """The nodes of ``quantized`` (those the Q/DQ model quantizes) that no INT8 or FP8 layer runs:
        either a layer in a float type runs them, or the engine names no layer after them."""
        ran = self.node_precisions()
        return [n for n in quantized if not any(p in ("int8", "fp8", "int4", "fp4") for p in ran.get(n, []))]

    def table(self) -> list[dict[str, Any]]:
        """One row per engine layer, for ``engine/layers_table.json`` (an MLflow table)."""
        return [
            {
                "index": i,
                "layer": layer.name,
                "type": layer.layer_type,
                "role": layer.role,
                "precision": layer.precision,
                "onnx_nodes": ", ".join(layer.onnx_nodes),
                "inputs": ", ".join(layer.inputs),
                "outputs": ", ".join(layer.outputs),
                "weights": layer.weights or "",
                "origin": layer.origin,
                "tactic": layer.tactic,
            }
            for i, layer in enumerate(self.layers)
        ]


def compute_precision(
    weights: str | None, inputs: Iterable[str], outputs: Iterable[str], pointwise: bool = False
) -> str:
    """What a layer computes in: its weights' type when it holds weights, else the narrowest float or
    quantized type among its inputs (index and mask inputs aside), else among its outputs.

    A ``pointwise`` layer (a generated elementwise kernel) that reads an INT8 tensor beside a float one
    dequantizes it and computes in the float type: there the widest input type counts."""
    if weights is not None and weights in COMPUTE_ORDER:
        return weights
    for side in (list(inputs), list(outputs)):
        found = [t for t in side if t in COMPUTE_ORDER]
        if found:
            pick = max if pointwise else min
            return pick(found, key=COMPUTE_ORDER.index)
        if side and all(t in INDEX_TYPES for t in side):
            return side[0]
    return "unknown"


def _split_top(text: str, seps: tuple[str, ...]) -> list[str]:
    """``text`` split at ``seps`` outside parentheses and brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            sep = next((s for s in seps if text.startswith(s, i)), None)
            if sep is not None:
                parts.append(text[start:i])
                i += len(sep)
                start = i
                continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def name_parts(name: str) -> list[str]:
    """The names a fused layer's name is made of: ``a + b`` (vertical fusion), ``a || b`` (horizontal),
    ``PWN(PWN(a), b)`` (a pointwise fusion), ``{ForeignNode[a...b]}`` (a Myelin region: only its
    first and last node are named). A reformat TensorRT inserted names no node of its own."""
    if _REFORMAT_PREFIX.match(name):
        return []
    out: list[str] = []
    for part in _split_top(name, (" + ", " || ")):
        foreign = _FOREIGN.match(part)
        if foreign:
            out += [p for p in foreign.group(1).split("...") if p]
        elif part.startswith("PWN(") and part.endswith(")"):
            out += [n for inner in _split_top(part[4:-1], (", ",)) for n in name_parts(inner)]
        else:
            out.append(part)
    return out


def _generated(part: str) -> bool:
    """A name TensorRT made up (an unnamed layer, a shuffle it added), not an ONNX node's."""
    return part.startswith(("(Unnamed Layer*", "copied_squeeze_after_", "unsqueeze_node_after_", "squeeze_after_"))


def node_names(layer: Mapping[str, Any] | str, onnx_nodes: Collection[str] | None = None) -> tuple[str, ...]:
    """The ONNX nodes an engine layer runs: from its ``Metadata`` (``[ONNX Layer: name]`` items,
    TensorRT 8.6+ with detailed verbosity) when it has them, else from the parts of its fused name.
    With ``onnx_nodes`` (the model's node names) only real node names are kept, so initializer names
    that appear in fused names (``conv1.weight + QuantizeLinear_7 + Conv_9``) drop out."""
    name = layer if isinstance(layer, str) else str(layer.get("Name", ""))
    metadata = "" if isinstance(layer, str) else str(layer.get("Metadata") or "")
    found = _METADATA_ITEM.findall(metadata) or name_parts(name)
    if onnx_nodes is not None:
        found = [n for n in found if n in onnx_nodes]
    else:
        found = [n for n in found if not _generated(n)]
    return tuple(dict.fromkeys(found))  # once each, in order


def _role(name: str, layer: Mapping[str, Any]) -> str:
    if layer.get("LayerType") == "NoOp":
        return NOOP
    if "Reformat" in (layer.get("LayerType"), layer.get("ParameterType")) or _REFORMAT_PREFIX.match(name):
        return REFORMAT
    return COMPUTE


def _layer(raw: Mapping[str, Any] | str, onnx_nodes: Collection[str] | None) -> EngineLayer:
    if isinstance(raw, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
        role = REFORMAT if _REFORMAT_PREFIX.match(raw) else COMPUTE
        return EngineLayer(raw, "", role, "unknown", (), (), None, node_names(raw, onnx_nodes))
    name = str(raw.get("Name", ""))
    inputs = tuple(type_of(t.get("Format/Datatype")) for t in raw.get("Inputs") or [] if isinstance(t, dict))
    outputs = tuple(type_of(t.get("Format/Datatype")) for t in raw.get("Outputs") or [] if isinstance(t, dict))
    weights_field = raw.get("Weights")
    weights = type_of(weights_field.get("Type")) if isinstance(weights_field, dict) else None
    return EngineLayer(
        name=name,
        layer_type=str(raw.get("LayerType", "")),
        role=_role(name, raw),
        precision=compute_precision(weights, inputs, outputs, raw.get("LayerType") in POINTWISE_TYPES),
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        onnx_nodes=node_names(raw, onnx_nodes),
        origin=str(raw.get("Origin", "")),
        tactic=str(raw.get("TacticName", "")),
    )


def _io_tensors(doc: Mapping[str, Any], raw_layers: list[Any]) -> tuple[str, tuple[IOTensor, ...]]:
    """The schema and the engine's inputs and outputs. TensorRT 10 lists binding names only: their
    mode, type and shape are read off the layers that read or write them."""
    if "I/O Tensors" in doc:
        out = []
        for t in doc["I/O Tensors"]:
            dims = t.get("Dimensions")
            out.append(
                IOTensor(
                    name=str(t.get("Name", "")),
                    mode=str(t.get("IOMode", "")).lower(),
                    dtype=type_of(t.get("DataType")),
                    shape=tuple(int(d) for d in dims) if isinstance(dims, list) else None,
                )
            )
        return IO_TENSORS, tuple(out)
    if "Bindings" in doc:
        seen: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for layer in raw_layers:
            if not isinstance(layer, dict):
                continue
            for mode, side in (("input", "Inputs"), ("output", "Outputs")):
                for t in layer.get(side) or []:
                    if isinstance(t, dict) and t.get("Name") in doc["Bindings"]:
                        seen.setdefault(str(t["Name"]), (mode, t))
        out = []
        for name in doc["Bindings"]:
            mode, t = seen.get(str(name), ("", {}))
            dims = t.get("Dimensions")
            shape = tuple(int(d) for d in dims) if isinstance(dims, list) else None
            out.append(IOTensor(str(name), mode, type_of(t.get("Format/Datatype")), shape))
        return BINDINGS, tuple(out)
    return "", ()


def parse(source: str | bytes | Mapping[str, Any], onnx_nodes: Collection[str] | None = None) -> EngineInfo:
    """An engine's inspector JSON (either schema, or one layer's JSON) as an :class:`EngineInfo`.

    ``onnx_nodes``: the node names of the ONNX model the engine was built from; given, a layer's ONNX
    nodes are only real ones. Raises ValueError on JSON that is not layer information."""
    doc = json.loads(source) if isinstance(source, str | bytes) else source
    if not isinstance(doc, dict):
        raise ValueError(f"engine information must be a JSON object, got {type(doc).__name__}")
    if "Layers" in doc:
        raw_layers = list(doc["Layers"])
    elif "Name" in doc:  # get_layer_information(i, JSON): one layer
        raw_layers = [doc]
    else:
        raise ValueError(f"no 'Layers' in the engine information (keys: {sorted(doc)[:8]})")
    schema, io = _io_tensors(doc, raw_layers)
    layers = tuple(_layer(raw, onnx_nodes) for raw in raw_layers)
    detailed = any(isinstance(raw, dict) for raw in raw_layers)
    return EngineInfo(schema=schema, detailed=detailed, layers=layers, io=io)
