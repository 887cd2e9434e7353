"""What would most likely pass a failed gate, ranked by what validate measured on this model.

Each suggestion is a setting with the share of the measured quantization noise it addresses: the
noise each quantized node adds (``added_sqnr_db`` of :func:`pipeline.analysis.layers.rank_quantized_nodes`,
as relative noise power). Keeping a node float removes its share; shifted activations
(``shift_activations``) halve the step of a one-sided activation (post-ReLU/SiLU: a symmetric INT8
grid spends half its levels on values it never takes), about three quarters of the noise it adds;
per-channel depthwise input scales (``depthwise_scales``, where they are off) address the noise the
depthwise Convs add, the part due to channels quieter than the loudest.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from pipeline.analysis import evaluation
from pipeline.calibration.ranges import Ranges
from pipeline.graph.graph_index import GraphIndex
from pipeline.transforms.depthwise_scales import SUFFIX as DEPTHWISE_SUFFIX
from pipeline.transforms.depthwise_scales import candidates as depthwise_candidates
from pipeline.transforms.shift import SHIFT_SUFFIX

ONE_SIDED = 0.05  # a tensor whose minimum is above -5% of its amax has (almost) no negative values
SHIFT_GAIN = 0.75  # the noise a halved quantization step removes: (1 - 1/4)
MAX_FLOAT = 8  # nodes recovery may keep float, at most, in a suggestion


@dataclass(frozen=True)
class Suggestion:
    setting: str  # as the user writes it: a YAML key and value
    share: float  # of the measured quantization noise it addresses (0..1)
    why: str  # the measurement

    def line(self) -> str:
        return f"{self.setting} ({self.why})"


def suggest(
    fp32_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    quantized_nodes: list[dict],
    ranges: Ranges | None,
    target: str,
) -> list[Suggestion]:
    """The settings most likely to pass, largest measured share first; [] without a ranking."""
    noise = {r["node"]: evaluation.relative_noise(r["added_sqnr_db"]) for r in quantized_nodes}
    total = sum(noise.values())
    if not noise or total <= 0:
        return []
    out = []
    ordered = sorted(noise, key=noise.__getitem__, reverse=True)
    running, count = 0.0, 0
    for node in ordered[:MAX_FLOAT]:  # the fewest nodes holding half the noise, at most MAX_FLOAT
        running += noise[node]
        count += 1
        if running >= 0.5 * total:
            break
    out.append(
        Suggestion(
            f"steps.validate.recover: {{max_fp_nodes: {count}}}",
            running / total,
            f"the {count} quantized node(s) adding the most error add {running / total:.0%} of it",
        )
    )
    shifted = any(n.name.endswith(SHIFT_SUFFIX) for n in int8_model.graph.node)
    if ranges is not None and target == "tensorrt" and not shifted:
        index = GraphIndex(fp32_model)
        one_sided = [n for n in ordered if _one_sided_input(index, n, ranges)]
        if one_sided:
            share = sum(noise[n] for n in one_sided) / total
            out.append(
                Suggestion(
                    "steps.quantize.shift_activations: true",
                    SHIFT_GAIN * share,
                    f"{len(one_sided)} of {len(ordered)} quantized nodes read a one-sided activation "
                    f"(post-ReLU/SiLU) on a symmetric grid that wastes half its levels; they add {share:.0%} "
                    "of the error",
                )
            )
    scaled = any(n.name.endswith(DEPTHWISE_SUFFIX + "_mul") for n in int8_model.graph.node)
    if not scaled:
        depthwise = {c.node.name for item in depthwise_candidates(fp32_model) for c in item.consumers}
        ranked = [n for n in ordered if n in depthwise]
        if ranked:
            share = sum(noise[n] for n in ranked) / total
            cost = " (on ONNX Runtime's CPU kernels a float Mul per depthwise Conv costs latency)" if (
                target == "onnxruntime") else ""  # fmt: skip
            out.append(
                Suggestion(
                    "steps.quantize.depthwise_scales: true",
                    share,
                    f"{len(ranked)} depthwise Conv(s) read an input with one scale for all its channels and add "
                    f"{share:.0%} of the error; per-channel scales give the quiet channels their own{cost}",
                )
            )
    return sorted(out, key=lambda s: s.share, reverse=True)


def _one_sided_input(index: GraphIndex, node_name: str, ranges: Ranges) -> bool:
    node = index.node(node_name)
    if node is None or node.op_type != "Conv" or not node.input:  # shift_activations rewrites Conv inputs
        return False
    r = ranges.tensors.get(node.input[0])
    return r is not None and r.amax > 0 and r.min >= -ONE_SIDED * r.amax
