"""The store stage of an initial sync alone, on SQLite and PostgreSQL: where its time goes.

    python -m bench.bench_store                  # both backends
    python -m bench.bench_store --only postgresql

The SpamAssassin corpus (``bench.corpus``) is parsed once, then stored with ``insert_messages`` in
batches of 500 (as a sync stores them), each batch in its own transaction with its progress mark,
into a fresh index: a SQLite file in ``--scratch`` or a new PostgreSQL database on ``--pg`` (the
server must run on this machine: its backend's CPU is read from ``/proc``). Printed per step: wall
time, this process's CPU (``time.thread_time``) and the server backend's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy import Connection

from bench.corpus import load_spamassassin
from emailops.imap.parsing import parse_all
from emailops.mime.parse import DEFAULT_MAX_BODY_CHARS, DEFAULT_MAX_MESSAGE_BYTES
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from localmail.dovecot import default_scratch_root

BATCH = 500
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Step:
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0


def backend_cpu(conn: Connection) -> float:
    """CPU seconds of the PostgreSQL backend serving ``conn`` (0 on SQLite)."""
    if conn.dialect.name != "postgresql":
        return 0.0
    pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@contextlib.contextmanager
def measured(step: Step, conn: Connection) -> Iterator[None]:
    wall, client, server = time.perf_counter(), time.thread_time(), backend_cpu(conn)
    yield
    step.wall += time.perf_counter() - wall
    step.client_cpu += time.thread_time() - client
    step.server_cpu += backend_cpu(conn) - server


@contextlib.contextmanager
def scratch_url(backend: str, args: argparse.Namespace, scratch: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{scratch / 'store.db'}"
        return
    name = f"emailops_bench_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        server = psycopg.conninfo.conninfo_to_dict(args.pg)
        yield f"postgresql+psycopg://{server['user']}@{server['host']}:{server['port']}/{name}"
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def store_corpus(url: str, items: list[message_store.FetchedMessage]) -> dict[str, Step]:
    engine = create_index_engine(url)
    try:
        migrate(engine)
        steps = {"insert_messages": Step(), "progress mark": Step(), "commit": Step()}
        with engine.connect() as conn:
            folder_id = folder_store.ensure_folder(conn, "bench", "INBOX").id
            conn.commit()
            for start in range(0, len(items), BATCH):
                batch = items[start : start + BATCH]
                transaction = conn.begin()
                with measured(steps["insert_messages"], conn):
                    message_store.insert_messages(
                        conn, folder_id, 1, batch, baseline_uidnext=None, now=datetime.now(UTC)
                    )
                with measured(steps["progress mark"], conn):
                    folder_store.save_progress(conn, folder_id, uidnext=batch[-1].uid + 1)
                with measured(steps["commit"], conn):
                    transaction.commit()
        return steps
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--scratch", default=default_scratch_root())
    args = parser.parse_args(argv)
    raws = load_spamassassin()
    contents = parse_all([(raw, len(raw)) for raw in raws], DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_BODY_CHARS)
    items = [
        message_store.FetchedMessage(uid, (), datetime.now(UTC), None, content)
        for uid, content in enumerate(contents, start=1)
    ]
    for backend in [args.only] if args.only else ["sqlite", "postgresql"]:
        with (
            tempfile.TemporaryDirectory(dir=args.scratch) as scratch,
            scratch_url(backend, args, Path(scratch)) as url,
        ):
            steps = store_corpus(url, items)
        print(f"{backend}: {len(items):,} messages in batches of {BATCH}")
        for name, step in steps.items():
            print(
                f"   {name:<16} wall {step.wall:6.2f} s   this process {step.client_cpu:6.2f} s   "
                f"server {step.server_cpu:6.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
