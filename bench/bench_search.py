"""Search benchmark (prints figures; not a test).

    python -m bench.bench_search [--messages 100000] [--runs 20] [--only sqlite|postgres]

Builds an index of ``--messages`` messages on SQLite (in ``--scratch``, default /dev/shm) and on
PostgreSQL (a fresh database on ``--pg``), from the SpamAssassin corpus (``bench.corpus``) repeated
with fresh Message-IDs (each copy a day older and its own threads), stored through
``emailops.store.messages.insert_messages``. Then, for 20 representative queries (each operator,
two booleans, a thread query, relevance sort), the wall time of ``emailops.search.service.search``
(limit 50, snippets included) over ``--runs`` runs after one warm-up: p50 and p95; and of
``count`` for a few queries. ``--explain`` prints each query's plan. ``--against TREE`` times every
query in this tree and in another source tree (the baseline) on the same index instead, taking
turns run by run (``_search_worker.py``): on a shared machine both sides then meet the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from bench._report import figure, headline, percentile, write_result
from bench._servers import fresh_postgres
from bench.corpus import load_spamassassin
from emailops.mime.parse import parse_message
from emailops.search.postgres import PostgresBackend
from emailops.search.service import SearchOptions, Sort, count, search, search_statement
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import MessageContent, message_content
from emailops.store.database import create_index_engine, reading
from emailops.store.migrations import migrate

ACCOUNT = "bench@example.test@imap.example.test"
QUERIES: list[tuple[str, str, Sort]] = [
    ("free word", "linux", Sort.NEWEST),
    ("two words", "free software", Sort.NEWEST),
    ("phrase", '"click here"', Sort.NEWEST),
    ("prefix", "unsubscr*", Sort.NEWEST),
    ("from: domain", "from:yahoo.com", Sort.NEWEST),
    ("to: address", "to:zzzz@example.com", Sort.NEWEST),
    ("cc: word", "cc:exmh", Sort.NEWEST),
    ("subject:", "subject:razor", Sort.NEWEST),
    ("body: phrase", 'body:"mailing list"', Sort.NEWEST),
    ("attachment: / mimetype:", "mimetype:application/octet-stream", Sort.NEWEST),
    ("has:attachment", "has:attachment", Sort.NEWEST),
    ("is:unread", "is:unread", Sort.NEWEST),
    ("is:flagged", "is:flagged", Sort.NEWEST),
    ("date: month", "date:2002-08", Sort.NEWEST),
    ("newer_than:", "newer_than:30d", Sort.NEWEST),
    ("larger:", "larger:100k", Sort.NEWEST),
    ("id:", "id:<bench-3-100@bench.example>", Sort.NEWEST),
    ("thread:{query}", "thread:{subject:razor from:example.com}", Sort.NEWEST),
    ("boolean OR / NOT", "(linux OR windows) -money", Sort.NEWEST),
    ("boolean mixed", "from:yahoo.com is:unread -has:attachment", Sort.NEWEST),
    ("relevance", "money", Sort.RELEVANCE),
    ("folder: + word", "folder:Archive linux", Sort.NEWEST),
]
COUNTED = [
    "linux",
    '"click here"',
    "money",
    "is:unread",
    "is:flagged",
    "date:2002-08",
    "(linux OR windows) -money",
    "folder:Archive linux",
]
FLAG_SETS: list[tuple[str, ...]] = [
    ("\\Seen",),
    ("\\Seen",),
    (),
    ("\\Seen", "\\Flagged"),
    ("\\Seen", "\\Answered"),
]


@dataclass(frozen=True)
class Corpus:
    contents: list[MessageContent]
    newest: datetime


def load_corpus() -> Corpus:
    contents = [message_content(parse_message(raw)) for raw in load_spamassassin()]
    dates = [c.columns["date"] for c in contents if isinstance(c.columns["date"], datetime)]
    return Corpus(contents, max(d for d in dates if d.year < 2010))


def _copy(content: MessageContent, copy: int, index: int) -> MessageContent:
    columns = dict(content.columns)
    columns["message_id"] = f"<bench-{copy}-{index}@bench.example>"
    columns["thread_key"] = f"{columns['thread_key']}#{copy}"
    moment = columns["date"]
    if isinstance(moment, datetime):
        columns["date"] = moment - timedelta(days=copy)
    return content._replace(columns=columns)


def fill(engine: Engine, corpus: Corpus, total: int) -> float:
    started = time.perf_counter()
    uid = {"INBOX": 0, "Archive": 0}
    batch: dict[str, list[message_store.FetchedMessage]] = {"INBOX": [], "Archive": []}
    now = datetime.now(UTC)
    with engine.begin() as conn:
        folder_ids = {name: folder_store.ensure_folder(conn, ACCOUNT, name).id for name in uid}

    def flush(conn: Connection) -> None:
        for name, items in batch.items():
            if items:
                message_store.insert_messages(
                    conn, folder_ids[name], 1, items, baseline_uidnext=None, now=now
                )
                items.clear()

    done = 0
    while done < total:
        with engine.begin() as conn:
            for _ in range(min(5_000, total - done)):
                copy, index = divmod(done, len(corpus.contents))
                name = "Archive" if done % 5 == 4 else "INBOX"
                uid[name] += 1
                content = _copy(corpus.contents[index], copy, index)
                flags = FLAG_SETS[done % len(FLAG_SETS)]
                batch[name].append(message_store.FetchedMessage(uid[name], flags, now, None, content))
                done += 1
                if len(batch[name]) >= 500:
                    flush(conn)
            flush(conn)
    # What autovacuum does after such an insert: statistics, and on PostgreSQL the GIN index's
    # pending list merged and the visibility map set (VACUUM runs outside a transaction).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE" if conn.dialect.name == "sqlite" else "VACUUM ANALYZE")
    return time.perf_counter() - started


def _timed(function: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args)
    return (time.perf_counter() - started) * 1000, result


def explain(conn: Connection, query: str, options: SearchOptions) -> list[str]:
    """The plan of the (first) statement of ``search``, under the settings it runs with."""
    statement = search_statement(conn, ACCOUNT, query, options)
    # Rendered with the constants written into the SQL text (the flag patterns, literal_execute).
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    if conn.dialect.name == "sqlite":
        params = tuple(compiled.params[name] for name in compiled.positiontup or ())
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params).all()
        return [f"{'  ' * 0}{row[-1]}" for row in rows]
    ranked = options.sort is Sort.RELEVANCE
    with PostgresBackend(conn).reading_all_matches() if ranked else nullcontext():
        rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).all()
    return [row[0] for row in rows]


def measure(label: str, engine: Engine, corpus: Corpus, runs: int, show_plans: bool) -> dict[str, Any]:
    headline(f"{label}: search, limit 50 with snippets ({runs} runs after a warm-up)")
    target = 50.0 if label == "sqlite" else 100.0
    now = corpus.newest + timedelta(days=1)
    results: dict[str, Any] = {"queries": {}, "counts": {}, "plans": {}}
    with reading(engine) as conn:
        for name, query, sort in QUERIES:
            options = SearchOptions(sort=sort, limit=50, now=now)
            search(conn, ACCOUNT, query, options)
            times = [_timed(search, conn, ACCOUNT, query, options)[0] for _ in range(runs)]
            found = count(conn, ACCOUNT, query, options)
            p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
            figure(
                f"{name}: {query}"[:46],
                f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  ({found} found)",
                f"p95 < {target:.0f} ms",
                p95 < target,
            )
            results["queries"][query] = {"p50_ms": p50, "p95_ms": p95, "found": found}
            results["plans"][query] = explain(conn, query, options)
            if show_plans:
                print("      " + "\n      ".join(results["plans"][query]))
        headline(f"{label}: --count")
        for query in COUNTED:
            options = SearchOptions(now=now)
            count(conn, ACCOUNT, query, options)
            times = [_timed(count, conn, ACCOUNT, query, options)[0] for _ in range(runs)]
            p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
            figure(f"count {query}"[:46], f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms", "p95 < 20 ms", p95 < 20)
            results["counts"][query] = {"p50_ms": p50, "p95_ms": p95}
    return results


class _Side:
    """A ``_search_worker`` process running with the ``emailops`` of ``tree``."""

    def __init__(self, tree: Path, url: str) -> None:
        worker = Path(__file__).with_name("_search_worker.py")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, str(worker), url, ACCOUNT],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, kind: str, query: str, sort: Sort, now: datetime) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        job = {"kind": kind, "query": query, "sort": sort.value, "now": now.isoformat()}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return float(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def side_by_side(label: str, url: str, corpus: Corpus, runs: int, against: Path) -> dict[str, Any]:
    """Each query timed in this tree and in ``against`` (two processes on the same index), taking
    turns run by run, so that both sides meet the same load on a shared machine."""
    headline(f"{label}: this tree / {against} (p50 / p95 ms, {runs} runs each, taking turns)")
    now = corpus.newest + timedelta(days=1)
    sides = [_Side(Path(__file__).resolve().parents[1], url), _Side(against, url)]
    jobs = [("search", query, sort) for _, query, sort in QUERIES]
    jobs += [("count", query, Sort.NEWEST) for query in COUNTED]
    results: dict[str, Any] = {}
    for kind, query, sort in jobs:
        times: list[list[float]] = [[], []]
        for side in sides:
            side.run(kind, query, sort, now)
        for turn in range(runs):
            for index in (0, 1) if turn % 2 == 0 else (1, 0):
                times[index].append(sides[index].run(kind, query, sort, now))
        (p50, p95), (base50, base95) = ((percentile(t, 0.5), percentile(t, 0.95)) for t in times)
        name = f"{'--count ' if kind == 'count' else ''}{query}"
        figure(
            name[:46],
            f"{p50:7.1f} / {p95:7.1f}  against {base50:7.1f} / {base95:7.1f}  p95 {base95 / p95:5.1f}x",
        )
        results[name] = {"p50_ms": p50, "p95_ms": p95, "against_p50_ms": base50, "against_p95_ms": base95}
    for side in sides:
        side.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--explain", action="store_true", help="print each query's plan")
    parser.add_argument("--reuse", action="store_true", help="measure the index of the last run again")
    parser.add_argument(
        "--against",
        type=Path,
        help="a source tree (e.g. `git archive main`) to time side by side with this one, taking turns",
    )
    args = parser.parse_args()

    corpus = load_corpus()
    report: dict[str, Any] = {"messages": args.messages, "runs": args.runs}
    for label in ("sqlite", "postgres"):
        if args.only not in (None, label):
            continue
        if label == "sqlite":
            path = args.scratch / "emailops-bench-search.db"
            for leftover in [] if args.reuse else path.parent.glob(path.name + "*"):
                leftover.unlink()
            url = f"sqlite:///{path}"
        elif args.reuse:
            url = "postgresql+psycopg://postgres@127.0.0.1:5432/emailops_bench_search"
        else:
            url = fresh_postgres(args.pg, "emailops_bench_search")
        engine = create_index_engine(url)
        migrate(engine)
        seconds = 0.0 if args.reuse else fill(engine, corpus, args.messages)
        headline(f"{label}: {args.messages:,} messages indexed in {seconds:.0f} s")
        if args.against is not None:
            report[label] = {"side_by_side": side_by_side(label, url, corpus, args.runs, args.against)}
        else:
            report[label] = {
                "fill_seconds": seconds,
                **measure(label, engine, corpus, args.runs, args.explain),
            }
        engine.dispose()
    write_result("search", report)


if __name__ == "__main__":
    main()
