"""Accuracy recovery: keep the quantized nodes that hurt the task metric most in float until the
accuracy gate passes. Graph surgery on the Q/DQ model already built (never quantizing again) and
scoring against a cached FP32 reference; plain numerics, no tracking.

1. Preselect ``max(2 * max_fp_nodes, 8)`` of the quantized nodes by their sensitivity: each kept
   alone in float, the gain in the output's cosine to FP32 on the first ``sensitivity_samples``
   samples (a continuous measure: a few samples rank it, where a discrete metric needs many). The
   error a node's own quantization adds (``added_sqnr_db``, :func:`pipeline.analysis.layers.rank_quantized_nodes`)
   misses where error is amplified downstream: on EfficientNet-Lite0 the first depthwise Conv and
   the stem rank 33rd and 34th of 59 candidates by it, 1st and 6th by sensitivity, and every choice
   that did well held out keeps them float (benchmarks/recovery_bound.py). Nodes the time budget leaves
   unmeasured follow in ``added_sqnr_db`` order.
2. Rank: keep each candidate alone in float and score the model on the first ``ranking_samples``
   validation samples; sort by metric gain (ties by the gain in output cosine to FP32, then by SQNR
   rank). One cheap evaluation per candidate instead of one full validation. A built-in metric's
   gain that is not significant counts as a tie: within :func:`noise_z` standard errors of zero
   (paired, sample by sample), a two-sided test at 5% over all the candidates ranked together
   (Bonferroni: among 8 candidates, one gain past 2 standard errors turns up by chance about one time
   in three). On 64 samples top-1 agreement moves in steps of 1/64, and flips of a few unsure samples
   otherwise outrank the cosine: on EfficientNet-Lite0 with GPTQ every candidate's agreement gain was
   -1 to -4 crops of 64, and the node whose float kept the most cosine (twice the next) ranked 4th.
3. Revert greedily in that order, one more node at a time, each model scored on the whole
   validation set, until the gate passes, ``max_fp_nodes`` nodes are float, the candidates run out
   or the time budget (checked before each evaluation) is spent.
4. Hand on the best model scored (lowest drop; ties: fewer float nodes), not merely the last: a
   revert can cost accuracy where the error is spread over many layers (bias correction fitted each
   layer to its quantized neighbours), and a model no better than the quantized one is not worth
   its float layers. A later revert may still undo an earlier one's harm (two nodes whose errors
   cancel), so the greedy phase goes on past a bad step rather than dropping it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import onnx

from pipeline.analysis import evaluation
from pipeline.analysis.scoring import Scorer, Scores
from pipeline.log import logger, progress
from pipeline.transforms.keep_float import keep_float_inputs

GATE_PASSED = "gate passed"
MAX_FP_NODES = "max_fp_nodes"
TIME_BUDGET = "time budget"
EXHAUSTED = "candidates exhausted"
MIN_CANDIDATES = 8
SENSITIVITY_SAMPLES = 8
FAMILY_ERROR = 0.05  # chance that any of the ranked candidates' metric gains passes as real by noise alone


@dataclass
class Iteration:
    reverted: list[str]  # the nodes kept in float, in the order they were reverted
    scores: Scores  # the model with those nodes float, on the whole validation set

    def to_json(self) -> dict[str, Any]:
        return {"reverted": self.reverted, "metric": self.scores.int8, "drop_se": self.scores.drop_se}


@dataclass
class Recovery:
    """What recovery did: the nodes kept float, every model scored on the way, why it stopped."""

    reverted: list[str]  # the nodes float in the chosen model (``iterations[chosen]``)
    iterations: list[Iteration]  # the first is the quantized model as built (nothing reverted)
    passed: bool
    stopped: str  # GATE_PASSED | MAX_FP_NODES | TIME_BUDGET | EXHAUSTED
    candidates: list[dict[str, Any]] = field(default_factory=list)  # preselected, with measured gains
    ranking_samples: int = 0
    sensitivity_samples: int = 0  # 0: every quantized node was a candidate, no preselection ran
    seconds: float = 0.0
    model: onnx.ModelProto | None = None  # the recovered model (None when nothing was reverted)
    chosen: int = 0  # the iteration handed on

    @property
    def scores(self) -> Scores:
        """The chosen model's scores on the whole validation set."""
        return self.iterations[self.chosen].scores

    def to_json(self) -> dict[str, Any]:
        return {
            "reverted": self.reverted,
            "chosen": self.chosen,
            "iterations": [it.to_json() for it in self.iterations],
            "passed": self.passed,
            "stopped": self.stopped,
            "metric": self.scores.metric.name,
            "fp32": self.scores.fp32,
            "ranking_samples": self.ranking_samples,
            "sensitivity_samples": self.sensitivity_samples,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
        }


