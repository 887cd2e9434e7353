"""The fast tier, `python -m pytest -m "not slow"`, runs no pipeline: every test that runs one is marked slow.

Read from the test sources (ast), nothing run: a test runs a pipeline when it, a fixture it requests or
a helper of its module, transitively,

- calls conftest's ``run_pipeline`` (a whole run that must succeed);
- compares the exit code of the CLI's ``main`` (a ``run``, not ``cache show``; directly or through a
  module helper returning it) with 0 or ``EXIT_GATE_FAILED``: every step up to the gate ran;
- starts the pipeline in another process: ``python -m pipeline``, ``mlflow run``, or ``sys.executable``
  with a script and ``*run_args(...)``;
- or requests a real server or cluster (``mlflow_server``, ``ray_cluster``).

A run that stops at a configuration or data error (exit 2) is a fast test and stays in the tier. The
reading is a guard, not a proof: a test that hides its run from it is still the author's to mark.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

TESTS = ROOT / "tests"
EXIT_GATE_FAILED = 3  # the CLI's, read not imported: this file tests the suite, not the CLI (docs/testing.md)
RUN_CODES = {0, EXIT_GATE_FAILED}
RUN_CODE_NAMES = {"EXIT_GATE_FAILED"}
SERVER_FIXTURES = {"mlflow_server", "ray_cluster"}
CLI = "main"  # pipeline.orchestration.cli.main, imported under this name by every test module

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _calls(node: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    """Every call of a plain name under ``node``: ``(name, call)``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
            yield sub.func.id, sub


def _not_a_run(call: ast.Call) -> bool:
    """A CLI call whose argument list starts with another command (``cache``, ``--version``)."""
    first = call.args[0] if call.args else None
    return (
        isinstance(first, ast.List)
        and bool(first.elts)
        and isinstance(first.elts[0], ast.Constant)
        and first.elts[0].value != "run"
    )


