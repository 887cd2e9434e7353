"""The ``int8pipe`` command and ``python -m pipeline``: the command line, quiet when interrupted while it loads.

Until :func:`pipeline.orchestration.cli.main` installs its signal handlers, a Ctrl-C is Python's
KeyboardInterrupt wherever it lands, and one that lands while the command line's modules import would
end in a traceback. This module imports nothing of int8pipe's before it can catch that.
"""

from __future__ import annotations

import sys

EXIT_SIGINT = 130  # 128 + SIGINT, as the command line exits on a later Ctrl-C


def main() -> int:
    try:
        from pipeline.orchestration.cli import main as cli_main
    except KeyboardInterrupt:
        print("int8pipe: interrupted by SIGINT while starting; nothing ran", file=sys.stderr)
        return EXIT_SIGINT
    return cli_main()