def revert(qdq: onnx.ModelProto, fp32: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """A copy of ``qdq`` with ``nodes`` reading float inputs and weights (the FP32 model's values)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    return keep_float_inputs(model, fp32, nodes)


def recover(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    scorer: Scorer,
    baseline: Scores,
    ranked: list[dict[str, Any]],
    max_drop: float,
    max_fp_nodes: int = 8,
    time_budget_s: float | None = None,
    ranking_samples: int = 64,
    on_iteration: Callable[[int, Iteration], None] | None = None,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
    clock: Callable[[], float] = time.monotonic,
) -> Recovery:
    """Recover accuracy for ``qdq`` (scored ``baseline`` on the whole validation set by ``scorer``).

    ``ranked`` are the quantized nodes, worst ``added_sqnr_db`` first. ``on_iteration(k, it)`` is
    called for the baseline (k = 0) and after each model scored in the greedy phase.
    """
    start = clock()

    def spent() -> bool:
        return time_budget_s is not None and clock() - start >= time_budget_s

    iterations = [Iteration([], baseline)]
    if on_iteration is not None:
        on_iteration(0, iterations[0])
    n = min(ranking_samples, scorer.samples)
    result = Recovery([], iterations, False, "", ranking_samples=n)
    if max_fp_nodes <= 0:
        result.stopped = MAX_FP_NODES
    elif spent():
        result.stopped = TIME_BUDGET
    else:
        scored: dict[tuple[str, ...], Scores] = {}  # whole-set scores already known, by nodes reverted
        size = max(2 * max_fp_nodes, MIN_CANDIDATES)
        pool = ranked
        if len(ranked) > size:
            result.sensitivity_samples = min(sensitivity_samples, n)
            pool = _preselect(qdq, fp32, scorer, baseline, ranked, result.sensitivity_samples, spent)[:size]
        result.candidates = _rank(qdq, fp32, scorer, baseline, pool, n, spent, scored)
        result.stopped = _greedy(qdq, fp32, scorer, result, max_drop, max_fp_nodes, spent, on_iteration, scored)
    # hand on the best model scored (lowest drop, then fewest float nodes): possibly an earlier one
    result.chosen = min(range(len(iterations)), key=lambda k: (iterations[k].scores.drop, k))
    best = iterations[result.chosen]
    if best.reverted != result.reverted:
        logger.info(
            "validate: recovery keeps iteration %d (%d node(s) float): the best %s scored, %.4f",
            result.chosen,
            len(best.reverted),
            best.scores.metric.name,
            best.scores.int8,
        )
        result.reverted = best.reverted
        result.model = revert(qdq, fp32, best.reverted) if best.reverted else None
    result.passed = result.stopped == GATE_PASSED
    result.seconds = clock() - start
    return result


def _preselect(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    scorer: Scorer,
    baseline: Scores,
    ranked: list[dict[str, Any]],
    n: int,
    spent: Callable[[], bool],
) -> list[dict[str, Any]]:
    """``ranked`` sorted by ``sensitivity``: the gain in mean output cosine to FP32 on the first ``n``
    samples when the node alone is float (ties and nodes left unmeasured by the time budget keep
    their ``added_sqnr_db`` order)."""
    base = float(scorer.evaluate({k: v[:n] for k, v in baseline.outputs.items()}).cosines().mean())
    gains: dict[int, float] = {}
    for k in progress(range(len(ranked)), "recovery sensitivity", total=len(ranked), unit="nodes"):
        if spent():
            break
        got = scorer.score(revert(qdq, fp32, [ranked[k]["node"]]), limit=n)
        gains[k] = float(got.cosines().mean()) - base
    order = sorted(gains, key=lambda k: (-gains[k], k)) + [k for k in range(len(ranked)) if k not in gains]
    return [{**ranked[k], "sensitivity": gains.get(k)} for k in order]


def _rank(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    scorer: Scorer,
    baseline: Scores,
    pool: list[dict[str, Any]],
    n: int,
    spent: Callable[[], bool],
    scored: dict[tuple[str, ...], Scores],
) -> list[dict[str, Any]]:
    """``pool`` with each node's gain when kept float alone, on the first ``n`` samples, best first
    (unmeasured ones, when the time budget ran out, last and marked ``gain: null``). When ``n`` is
    the whole validation set the scores go to ``scored``: the greedy phase's first model is one of them."""
    base = scorer.evaluate({k: v[:n] for k, v in baseline.outputs.items()})
    base_cos = float(base.cosines().mean())
    rows = []
    for k, cand in enumerate(pool):
        row: dict[str, Any] = {
            "node": cand["node"],
            "op_type": cand["op_type"],
            "added_sqnr_db": cand["added_sqnr_db"],
            "sensitivity": cand.get("sensitivity"),
            "gain": None,
            "gain_se": None,
            "cosine_gain": None,
        }
        if not spent():
            got = scorer.score(revert(qdq, fp32, [cand["node"]]), limit=n)
            if got.samples == scorer.samples:
                scored[(cand["node"],)] = got
            row["gain"] = got.int8 - base.int8
            row["gain_se"] = got.gain_se(base)
            row["cosine_gain"] = float(got.cosines().mean()) - base_cos
            logger.info(
                "validate: recovery ranking %d/%d: %s alone in float: %s %+.4f%s, cosine %+.5f, on %d samples",
                k + 1,
                len(pool),
                cand["node"],
                base.metric.name,
                row["gain"],
                "" if row["gain_se"] is None else f" ± {row['gain_se']:.4f}",
                row["cosine_gain"],
                n,
            )
        rows.append((row, k))
    z = noise_z(sum(r["gain"] is not None for r, _ in rows))
    measured = sorted(
        (r for r in rows if r[0]["gain"] is not None), key=lambda r: (-_evident(r[0], z), -r[0]["cosine_gain"], r[1])
    )
    return [r for r, _ in measured] + [r for r, _ in rows if r["gain"] is None]


def noise_z(candidates: int) -> float:
    """Standard errors a gain must pass to count, among ``candidates`` ranked together (1: 1.96, 8: 2.73)."""
    return NormalDist().inv_cdf(1.0 - FAMILY_ERROR / (2 * max(candidates, 1)))


def _evident(row: dict[str, Any], z: float) -> float:
    """A candidate's metric gain, or 0.0 when it is within ``z`` standard errors of zero."""
    gain, se = row["gain"], row["gain_se"]
    return 0.0 if se is not None and abs(gain) <= z * se else float(gain)


def _greedy(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    scorer: Scorer,
    result: Recovery,
    max_drop: float,
    max_fp_nodes: int,
    spent: Callable[[], bool],
    on_iteration: Callable[[int, Iteration], None] | None,
    scored: dict[tuple[str, ...], Scores],
) -> str:
    """Revert ``result.candidates`` one more at a time in order; fills ``result``, returns why it stopped."""
    for cand in result.candidates:
        if len(result.reverted) >= max_fp_nodes:
            return MAX_FP_NODES
        if spent() or cand["gain"] is None:
            return TIME_BUDGET
        nodes = [*result.reverted, cand["node"]]
        model = revert(qdq, fp32, nodes)
        scores = scored.get(tuple(nodes)) or scorer.score(model)
        it = Iteration(nodes, scores)
        result.reverted, result.model = nodes, model
        result.iterations.append(it)
        k = len(result.iterations) - 1
        logger.info(
            "validate: recovery %d: %d node(s) float (%s): %s %.4f, drop %.4f (max %.4f)",
            k,
            len(nodes),
            cand["node"],
            scores.metric.name,
            scores.int8,
            scores.drop,
            max_drop,
        )
        if on_iteration is not None:
            on_iteration(k, it)
        if evaluation.gate_passed(scores.drop, max_drop):
            return GATE_PASSED
    return MAX_FP_NODES if len(result.reverted) >= max_fp_nodes else EXHAUSTED
