"""Test-only: one promoting process whose Model Registry calls are slow, stalled, skewed or cut short.

Not part of int8pipe, and not a test module: tests/test_alias_convergence.py starts it as
``python -m tests.registry_chaos SPEC_JSON cli ARGS...`` (``int8pipe`` with ARGS) or
``python -m tests.registry_chaos SPEC_JSON promote`` (one ``registry.promote_model`` call on a tiny
model). Before that it wraps the Model Registry methods of MLflow's own ``MlflowClient`` class, in
this process only; int8pipe's code runs unchanged. SPEC keys, all optional:

- ``jitter_s``: sleep a random 0..jitter_s before every registry call (the interleavings vary);
- ``clock_offset_s``: ``time.time()`` runs this far ahead (negative: behind), as on a skewed host;
- ``stall``: ``{"marker": path, "release": path}``: before the first alias write, create ``marker`` and
  wait until ``release`` exists (a promoter stalled between what it read and what it writes);
- ``die_after_first_alias_write``: SIGKILL this process as soon as that write has returned;
- ``log``: append each alias write as ``<pid> <version> <monotonic ns before> <monotonic ns after>``.

``promote`` also reads ``uri``, ``experiment_id``, ``name``, ``alias``, ``policy``, ``score``,
``data`` (the validation digest), ``label`` (makes the model's bytes its own) and ``out`` (where
promote_model's result is written as JSON).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

REGISTRY_METHODS = (
    "create_registered_model",
    "get_registered_model",
    "delete_registered_model",
    "search_registered_models",
    "create_model_version",
    "get_model_version",
    "search_model_versions",
    "set_model_version_tag",
    "get_model_version_by_alias",
    "set_registered_model_alias",
    "delete_registered_model_alias",
)
ALIAS_WRITE = "set_registered_model_alias"
STALL_LIMIT_S = 600


def make_hostile(spec: dict[str, Any]) -> None:
    """Wrap MlflowClient's registry methods and skew the clock as ``spec`` says."""
    offset = float(spec.get("clock_offset_s", 0))
    if offset:
        real_time = time.time
        time.time = lambda: real_time() + offset
    writes = 0

    def hostile(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            time.sleep(random.uniform(0, float(spec.get("jitter_s", 0))))
            if name != ALIAS_WRITE:
                return method(self, *args, **kwargs)
            if writes == 0 and "stall" in spec:
                _stall(Path(spec["stall"]["marker"]), Path(spec["stall"]["release"]))
            before = time.monotonic_ns()
            result = method(self, *args, **kwargs)
            writes += 1
            if "log" in spec:
                version = kwargs.get("version", args[2] if len(args) > 2 else "?")
                with open(spec["log"], "a") as log:  # one short append: whole lines however processes interleave
                    log.write(f"{os.getpid()} {version} {before} {time.monotonic_ns()}\n")
            if spec.get("die_after_first_alias_write"):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    for name in REGISTRY_METHODS:
        setattr(MlflowClient, name, hostile(name, getattr(MlflowClient, name)))


def _stall(marker: Path, release: Path) -> None:
    marker.touch()
    deadline = time.monotonic() + STALL_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def promote(spec: dict[str, Any]) -> None:
    import mlflow

    from pipeline.mlflow_io import registry
    from pipeline.tag_names import GATE_TAG
    from tests.models import build

    model = build("single_matmul")
    model.doc_string = spec["label"]
    mlflow.set_tracking_uri(spec["uri"])
    with mlflow.start_run(experiment_id=spec["experiment_id"]) as run:
        result = registry.promote_model(
            MlflowClient(spec["uri"]),
            run.info.run_id,
            model=model,
            input_example=None,
            registered_model=spec["name"],
            alias=spec.get("alias", "candidate"),
            policy=spec.get("policy", "better"),
            score=registry.Score("cosine", float(spec["score"]), spec.get("data", "d")),
            int8_sha256=hashlib.sha256(model.SerializeToString()).hexdigest(),
            tags={GATE_TAG: "passed"},
            description=f"registry_chaos {spec['label']}",
            metrics={},
        )
    Path(spec["out"]).write_text(json.dumps(result))


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    make_hostile(spec)
    if argv[1] == "promote":
        promote(spec)
        return 0
    from pipeline.orchestration.cli import main as cli

    return cli(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
