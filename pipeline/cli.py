"""``int8pipe``: run a pipeline, or inspect a TensorRT calibration cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import log
from pipeline.errors import GateFailed, Int8PipeError

EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="int8pipe", description="FP32 -> validated, benchmarked INT8, tracked in MLflow.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline YAML")
    run.add_argument("config")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a YAML key, e.g. steps.calibrate.method=percentile (repeatable)",
    )
    run.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then MLflow's)"
    )
    run.add_argument("--no-reuse", action="store_true", help="rerun steps even when a finished run matches")
    run.add_argument("--summary-json", default=None, metavar="PATH", help="write the run summary as JSON")
    run.add_argument("--only", default=None, metavar="STEP", help="run one step, reusing the earlier steps' runs")
    cache = sub.add_parser("cache", help="TensorRT calibration caches")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    show = cache_sub.add_parser("show", help="decode a TensorRT calibration cache")
    show.add_argument("file")
    show.add_argument("--json", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load
    from pipeline.runner import Summary, run_pipeline

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = load(args.config, args.overrides)
    summary = Summary()
    try:
        run_pipeline(cfg, args.tracking_uri, reuse=not args.no_reuse, only=args.only, summary=summary)
    finally:
        if args.summary_json and summary.run_id:
            Path(args.summary_json).write_text(json.dumps(summary.to_json(), indent=2))
    reg = summary.registered_model
    print(
        f"pipeline run {summary.run_id}: gate {summary.gate}"
        + (
            f"; registered {reg['name']} v{reg['version']}" + (f" @{reg['alias']}" if reg["alias"] else "")
            if reg
            else ""
        )
    )
    return 0


def _cache_show(args: argparse.Namespace) -> int:
    from pipeline.calibration import trt_cache

    cache = trt_cache.read(args.file)
    if args.json:
        tensors = {k: {"scale": s, "amax": None if s is None else s * 127.0} for k, s in cache.scales.items()}
        print(json.dumps({"version": cache.version, "algorithm": cache.algorithm, "tensors": tensors}, indent=1))
        return 0
    print(f"TensorRT {cache.version}, {cache.algorithm}, {len(cache.scales)} tensors")
    width = max((len(k) for k in cache.scales), default=6)
    print(f"{'tensor':<{width}}  {'scale':>12}  {'amax':>12}")
    for name, scale in cache.scales.items():
        if scale is None:
            print(f"{name:<{width}}  {'-':>12}  {'(no range)':>12}")
        else:
            print(f"{name:<{width}}  {scale:>12.6g}  {scale * 127.0:>12.6g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.configure(args.verbose)
    try:
        if args.command == "run":
            return _run(args)
        return _cache_show(args)
    except GateFailed as exc:
        print(f"int8pipe: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except Int8PipeError as exc:
        print(f"int8pipe: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
