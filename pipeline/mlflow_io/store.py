"""The tracking store's health, apart from runs: reachability, outages, full disks, whether a
run's owner process still lives, and the first use of a sqlite store."""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import interruption
from pipeline.log import logger
from pipeline.tag_names import HEARTBEAT_TAG, HOST_TAG, PID_NAMESPACE_TAG, PID_TAG


def _userinfo(uri: str) -> tuple[str, str, str]:
    """``uri`` split around its ``user:password@`` part: (before, userinfo, after); '' when none."""
    scheme, sep, rest = uri.partition("://")
    netloc = rest.split("/", 1)[0]
    if not sep or "@" not in netloc:
        return uri, "", ""
    userinfo, _, _ = netloc.rpartition("@")
    return f"{scheme}://", userinfo, rest[len(userinfo) + 1 :]


def has_credentials(uri: str) -> bool:
    return bool(_userinfo(uri)[1])


def without_credentials(uri: str) -> str:
    """``uri`` with no ``user:password@`` at all: for a link a browser opens (it asks for them itself)."""
    before, userinfo, after = _userinfo(uri)
    return before + after if userinfo else uri


def redacted(uri: str) -> str:
    """``uri`` as int8pipe prints, logs or tags it: its ``user:password@`` replaced by ``***@`` (a
    user name alone may be a token)."""
    before, userinfo, after = _userinfo(uri)
    return f"{before}***@{after}" if userinfo else uri


def adopt_credentials(uri: str) -> str:
    """An http(s) tracking URI without its ``user:password@``, the credentials moved to
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

    MLflow accepts such a URI (``requests`` sends its userinfo as basic auth, and those two settings
    take precedence when set, as they keep doing here). Held in MLflow's own settings, the
    credentials reach the trial processes (inherited) and Ray trials (forwarded with the other
    ``MLFLOW_*`` settings) without ever being part of a URI int8pipe passes on a command line,
    prints, logs or tags. Other schemes (a database URL) keep them: their driver needs them there.
    """
    before, userinfo, after = _userinfo(uri)
    if not userinfo or before not in ("http://", "https://"):
        return uri
    user, _, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    return before + after


def _health_request(uri: str) -> urllib.request.Request:
    """int8pipe's own request to the server's ``/health``, with the authorization MLflow's client
    sends (urllib takes no ``user:password@`` in a URL): the settings, else the URI's."""
    before, userinfo, after = _userinfo(uri)
    user, _, password = (urllib.parse.unquote(p) for p in userinfo.partition(":"))
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or user
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or password
    return urllib.request.Request((before + after).rstrip("/") + "/health", headers=_auth_headers(user, password))


def _auth_headers(user: str, password: str) -> dict[str, str]:
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    bearer = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {bearer}"} if bearer else {}


OUTAGE_MARKS = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out", "timeout exception")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is the tracking server not answering (after MLflow's own retries), also when a
    step wrapped MLflow's error in one of its own. MLflow words every failed request of its REST client
    "API request to <url> failed ...": a connection error of anything else (a user's data source that
    fetches over HTTP) is no outage, and its runs are closed as usual."""
    return any(
        "API request to" in str(e) and any(m in f"{type(e).__name__}: {e}" for m in OUTAGE_MARKS) for e in _chain(exc)
    )


def outage_cause(exc: BaseException) -> str:
    """How the server failed ``exc``'s request, in words: it hung (took the connection, never answered)
    or it was not there (refused)."""
    text = " ".join(f"{type(e).__name__}: {e!r}" for e in _chain(exc))
    tries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")) + 1
    if "ReadTimeout" in text or "Read timed out" in text or "timed out" in text:
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        return f"it took the connection but sent no reply within {timeout} s, {tries} time(s): it hangs"
    if "refused" in text.lower():
        return f"it refused the connection {tries} time(s): it is not running"
    return f"no answer after {tries} tries"


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def store_full(exc: BaseException, tracking_uri: str) -> str | None:
    """The one-paragraph message when ``exc`` (or what caused it) is a store out of space, else None:
    sqlite's "database or disk is full" names the tracking store, an ENOSPC/EDQUOT write the
    artifact store's file."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if "database or disk is full" in str(chain):
            where = redacted(tracking_uri)
            if tracking_uri.startswith("sqlite:///"):
                where = f"{tracking_uri} (the file {Path(tracking_uri[len('sqlite:///') :]).resolve()})"
            return (
                f"the MLflow tracking store {where} is full: sqlite reported 'database or disk is full' "
                f"({free(tracking_uri)}). Free space on that disk, or point --tracking-uri (or "
                "MLFLOW_TRACKING_URI) at a store on a disk with room; runs already finished stay intact and "
                "are reused by the next run."
            )
        if isinstance(chain, OSError) and chain.errno in FULL_ERRNOS:
            return _full_disk(chain)
        chain = chain.__cause__ or chain.__context__
    return None


def _full_disk(exc: OSError) -> str:
    """The message for a write that found its disk full: the temporary folder's (TMPDIR) when the
    file was one of the working files there, else the artifact store's."""
    reason = os.strerror(exc.errno or 0)
    path = str(exc.filename) if exc.filename else None
    if path is not None and in_temp_area(path):
        return (
            f"the temporary folder {tempfile.gettempdir()} is full: writing to {path} failed ({reason}). int8pipe "
            "keeps each step's working files there while it runs (the models, calibration statistics); free "
            "space on that disk, or point TMPDIR at a folder on a disk with room. Runs already finished stay "
            "intact and are reused."
        )
    return (
        f"the MLflow artifact store is full: writing {path or 'the artifact store'} failed ({reason}). "
        "Free space on that disk, or point --tracking-uri (or MLFLOW_TRACKING_URI) at a store whose "
        "artifacts live on a disk with room; runs already finished stay intact and are reused."
    )


