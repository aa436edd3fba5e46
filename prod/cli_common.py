"""What every ``emailops`` command shares: exit codes, the index, JSON output, argument types."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import Engine

    from emailops.actions.changes import Change
    from prod.runtime_settings import RuntimeSettings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78
EXIT_USAGE = 2


class CommandError(Exception):
    """A command cannot go on: ``emailops COMMAND: message`` on stderr, exit ``code``."""

    def __init__(self, message: str, *, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def print_json(value: object) -> None:
    print(json.dumps(value, default=json_default, ensure_ascii=False, indent=2))


@contextmanager
def open_index(settings: RuntimeSettings) -> Iterator[Engine]:
    """The index, migrated, for one command. Disposed at the end of the command: that closes the
    SQLite connections (checkpointing the WAL) before the process exits, rather than leaving them
    to the garbage collector (which ``emailops.__main__`` skips at exit)."""
    from emailops.store.database import create_index_engine
    from emailops.store.migrations import migrate

    engine = create_index_engine(settings.index_db_url)
    try:
        migrate(engine)
        yield engine
    finally:
        engine.dispose()


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (SQLite takes a negative LIMIT as none)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def print_changes(changes: Sequence[Change], *, verb: str, what: str) -> int:
    """One line per row an operator's action changed (stdout) or refused, with why (stderr); exit 1
    when any was refused."""
    for change in changes:
        if change.done:
            print(f"{verb}: {what} {change.row_id}")
        else:
            print(f"not changed: {what} {change.row_id}: {change.refusal}", file=sys.stderr)
    return EXIT_OK if all(change.done for change in changes) else EXIT_FAILED
