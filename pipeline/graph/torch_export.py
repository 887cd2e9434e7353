"""PyTorch -> ONNX in a child process, so torch's few hundred MB leave with it.

The parent never imports torch: ``export`` checks availability with importlib, runs
``python -m pipeline.graph.torch_export SPEC`` and turns a failure into a ModelError carrying the
child's last error lines.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import BackendUnavailable, ModelError, fail
from pipeline.launch import own_module_command


def export(
    factory: str,
    *,
    args: dict[str, Any],
    inputs: dict[str, list[int]],
    opset: int,
    dynamic_batch: bool,
    dst: Path,
    search_dirs: list[Path],
    dtypes: dict[str, str] | None = None,
) -> None:
    if importlib.util.find_spec("torch") is None:
        fail(BackendUnavailable, "model.pytorch needs PyTorch: pip install 'int8pipe[torch]'.")
    spec = {
        "factory": factory,
        "args": args,
        "inputs": inputs,
        "dtypes": dtypes or {},
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "dst": str(dst),
        "search_dirs": [str(d) for d in search_dirs],
    }
    proc = subprocess.run(
        [*own_module_command("pipeline.graph.torch_export"), json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        fail(ModelError, f"model.pytorch: exporting {factory} to ONNX failed: {tail}")


def _child(spec: dict[str, Any]) -> None:
    import torch

    from pipeline.user_code import import_object

    factory = import_object(spec["factory"], [Path(d) for d in spec["search_dirs"]], "model.pytorch.factory")
    module = factory(**spec["args"])
    module.eval()
    dtypes = {n: getattr(torch, spec["dtypes"].get(n, "float32")) for n in spec["inputs"]}
    # integer inputs are traced with ones: a valid token id and a full attention mask (zeros would
    # mask every position, and some models take another branch on an empty mask)
    dummy = tuple(
        (torch.zeros if dtypes[n].is_floating_point else torch.ones)(shape, dtype=dtypes[n])
        for n, shape in spec["inputs"].items()
    )
    names = list(spec["inputs"])
    axes = {n: {0: "batch"} for n in names} if spec["dynamic_batch"] else None
    with warnings.catch_warnings():
        # The TorchScript exporter keeps BatchNormalization visible (the dynamo exporter folds it
        # silently); the export step folds it with onnxruntime and reports it. The exporter's
        # deprecation notices and its PRESERVE-mode advice (meant for modules in training mode)
        # are expected.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        torch.onnx.export(
            module,
            dummy,
            spec["dst"],
            input_names=names,
            opset_version=spec["opset"],
            dynamic_axes=axes,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
        )


if __name__ == "__main__":
    try:
        _child(json.loads(sys.argv[1]))
    except Exception as exc:  # reported to the parent through stderr and the exit code
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
