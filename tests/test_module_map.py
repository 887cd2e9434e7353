"""docs/testing.md: which test files exercise each module, generated from the tests' imports.

Regenerate with ``python -m tests.test_module_map > docs/testing.md`` (a test fails while it is stale).
"""

from __future__ import annotations

from pathlib import Path

from tests.test_layering import ROOT, _imports

THROUGH_RUNS = "through pipeline runs"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def render() -> str:
    modules = sorted(
        _module(p)
        for folder in ("pipeline", "steps")
        for p in ROOT.joinpath(folder).rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    users: dict[str, set[str]] = {m: set() for m in modules}
    for test in sorted(ROOT.joinpath("tests").glob("test_*.py")):
        for _, imported in _imports(test):
            for m in modules:  # `from pipeline.sources import data` names the module itself
                if imported == m or imported.startswith(m + "."):
                    users[m].add(test.stem)
    lines = [
        "# Tests by module",
        "",
        "Generated from the tests' imports by `python -m tests.test_module_map > docs/testing.md`. A module",
        "that no test imports is exercised through whole pipeline runs (test_pipeline_digits, test_integration,",
        "test_examples, test_ray, test_sweep_reuse). Run one module's tests with `python -m pytest tests/<file>.py`;",
        '`python -m pytest -m "not slow"` is the fast tier (README, Tests).',
        "",
        "| module | tests |",
        "| --- | --- |",
    ]
    for m in modules:
        tests = ", ".join(sorted(users[m])) or f"({THROUGH_RUNS})"
        lines.append(f"| `{m}` | {tests} |")
    return "\n".join(lines) + "\n"


def test_docs_testing_md_is_current() -> None:
    committed = (ROOT / "docs" / "testing.md").read_text()
    assert committed == render(), "regenerate: python -m tests.test_module_map > docs/testing.md"


if __name__ == "__main__":
    print(render(), end="")