def _is_run_code(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return not isinstance(node.value, bool) and node.value in RUN_CODES
    return isinstance(node, ast.Name | ast.Attribute) and ast.unparse(node).split(".")[-1] in RUN_CODE_NAMES


def _bound_to(fn: Function, is_source: Any) -> set[str]:
    """Names ``fn`` binds to a value ``is_source`` accepts: ``x = f(...)``, or ``x, y = f(...)`` for x."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and is_source(node.value):
            for target in node.targets:
                first = target.elts[0] if isinstance(target, ast.Tuple) and target.elts else target
                if isinstance(first, ast.Name):
                    names.add(first.id)
    return names


def _starts_a_pipeline_process(fn: Function) -> bool:
    def is_run_args(node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and ast.unparse(node.func) == "run_args"

    run_args = _bound_to(fn, is_run_args)
    for node in ast.walk(fn):
        if not isinstance(node, ast.List | ast.Tuple):
            continue
        parts = [ast.unparse(e) for e in node.elts]
        for a, b in zip(parts, parts[1:]):
            if (a, b) == ("'-m'", "'pipeline'") or (b == "'run'" and ("mlflow" in a or "int8pipe" in a)):
                return True
        starred = [e.value for e in node.elts if isinstance(e, ast.Starred)]
        if "sys.executable" in parts and any(is_run_args(v) or ast.unparse(v) in run_args for v in starred):
            return True
    return False


def _direct_reasons(fn: Function, cli: set[str]) -> list[str]:
    """Why ``fn``'s own body runs a pipeline ([] when it does not)."""
    reasons = []
    if any(name == "run_pipeline" for name, _ in _calls(fn)):
        reasons.append("calls run_pipeline")
    if _starts_a_pipeline_process(fn):
        reasons.append("starts the pipeline in a subprocess")
    servers = {a.arg for a in fn.args.args + fn.args.kwonlyargs} & SERVER_FIXTURES
    if servers:
        reasons.append(f"requests {', '.join(sorted(servers))}")

    def is_cli_run(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in cli
            and not _not_a_run(node)
        )

    codes = _bound_to(fn, is_cli_run)  # `code = main(...)`, `code, err = run_cli(...)`
    for node in ast.walk(fn):
        if not isinstance(node, ast.Compare) or not all(isinstance(op, ast.Eq) for op in node.ops):
            continue
        left = node.left
        if is_cli_run(left) or (isinstance(left, ast.Name) and left.id in codes):
            expected = [c for c in node.comparators if _is_run_code(c)]
            if expected:
                reasons.append(f"expects exit {ast.unparse(expected[0])} from a CLI run")
                break
    return reasons


def pipeline_tests(path: Path) -> dict[str, list[str]]:
    """The tests of module ``path`` that run a pipeline, each with why."""
    tree = ast.parse(path.read_text(), str(path))
    functions: dict[str, Function] = {
        n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    fixtures = {name for name, fn in functions.items() if any("fixture" in ast.unparse(d) for d in fn.decorator_list)}
    # the CLI, and the module's helpers that call it and return something (run_cli, _run, ...)
    cli = {CLI} | {
        name
        for name, fn in functions.items()
        if any(c == CLI for c, _ in _calls(fn)) and any(isinstance(n, ast.Return) and n.value for n in ast.walk(fn))
    }
    direct = {name: _direct_reasons(fn, cli) for name, fn in functions.items()}

    def reached(name: str) -> set[str]:
        """``name`` and the module functions and fixtures it calls or requests, transitively."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            fn = functions[current]
            todo += [c for c, _ in _calls(fn) if c in functions]
            todo += [a.arg for a in fn.args.args if a.arg in fixtures]
        return seen

    found = {}
    for name in functions:
        if name.startswith("test_"):
            why = [f"{'' if via == name else via + ': '}{r}" for via in sorted(reached(name)) for r in direct[via]]
            if why:
                found[name] = why
    return found


def _marks(obj: Any) -> set[str]:
    marks = getattr(obj, "pytestmark", [])
    return {m.name for m in (marks if isinstance(marks, list) else [marks])}


def _modules() -> Iterator[tuple[Path, Any]]:
    for path in sorted(TESTS.glob("test_*.py")):
        yield path, importlib.import_module(f"tests.{path.stem}")


def test_every_test_that_runs_a_pipeline_is_marked_slow() -> None:
    unmarked = [
        f"{path.name}::{name} ({'; '.join(why)})"
        for path, module in _modules()
        for name, why in pipeline_tests(path).items()
        if "slow" not in _marks(module) | _marks(getattr(module, name))
    ]
    assert unmarked == [], "mark these @pytest.mark.slow (or their module: pytestmark = pytest.mark.slow):\n" + (
        "\n".join(unmarked)
    )


def test_ray_tests_are_slow() -> None:
    for path, module in _modules():
        for name in dir(module):
            if name.startswith("test_"):
                marks = _marks(module) | _marks(getattr(module, name))
                assert "ray" not in marks or "slow" in marks, f"{path.name}::{name} is marked ray, not slow"


@pytest.mark.parametrize(
    ("module", "test", "runs"),
    [
        ("test_pipeline_digits", "test_run_tree", True),  # through its module-scoped fixture
        ("test_integration", "test_mlflow_run_quick_start", True),  # `mlflow run`
        ("test_reliability", "test_signal_marks_runs_killed_and_cleans_up", True),  # `python -m pipeline`
        ("test_store_errors", "test_full_tracking_store_names_the_store_and_exits_2", True),  # script *args
        ("test_errors", "test_failed_gate", True),  # exit 3 through the module's run_cli
        ("test_equalization", "test_without_samples_or_with_per_channel_weights_it_says_so", True),  # main() == 0
        ("test_validation", "test_custom_metric_gets_every_output_and_the_fp32_reference", True),  # code, s = _run()
        ("test_registry", "test_concurrent_promotions_end_on_the_best", True),  # mlflow_server
        ("test_errors", "test_data_errors_are_found_before_any_run", False),  # exit 2: a data error
        ("test_store_errors", "test_calibrate_memory_mb_must_be_positive", False),  # exit 2: a config error
        ("test_trt_cache", "test_cache_show_cli", False),  # `cache show`, not `run`
        ("test_calibrator", "test_minmax_ranges_equal_numpy", False),
    ],
)
def test_the_reading_tells_pipeline_runs_from_the_rest(module: str, test: str, runs: bool) -> None:
    """The reading above still recognises the suite's ways of running a pipeline, and only those."""
    path = TESTS / f"{module}.py"
    assert f"def {test}(" in path.read_text(), f"{module}.{test} is gone: pick another example here"
    assert (test in pipeline_tests(path)) == runs


def test_the_gate_failed_code_is_the_clis() -> None:
    defined = {
        m.group(1)
        for path in ROOT.joinpath("pipeline").rglob("*.py")
        for m in re.finditer(r"^EXIT_GATE_FAILED = (\d+)$", path.read_text(), re.M)
    }
    assert defined == {str(EXIT_GATE_FAILED)}
