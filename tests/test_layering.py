"""The import floors of pipeline/ and steps/: a module imports only its own folder and the floors below.

README.md (Layout) describes these floors; a new import that runs up a floor, or a circle, fails here
with the file and the import, so the layering is kept on purpose or changed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first; each may import the ones before it
FLOORS = [
    {"errors", "log", "tag_names", "limits", "user_code", "launch", "__init__"},
    {"graph"},
    {"execution"},
    {"sources"},
    {"settings"},
    {"calibration"},
    {"transforms"},
    {"analysis"},
    {"mlflow_io"},
    {"steps"},
    {"orchestration"},
    {"__main__"},
]
FLOOR = {part: i for i, parts in enumerate(FLOORS) for part in parts}


def _part(module: str) -> str | None:
    """The floor part a dotted module belongs to: a pipeline/ folder or top-level file, or steps."""
    names = module.split(".")
    if names[0] == "steps":
        return "steps"
    if names[0] != "pipeline":
        return None
    return names[1] if len(names) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every pipeline/steps module ``path`` imports (at any depth, TYPE_CHECKING included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import x`: x is the module when it is one
            base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                exists = (ROOT / sub.replace(".", "/")).is_dir() or (ROOT / (sub.replace(".", "/") + ".py")).is_file()
                out.append((node.lineno, sub if exists else base))
    return out


def test_every_import_stays_on_its_floor_or_goes_down() -> None:
    ups = []
    files = [*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("steps").rglob("*.py")]
    assert len(files) > 60
    for path in files:
        rel = path.relative_to(ROOT)
        own = _part(".".join(rel.with_suffix("").parts))
        assert own in FLOOR, f"{rel}: a new folder or top-level module; give it a floor in FLOORS and README.md"
        for line, module in _imports(path):
            other = _part(module)
            if other is None or other == own:
                continue
            assert other in FLOOR, f"{rel}:{line} imports {module}, which has no floor"
            if FLOOR[other] > FLOOR[own]:
                ups.append(f"{rel}:{line} imports {module} ({other} is above {own})")
    assert ups == [], "imports that run up a floor:\n" + "\n".join(ups)


def test_numerics_never_import_mlflow() -> None:
    """Calibration, transforms and analysis run without a tracking server (benchmarks, other tools)."""
    offenders = []
    for folder in ("calibration", "transforms", "analysis", "graph", "sources", "settings", "execution"):
        for path in ROOT.joinpath("pipeline", folder).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}:{ln}" for ln, m in _imports(path) if m.split(".")[0] == "mlflow"]
    assert offenders == []
