"""Code the YAML names runs only where it is named: the user's folders serve the user's own modules,
only while int8pipe calls into them, and what that code does wrong is one int8pipe paragraph.

Real files in a temporary folder, imported through :func:`pipeline.user_code.import_object` and read
through the data layer as a pipeline reads them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.errors import ConfigError, DataError, UserCodeError
from pipeline.orchestration.cli import main
from pipeline.sources import data
from pipeline.sources.spec import DataSource
from pipeline.user_code import import_object
from tests.conftest import BIN, env_without_mlflow, run_args

SPECS: data.Specs = {"x": (["batch", 3], np.dtype(np.float32))}
# what MLflow and its dependencies probed for in the folder of a YAML during one run (issue: each was run)
PROBED = ["IPython", "pyspark", "dbruntime", "gitdb_speedups", "zstandard"]


PREFIXES = ("source_", "helper_", "sibling_", "pkg_", "probe_", "other_")


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@pytest.fixture
def clean_imports() -> object:
    """sys.path, sys.meta_path and the user modules a test imports, as they were before it."""
    path, meta, modules = list(sys.path), list(sys.meta_path), set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        if name.startswith(PREFIXES):
            del sys.modules[name]
    sys.path[:], sys.meta_path[:] = path, meta


def test_nothing_of_the_user_folder_stays_on_the_import_path(tmp_path: Path, clean_imports: object) -> None:
    module, probe = _unique("source"), _unique("probe")
    marker = tmp_path / "probe-ran"
    (tmp_path / f"{probe}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / f"{module}.py").write_text("def f():\n    return 7\n")
    path, meta = list(sys.path), list(sys.meta_path)
    fn = import_object(f"{module}:f", [tmp_path], "steps.validate.metric")
    assert fn() == 7
    assert sys.path == path and sys.meta_path == meta  # the old finder stayed on sys.meta_path for good
    with pytest.raises(ModuleNotFoundError):  # what a library probing for an optional module gets
        importlib.import_module(probe)
    assert not marker.exists()


def test_a_library_the_user_code_calls_cannot_import_from_the_user_folder(
    tmp_path: Path, clean_imports: object
) -> None:
    """While the user's function runs, an import asked for by a library (pkgutil here, MLflow's probes
    in a run) does not see the folder; the user's own import of the same file does."""
    module, sibling = _unique("source"), _unique("sibling")
    (tmp_path / f"{sibling}.py").write_text("VALUE = 3\n")
    (tmp_path / f"{module}.py").write_text(
        "import pkgutil\n\n"
        "def by_library():\n"
        f"    return pkgutil.resolve_name({sibling!r} + ':VALUE')\n\n"
        "def by_user():\n"
        f"    import {sibling}\n"
        f"    return {sibling}.VALUE\n"
    )
    assert pkgutil  # the library used above
    by_library = import_object(f"{module}:by_library", [tmp_path], "data.calibration.python")
    with pytest.raises(UserCodeError, match="raised ModuleNotFoundError"):
        by_library()
    assert import_object(f"{module}:by_user", [tmp_path], "data.calibration.python")() == 3


def test_lazy_imports_work_while_int8pipe_calls_the_code_and_packages_at_any_time(
    tmp_path: Path, clean_imports: object
) -> None:
    """The decided behaviour for imports made after import_object returned: a sibling file imported
    in a function's body works while int8pipe calls it; code called later by others (a callback kept
    and run outside int8pipe's call) does not find a sibling file, but does find a package's
    submodule (through the package's __path__)."""
    module, helper, pkg = _unique("source"), _unique("helper"), _unique("pkg")
    (tmp_path / f"{helper}.py").write_text("OFFSET = 10\n")
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "late.py").write_text("VALUE = 5\n")
    (tmp_path / f"{module}.py").write_text(
        f"import {pkg}\n\n"
        "def now(x):\n"
        f"    import {helper}  # a sibling file, imported at call time\n"
        f"    return x + {helper}.OFFSET\n\n"
        "def callback():\n"
        "    def later():\n"
        f"        import {_unique('other')}\n"
        "    def from_package():\n"
        f"        from {pkg} import late\n"
        "        return late.VALUE\n"
        "    return later, from_package\n"
    )
    assert import_object(f"{module}:now", [tmp_path], "steps.validate.metric")(1) == 11
    later, from_package = import_object(f"{module}:callback", [tmp_path], "steps.validate.metric")()
    with pytest.raises(ModuleNotFoundError):
        later()  # outside any call of int8pipe's: the folder is not searched
    assert from_package() == 5


def test_a_generator_source_imports_lazily_while_it_is_read(tmp_path: Path, clean_imports: object) -> None:
    module, helper = _unique("source"), _unique("helper")
    (tmp_path / f"{helper}.py").write_text("import numpy as np\nROW = np.ones(3, np.float32)\n")
    (tmp_path / f"{module}.py").write_text(
        "def batches(n):\n"
        "    for i in range(n):\n"
        f"        from {helper} import ROW  # imported between two batches\n"
        "        yield {'x': (ROW * i)[None]}\n"
    )
    src = DataSource(python=f"{module}:batches", args={"n": 3})
    meta = list(sys.meta_path)
    got = list(data.batches(src, 4, SPECS, [tmp_path], "data.calibration"))
    assert [float(b["x"][0, 0]) for b in got] == [0.0, 1.0, 2.0]
    assert sys.meta_path == meta


