"""``int8pipe``: run a pipeline, or inspect a TensorRT calibration cache."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.errors import (
    ConfigError,
    GateFailed,
    Int8PipeError,
    Interrupted,
    TrackingError,
    UserCodeError,
    fail,
    interruption,
)

EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="int8pipe",
        description="FP32 -> validated, benchmarked INT8, tracked in MLflow.",
        epilog=f"exit codes: 0 success, {EXIT_USER_ERROR} a user error (message, no traceback), {EXIT_GATE_FAILED} "
        "the accuracy gate failed, 130/143 interrupted (SIGINT/SIGTERM), 1 a bug (with its traceback)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    p.add_argument("--version", action=_Version, help="int8pipe, ONNX Runtime and this CPU's int8 kernels")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline YAML")
    run.add_argument("config", help="the pipeline YAML (docs/yaml-reference.md)")
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
    run.add_argument(
        "--only",
        default=None,
        metavar="STEP",
        help="run one step (export, calibrate, quantize, validate, benchmark, engine, promote), reusing the earlier "
        "steps' runs",
    )
    # how a sweep runs its trials as processes (sweep.parallel > 1); not for people
    run.add_argument("--under", default=None, help=argparse.SUPPRESS)
    run.add_argument("--run-name", default=None, help=argparse.SUPPRESS)
    run.add_argument("--skip-promote", action="store_true", help=argparse.SUPPRESS)
    cache = sub.add_parser("cache", help="TensorRT calibration caches")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    show = cache_sub.add_parser("show", help="decode a TensorRT calibration cache")
    show.add_argument("file", help="a cache file, a calibrate run id, or runs:/<run id>/<path to a cache>")
    show.add_argument("--json", action="store_true", help="print {version, algorithm, tensors: {name: {scale, amax}}}")
    show.add_argument("--tracking-uri", default=None, help="where a run id is looked up (default: as for run)")
    sub.add_parser("reference", help="print every YAML key with its type, default and meaning (markdown)")
    lint = sub.add_parser(
        "lint",
        help="check an ONNX model against TensorRT 11's strongly typed rules (exit 1 when a rule breaks)",
    )
    lint.add_argument("model", help="an ONNX file (for example a quantize run's model/model_int8.onnx)")
    return p


class _Version(argparse.Action):
    """``--version``, worked out only when asked (it reads the CPU and imports ONNX Runtime)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    """int8pipe's version with what decides its numbers here: ONNX Runtime and this CPU's int8 kernels."""
    import importlib.metadata

    from pipeline.execution import cpu_kernels

    try:
        own = importlib.metadata.version("int8pipe")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown (not installed)"
    return f"int8pipe {own}; {cpu_kernels.describe(cpu_kernels.this_machine())}"


def _store_full(exc: BaseException) -> str | None:
    """The message for a tracking or artifact store out of space (see tracking.store_full), else None."""
    from pipeline.mlflow_io.store import store_full
    from pipeline.mlflow_io.tracking import default_uri

    return store_full(exc, default_uri())


def _run(args: argparse.Namespace) -> int:
    from pipeline.orchestration.runner import Summary, load_config, run_pipeline

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = load_config(args.config, args.overrides)
    if args.skip_promote:
        cfg.steps.pop("promote", None)
    summary = Summary()
    try:
        if cfg.sweep is not None:
            if args.only:
                fail(ConfigError, "--only runs one step of one pipeline; a sweep runs many: drop --only or the sweep.")
            from pipeline.orchestration.sweep import run_sweep

            run_sweep(cfg, args.tracking_uri, reuse=not args.no_reuse, summary=summary)
        else:
            run_pipeline(
                cfg,
                args.tracking_uri,
                reuse=not args.no_reuse,
                only=args.only,
                summary=summary,
                under=args.under,
                run_name=args.run_name,
            )
    except Exception as exc:
        full = _store_full(exc)
        if full is None:
            raise
        fail(TrackingError, full)  # exit 2, one paragraph: no traceback for a disk that ran out
    except SystemExit as exc:  # not the user's code (that is a UserCodeError): a library's, so a bug
        raise RuntimeError(f"sys.exit({exc.code!r}) was called during the run; the run did not finish") from exc
    finally:
        if args.summary_json and summary.run_id:
            Path(args.summary_json).write_text(json.dumps(summary.to_json(), indent=2))
    if summary.trials is not None:
        print(f"sweep run {summary.run_id}: {_trials_line(summary)}{_registry_line(summary.registered_model)}")
        return 0
    gate = "not run (no validate step)" if summary.gate == "not run" else summary.gate
    print(f"pipeline run {summary.run_id}: gate {gate}{_registry_line(summary.registered_model)}")
    _print_runs(summary)
    return 0


