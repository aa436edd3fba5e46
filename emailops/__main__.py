"""``python -m emailops``: the command line. It reads the environment, so it lives with the other
entry points in ``prod`` (the one place where ``emailops`` reaches into ``prod``)."""

from __future__ import annotations

import gc
import sys


def main() -> int:
    from prod.cli import main as cli_main

    try:
        return cli_main()
    finally:
        # Interpreter shutdown ends with a full garbage collection over every object still alive,
        # all of the imported modules included (its cost: bench/README.md). Nothing left at this
        # point needs it: each command closes what it opened (the
        # index engine is disposed, files and connections are closed by their ``with``), so the
        # survivors are moved out of the collector's reach and the process exits at once.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