def in_temp_area(path: str | Path) -> bool:
    """Whether ``path`` is a working file in the temporary folder: under TMPDIR, in a folder that
    int8pipe (``int8pipe-*``) or a library (``tmp*``, tempfile's names) made for the process's work.
    A store a user keeps elsewhere under /tmp (a test's folder) is not."""
    try:
        rel = Path(path).resolve().relative_to(Path(tempfile.gettempdir()).resolve())
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0].startswith(("int8pipe-", "tmp"))


def blame_workdir(exc: BaseException, workdir: Path) -> None:
    """A step's write that found the disk full names no file (``write()`` errors carry none): a step
    writes only in its working folder, so that is the file's place."""
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS and not exc.filename:
        exc.filename = str(workdir)


class _QuietWhenFull(logging.Filter):
    """Drops MLflow's own traceback of a full sqlite store: the error is re-raised to int8pipe, which
    reports it as one paragraph naming the store (see :func:`store_full`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or store_full(exc, "") is None


def quiet_when_full() -> None:
    db_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _QuietWhenFull) for f in db_log.filters):
        db_log.addFilter(_QuietWhenFull())


def free(tracking_uri: str) -> str:
    """How much room the disk of a sqlite store's file has left, as words."""
    if not tracking_uri.startswith("sqlite:///"):
        return "the server's disk"
    try:
        free = shutil.disk_usage(Path(tracking_uri[len("sqlite:///") :]).resolve().parent).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.0f} MB free on its disk; if that is plenty, the database itself is capped"


@contextmanager
def closing(end: Any) -> Iterator[None]:
    """Run ``end(status)`` after the block: FINISHED, KILLED on a signal, FAILED otherwise, and
    nothing during an outage (each call would wait out MLflow's retries; the next run closes it)."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:  # SIGINT, or SIGTERM turned into Interrupted by the CLI
        status = "KILLED"
        raise
    except Exception as exc:
        if interruption(exc) is not None:
            status = "KILLED"
        elif is_outage(exc):
            status = ""
        raise
    finally:
        if status:
            _end_despite_locks(end, status)


LOCK_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0)  # seconds between tries of a write a locked sqlite store refused


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is a sqlite store busy with another process's write (concurrent runs, or a sweep's
    trials all closing their runs at the same Ctrl-C)."""
    return any("database is locked" in str(e) for e in _chain(exc))


def _end_despite_locks(end: Any, status: str) -> None:
    """``end(status)``, tried again while the sqlite store is locked. An interrupted run that still cannot
    be closed is left RUNNING with a warning (the next run against the experiment closes it as KILLED):
    a second traceback chained to the interruption would bury its one line."""
    for wait in (*LOCK_RETRIES, None):
        try:
            end(status)
            return
        except Exception as exc:
            if not is_locked(exc) or wait is None:
                if status == "KILLED":
                    logger.warning(
                        "could not mark a run KILLED (%s); the next int8pipe run against this experiment "
                        "closes it as KILLED",
                        str(exc).splitlines()[0][:200],
                    )
                    return
                raise
            time.sleep(wait)


def give_up_on_server() -> None:
    """After an outage: what MLflow still sends at exit (ending the runs it holds open) fails at once
    instead of waiting out its retries again, and no retry line follows int8pipe's last word (the
    heartbeat thread may be half-way through its own retries). MLflow reads these settings at every
    request."""
    import atexit

    from mlflow.tracking import fluent

    from pipeline.log import quiet_retries

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    quiet_retries()
    # MLflow ends the active run at exit as FINISHED: a step cut short would be FINISHED, and reused by
    # the next run, should that request reach a server that was slow rather than gone. Left RUNNING, the
    # next run closes it KILLED (and exit does not wait on the server once more).
    end_at_exit = getattr(fluent, "_safe_end_run", None)
    if end_at_exit is not None:
        atexit.unregister(end_at_exit)


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ('' where /proc does not tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid_tag: str) -> bool:
    pid_text, _, start = pid_tag.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not start or process_start(pid) == start


def pid_namespace() -> str:
    """Where this process's pid means something: this boot of this kernel and this PID namespace.

    Two containers may share a hostname (and a pid); they never share both a boot id and a PID
    namespace. '' where /proc does not tell, and then no pid is ever judged from here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def same_pid_namespace(tags: dict[str, str]) -> bool:
    """Whether the process that wrote ``tags`` (owner_tags) can be looked up by pid from here."""
    here = pid_namespace()
    return bool(here) and tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_NAMESPACE_TAG) == here


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        PID_NAMESPACE_TAG: pid_namespace(),
        PID_TAG: f"{pid}:{process_start(pid)}",
        HEARTBEAT_TAG: repr(time.time()),
    }


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail within ``timeout_s`` when the tracking store cannot be used, before any work starts."""
    from pipeline.errors import TrackingError, fail

    if uri.startswith(("http://", "https://")):
        deadline = time.monotonic() + timeout_s
        last = ""
        health = _health_request(uri)
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(health, timeout=3) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(getattr(exc, "reason", exc))
            time.sleep(1.0)
        fail(
            TrackingError,
            f"the MLflow tracking server {redacted(uri)} does not answer ({last}). Start it (mlflow server --host "
            "127.0.0.1 --port 5000), check --tracking-uri / MLFLOW_TRACKING_URI, or use a local store "
            "such as sqlite:///mlflow.db.",
        )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            fail(
                TrackingError, f"tracking store {redacted(uri)}: the folder {folder} does not exist or is not writable."
            )


@contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store: MLflow migrates a new database's schema on first
    use, and two processes migrating at once leave one dead ('duplicate column name')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    fd = os.open(Path(uri[len("sqlite:///") :]).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