def _trials_line(summary: Any) -> str:
    """How the trials ended and which one was selected."""
    best = next((t for t in summary.trials if t.run_id == summary.best), None)
    chosen = f"best {best.label if best else '-'} (run {summary.best})"
    if summary.gate == "not run":  # the pipeline has no validate step: nothing was gated
        finished = sum(t.gate == "not run" for t in summary.trials)
        return f"{finished}/{len(summary.trials)} trials finished, gate not run (no validate step); {chosen}"
    passed = sum(t.gate == "passed" for t in summary.trials)
    return f"{passed}/{len(summary.trials)} trials passed the gate; {chosen}"


def _print_runs(summary: Any) -> None:
    """Each step's run and the artifact URI a user needs next (e.g. for ``int8pipe cache show``)."""
    from steps import CATALOG

    width = max((len(k) for k in summary.steps), default=0)
    for step, run_id in summary.steps.items():
        artifact = CATALOG[step].next_artifact
        where = f"  runs:/{run_id}/{artifact}" if artifact else ""
        print(f"  {step:<{width}}  run {run_id}{where}")
    reg = summary.registered_model
    if reg:
        print(f"  {'model':<{width}}  models:/{reg['name']}/{reg['version']}")


def _registry_line(reg: dict | None) -> str:
    """The registry as it stands at exit: the alias is claimed only when this version holds it."""
    if not reg:
        return ""
    line = f"; registered {reg['name']} v{reg['version']}"
    if reg.get("alias"):
        return line + f" @{reg['alias']}"
    if reg.get("alias_version"):
        return line + f" ({reg.get('decision', '')}; the alias is on v{reg['alias_version']})"
    return line


def _cache_file(spec: str, tracking_uri: str | None) -> str:
    """A local cache path for ``spec``: a file, a calibrate run id, or a runs:/ URI (downloaded)."""
    if Path(spec).is_file() or not (spec.startswith("runs:/") or re.fullmatch(r"[0-9a-f]{32}", spec)):
        return spec
    from pipeline.mlflow_io.tracking import download_artifact

    uri = spec if spec.startswith("runs:/") else f"runs:/{spec}/calibration/calibration.cache"
    try:
        return download_artifact(uri, tracking_uri)
    except FileNotFoundError as exc:
        fail(
            ConfigError,
            f"cache show {spec}: cannot fetch {uri} ({exc}). Give a cache file, the run "
            "id of a calibrate step (printed at the end of int8pipe run), or a runs:/ URI.",
        )


def _lint(path: Path) -> int:
    from pipeline.analysis.strongly_typed import lint
    from pipeline.graph import model as onnx_model

    found = lint(onnx_model.load(path, check=False))
    for finding in found:
        print(finding)
    print(f"{path}: {len(found)} break(s) of TensorRT 11's strongly typed rules" if found else f"{path}: clean")
    return 1 if found else 0


def _cache_show(args: argparse.Namespace) -> int:
    """Print a cache, streaming: the file is read line by line, twice (a first pass checks every line
    and measures the table, so a malformed cache prints nothing but the error), and ``--json`` is
    written tensor by tensor. Memory stays flat whatever the number of tensors."""
    from pipeline.calibration import trt_cache

    args.file = _cache_file(args.file, args.tracking_uri)
    _, entries = trt_cache.open_cache(args.file)
    count, width = 0, 0
    for name, _scale in entries:
        count += 1
        width = max(width, len(name))
    cache, entries = trt_cache.open_cache(args.file)
    out = sys.stdout
    if args.json:  # {"version", "algorithm", "tensors": {name: {"scale", "amax"}}}, one tensor per line
        out.write(f'{{\n "version": {json.dumps(cache.version)},\n "algorithm": {json.dumps(cache.algorithm)},\n')
        out.write(' "tensors": {')
        for i, (name, scale) in enumerate(entries):
            entry = {"scale": scale, "amax": None if scale is None else scale * 127.0}
            out.write(f"{',' if i else ''}\n  {json.dumps(name)}: {json.dumps(entry)}")
        out.write("\n }\n}\n" if count else "}\n}\n")
        return 0
    width = width or 6
    print(f"TensorRT {cache.version}, {cache.algorithm}, {count} tensors")
    print(f"{'tensor':<{width}}  {'scale':>12}  {'amax':>12}")
    for name, scale in entries:
        if scale is None:
            print(f"{name:<{width}}  {'-':>12}  {'(no range)':>12}")
        else:
            print(f"{name:<{width}}  {scale:>12.6g}  {scale * 127.0:>12.6g}")
    return 0


