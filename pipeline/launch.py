"""How int8pipe starts Python processes of its own (sweep trials, the PyTorch export).

``python -m pipeline`` puts the working directory first on ``sys.path``, so a ``pipeline.py`` (or a
``pipeline/`` folder) there would run instead of int8pipe: a user's working directory is theirs and
may hold anything. ``-P`` (Python 3.11+) leaves it out, but int8pipe supports 3.10 too, so the child
starts with ``-c`` and a bootstrap that drops that entry before importing anything of int8pipe's,
then runs the module as ``-m`` would. The working directory itself stays the same: a trial's
``python:`` modules are looked up there on purpose (:mod:`pipeline.user_code`), never on sys.path.
"""

from __future__ import annotations

import sys

# argv after -c: the module to run, then its arguments. `-c` puts '' (the working directory) first
# on sys.path unless -P / PYTHONSAFEPATH already left it out; only that entry is dropped.
BOOTSTRAP = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "del sys.argv[0]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def own_module_command(module: str) -> list[str]:
    """The command that runs int8pipe's ``module`` (as ``python -m module`` would) in this Python,
    whatever the working directory holds; append the module's arguments."""
    return [sys.executable, "-c", BOOTSTRAP, module]
