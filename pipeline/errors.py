"""The exception tree, in one place.

Every error a user can fix derives from :class:`Int8PipeError`; the CLI prints its message as one
paragraph and exits non-zero. Any other exception is a bug and keeps its traceback.

    Int8PipeError
    ├── ConfigError          the YAML or a --set override is invalid
    ├── ModelError           a model is missing, corrupt or unsupported
    ├── DataError            calibration/validation data does not fit the model
    ├── CalibrationError     ranges or a cache cannot be used (wrong model, bad file)
    ├── BackendUnavailable   an optional backend (torch, TensorRT, a GPU provider) is missing
    ├── TrackingError        the MLflow tracking store cannot be reached or stopped answering
    ├── UserCodeError        code the YAML names (a python: source, a factory, a metric) raised or exited
    └── GateFailed           the INT8 model lost more accuracy than allowed

    Interrupted (a KeyboardInterrupt, not a user error): SIGTERM or SIGINT arrived; open runs are
    marked KILLED on the way out and the CLI exits 128 + the signal number.
"""

from __future__ import annotations

import logging
from typing import NoReturn

logger = logging.getLogger("int8pipe")


class Int8PipeError(Exception):
    """Root of all errors a user can act on."""


class ConfigError(Int8PipeError):
    """The pipeline YAML or an override is invalid."""


class ModelError(Int8PipeError):
    """A model is missing, corrupt or cannot be processed."""


class DataError(Int8PipeError):
    """Input data does not match the model, or holds NaN/Inf, or is empty."""


class CalibrationError(Int8PipeError):
    """Calibration ranges or a calibration cache cannot be used."""


class BackendUnavailable(Int8PipeError):
    """An optional dependency or execution provider is not available here."""


class TrackingError(Int8PipeError):
    """The MLflow tracking store cannot be reached, or stopped answering during a run."""


class UserCodeError(Int8PipeError):
    """Code the YAML names raised, or called ``sys.exit()``, while int8pipe ran it.

    ``user_traceback`` is that code's own traceback (from its first frame on), which the CLI prints
    above the one-paragraph message: the user's bug is theirs to read, int8pipe's frames are not."""

    def __init__(self, message: str, user_traceback: str = ""):
        super().__init__(message)
        self.user_traceback = user_traceback


class Interrupted(KeyboardInterrupt):
    """The process received SIGTERM or SIGINT; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interruption(exc: BaseException) -> Interrupted | None:
    """The Interrupted that ``exc`` is or was caused by: a library may turn one into its own error (a
    SIGTERM landing while onnxruntime's C extension initialises becomes "ImportError: initialization
    failed"), and such an error is the interruption, not a failure."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, Interrupted):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


class GateFailed(Int8PipeError):
    """The accuracy gate failed: the INT8 model dropped more than ``max_drop``."""


def fail(error: type[Int8PipeError], message: str) -> NoReturn:
    """Log ``message``, then raise it as ``error``.

    Logged at debug level: the CLI prints the message once as the final paragraph; with ``-v`` the
    log shows where in the run it was raised.
    """
    logger.debug("raising %s: %s", error.__name__, message)
    raise error(message)