def _on_signal(signum: int, frame: object) -> None:
    # Once, whichever comes second: a Ctrl-C then a SIGTERM (`timeout`, Kubernetes) while the runs are
    # being closed must not cut the clean-up short with a second traceback chained to the first.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _deaf)
    raise Interrupted(signum)


def _deaf(signum: int, frame: object) -> None:
    """After the first signal: further ones do nothing until the process exits. A Python handler, not
    SIG_IGN, which would make Python print 'Signal 15 ignored due to race condition' for one already
    on its way; and kept past main(), whose exit code says which signal stopped it (SIG_DFL back in
    place, a late SIGTERM would kill it with another)."""


def _tracking_outage(exc: BaseException) -> str | None:
    """The one-paragraph message for a tracking server that stopped answering mid-run, else None."""
    from pipeline.mlflow_io.store import give_up_on_server, is_outage, outage_cause, redacted
    from pipeline.mlflow_io.tracking import default_uri

    if not is_outage(exc):
        return None
    cause = outage_cause(exc)  # before give_up_on_server() changes the settings it quotes
    give_up_on_server()
    request = re.search(r"/api/[\w./-]+", str(exc))
    last = f" (the request: {request.group(0)})" if request else ""
    return (
        f"the MLflow tracking server {redacted(default_uri())} stopped answering during the run: {cause}{last}. "
        "Runs of the steps that finished before stay as they are (FINISHED, reused by the next run); the runs "
        "it could not close stay RUNNING on the server until the next int8pipe run against that experiment "
        "closes them as KILLED. Check the server (restart it if it hangs or is down) and run again. How long "
        "int8pipe waits for an answer: MLFLOW_HTTP_REQUEST_TIMEOUT seconds per try (default 30), "
        "1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES tries (default 2)."
    )


def _quiet_if_outage(exc: BaseException) -> None:
    """An error of int8pipe's own that an outage caused (a step wrapped MLflow's error): its message
    stays, and what MLflow sends at exit neither waits nor prints retries after it."""
    from pipeline.mlflow_io.store import give_up_on_server, is_outage

    if is_outage(exc):
        give_up_on_server()


def main(argv: list[str] | None = None) -> int:
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # first: a Ctrl-C while parsing is one line too
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        args = _parser().parse_args(argv)
        log.configure(args.verbose)
        if args.command == "run":
            return _run(args)
        if args.command == "reference":
            from pipeline.settings import reference
            from steps import CATALOG

            print(reference.render(CATALOG), end="")
            return 0
        if args.command == "lint":
            return _lint(Path(args.model))
        return _cache_show(args)
    except GateFailed as exc:
        print(f"int8pipe: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except Interrupted as exc:
        return _interrupted(exc)
    except Exception as exc:
        stopped = interruption(exc)  # a library that turned the interruption into an error of its own
        if stopped is not None:
            return _interrupted(stopped)
        if isinstance(exc, Int8PipeError):
            _quiet_if_outage(exc)
            if isinstance(exc, UserCodeError) and exc.user_traceback:
                print(exc.user_traceback, file=sys.stderr, end="")
            print(f"int8pipe: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        message = _tracking_outage(exc)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"int8pipe: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        for sig, previous in handlers.items():
            if signal.getsignal(sig) is not _deaf:
                signal.signal(sig, previous)


def _interrupted(exc: Interrupted) -> int:
    name = signal.Signals(exc.signum).name
    print(f"int8pipe: interrupted by {name}; open runs marked KILLED, temporary files removed", file=sys.stderr)
    return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
