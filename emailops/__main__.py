"""``python -m emailops``: the command line. It reads the environment, so it lives with the other
entry points in ``prod`` (the one place where ``emailops`` reaches into ``prod``)."""

from __future__ import annotations

import sys


def main() -> int:
    from prod.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
