"""Who produces, who reads and what is constant in an ONNX graph: the lookups the transforms share.

Bias correction, GPTQ, shifting, smoothing, equalization, keep-float and the per-layer tables all
walk the same Q/DQ structure ("the DequantizeLinear feeding this Conv's weight, the QuantizeLinear
behind it, the scale initializer it reads"). Each used to build its own producer, reader and
initializer dictionaries; one index gives every one of them the same answers to the small
questions (an empty name is "no tensor", a node reading a tensor twice is a reader twice).

The index is a **snapshot** of the graph at construction and never follows later edits. The
rewrites (shift.py, bias_correction.apply, smoothing, equalization) build theirs before editing and
keep deciding from the graph as it came in. Code that must see its own edits builds a new index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper


class _Arrays(Mapping[str, np.ndarray]):
    """Initializer values by name, decoded on first use and cached read-only (they are shared)."""

    def __init__(self, initializers: dict[str, onnx.TensorProto]):
        self._initializers = initializers
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._cache.get(name)
        if value is None:
            value = numpy_helper.to_array(self._initializers[name])
            value.flags.writeable = False
            self._cache[name] = value
        return value

    def __contains__(self, name: object) -> bool:  # Mapping's default decodes the array to test a name
        return name in self._initializers

    def __iter__(self) -> Iterator[str]:
        return iter(self._initializers)

    def __len__(self) -> int:
        return len(self._initializers)


class GraphIndex:
    """Producer, readers, initializers and named nodes of ``model``'s main graph (not its subgraphs)."""

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto):
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self.graph = graph
        self._producer = {o: n for n in graph.node for o in n.output if o}
        self._readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self._readers.setdefault(name, []).append(node)
        self._nodes = {n.name: n for n in graph.node if n.name}
        self._initializers = {i.name: i for i in graph.initializer}
        # a Mapping, so that helpers taking name -> array (model.dequantized) take it as it is
        self.arrays: Mapping[str, np.ndarray] = _Arrays(self._initializers)
        # as written: exporters for IR < 4 list the initializers among the graph inputs too
        self.inputs = frozenset(i.name for i in graph.input)
        self.outputs = frozenset(o.name for o in graph.output)
        self._types: dict[str, int] | None = None

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node computing ``tensor``; None for graph inputs, initializers and unknown names."""
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes reading ``tensor``, in graph order, once per input slot that reads it."""
        return list(self._readers.get(tensor, ()))

    def node(self, name: str) -> onnx.NodeProto | None:
        """The node called ``name`` (unnamed nodes cannot be looked up)."""
        return self._nodes.get(name)

    def initializer(self, name: str) -> onnx.TensorProto | None:
        return self._initializers.get(name)

    def array(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` (KeyError if it is none), read-only and cached."""
        return self.arrays[name]

    def value_type(self, name: str) -> int | None:
        """ONNX element type of ``name`` as the graph declares it (inputs, outputs, value_info,
        initializers); None where it declares none. No shape inference: see model.tensor_types."""
        if self._types is None:
            graph = self.graph
            infos = [*graph.value_info, *graph.output, *graph.input]
            types = {vi.name: vi.type.tensor_type.elem_type for vi in infos if vi.type.tensor_type.elem_type}
            types.update((i.name, i.data_type) for i in graph.initializer)
            self._types = types
        return self._types.get(name)
