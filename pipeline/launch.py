"""How int8pipe starts Python processes of its own (sweep trials, the PyTorch export).

``python -m pipeline`` puts the working directory first on ``sys.path``, so a ``pipeline.py`` (or a
``pipeline/`` folder) there would run instead of int8pipe: a user's working directory is theirs and
may hold anything. ``-P`` (Python 3.11+) leaves it out, but int8pipe supports 3.10 too, so the child
starts with ``-c`` and a bootstrap that drops that entry before importing anything of int8pipe's,
then runs the module as ``-m`` would. The working directory itself stays the same: a trial's
``python:`` modules are looked up there on purpose (:mod:`pipeline.user_code`), never on sys.path.

A child started with :func:`die_with` in its environment gets SIGTERM when its parent dies, even by
``kill -9`` (Linux's parent-death signal, set by the child itself: ``preexec_fn`` is unsafe in a
parent with threads), so a killed sweep driver leaves no trial running unowned; the trial's own
SIGTERM handling marks its runs KILLED.
"""

from __future__ import annotations

import os
import sys

# argv after -c: the module to run, then its arguments. `-c` puts '' (the working directory) first
# on sys.path unless -P / PYTHONSAFEPATH already left it out; only that entry is dropped.
PARENT_ENV = "INT8PIPE_DIE_WITH"  # the pid of the parent whose death ends the child (Linux)
BOOTSTRAP = (
    "import os, runpy, sys\n"
    f"parent = os.environ.pop('{PARENT_ENV}', '')\n"
    "if parent and sys.platform.startswith('linux'):\n"
    "    import ctypes, signal\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(parent):  # it died before the line above: nobody would send it\n"
    "        os.kill(os.getpid(), signal.SIGTERM)\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "del sys.argv[0]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def own_module_command(module: str) -> list[str]:
    """The command that runs int8pipe's ``module`` (as ``python -m module`` would) in this Python,
    whatever the working directory holds; append the module's arguments."""
    return [sys.executable, "-c", BOOTSTRAP, module]


def die_with(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` (None: this process's) for a child started with :func:`own_module_command` that must
    end when this process does."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