@pytest.mark.parametrize(
    ("body", "error", "expected"),
    [
        ("return 42", DataError, "data.calibration.python: {spec} returned 42 (int); yield"),
        ("return None", DataError, "data.calibration.python: {spec} returned None (NoneType); yield"),
        ("return {'x': np.zeros((1, 3))}", DataError, "returned a single mapping, not batches"),
        ("return [{'x': [[1.0, 2.0, 3.0], [4.0]]}]", DataError, "batch 0, input 'x' is not an array"),
        ("raise ValueError('no such shard')", UserCodeError, "{spec} raised ValueError: no such shard"),
        ("yield {'x': np.zeros((1, 3), np.float32)}\n    sys.exit(0)", UserCodeError, "called sys.exit(0)"),
    ],
)
def test_what_a_python_source_does_wrong_is_one_paragraph_naming_it(
    tmp_path: Path, clean_imports: object, body: str, error: type[Exception], expected: str
) -> None:
    module = _unique("source")
    (tmp_path / f"{module}.py").write_text(f"import sys\nimport numpy as np\n\ndef make():\n    {body}\n")
    spec = f"{module}:make"
    src = DataSource(python=spec)
    with pytest.raises(error) as info:
        list(data.batches(src, 4, SPECS, [tmp_path], "data.calibration"))
    assert expected.format(spec=spec) in str(info.value)
    if isinstance(info.value, UserCodeError):  # the user's own traceback, from their file on
        assert f'{module}.py", line' in info.value.user_traceback
        assert "pipeline/" not in info.value.user_traceback


def test_a_module_that_fails_to_import_is_a_config_error(tmp_path: Path, clean_imports: object) -> None:
    module = _unique("source")
    (tmp_path / f"{module}.py").write_text(f"import {_unique('missing_dependency')}\n")
    with pytest.raises(ConfigError, match="cannot import module"):
        import_object(f"{module}:f", [tmp_path], "data.calibration.python")


def _python_source_pipeline(folder: Path, body: str, validate: bool = True) -> Path:
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "digits", folder, dirs_exist_ok=True)
    (folder / "src.py").write_text(
        f"import sys\nimport numpy as np\n\ndef batches():\n    x = np.load('data/calibration.npz')['input']\n{body}\n"
    )
    steps = {"export": {}, "calibrate": {"method": "minmax"}, "quantize": {}}
    if validate:
        steps["validate"] = {"metric": "top1", "max_drop": 0.05}
    config = {
        "name": "user-code",
        "model": {"onnx": "model.onnx"},
        "data": {"calibration": {"python": "src:batches"}, "validation": {"npz": "data/validation.npz"}},
        "steps": steps,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_source_that_exits_mid_run_fails_the_run_with_exit_2(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sys.exit(0) after the first batch: before, exit 0 and "gate": "passed" while the runs said FAILED."""
    config = _python_source_pipeline(tmp_path / "p", "    yield {'input': x[:32]}\n    sys.exit(0)")
    monkeypatch.chdir(config.parent)
    summary = tmp_path / "s.json"
    assert main(run_args(config, tracking_uri, summary)) == 2
    err = capsys.readouterr().err
    assert 'src.py", line 7, in batches\n    sys.exit(0)' in err  # the user's traceback, then int8pipe's paragraph
    last = err.strip().splitlines()[-1]
    assert last.startswith("int8pipe: error: ") and "src:batches called sys.exit(0)" in last
    s = json.loads(summary.read_text())
    assert s["gate"] == "not run"
    assert MlflowClient(tracking_uri).get_run(s["run_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_probed_module_names_in_the_yaml_folder_are_never_imported(tmp_path: Path, tracking_uri: str) -> None:
    """IPython.py, pyspark.py, dbruntime.py, gitdb_speedups.py, zstandard.py beside a python: source
    (the YAML folder is the working directory): before, MLflow's probes ran every one of them and the
    zstandard one crashed the run."""
    config = _python_source_pipeline(
        tmp_path / "p", "    for i in range(0, 256, 64):\n        yield {'input': x[i:i+64]}"
    )
    markers = tmp_path / "markers"
    markers.mkdir()
    for name in PROBED:
        (config.parent / f"{name}.py").write_text(
            f"open({str(markers / name)!r}, 'w').close()\nraise RuntimeError('the user folder was imported')\n"
        )
    summary = tmp_path / "s.json"
    proc = subprocess.run(
        [str(BIN / "int8pipe"), *run_args(config, tracking_uri, summary)],
        cwd=config.parent,
        env=env_without_mlflow(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in markers.iterdir()) == []
    assert json.loads(summary.read_text())["gate"] == "passed"
