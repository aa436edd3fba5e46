"""Fairness between mailboxes: one worker serving two accounts of a private Dovecot (not a test).

    python -m bench.bench_fairness                  # SpamAssassin corpus in Anna's inbox, 3 rounds
    python -m bench.bench_fairness --synthetic 20000 --rounds 1

Anna's inbox holds a backlog (the 6,046-message SpamAssassin corpus, or ``--synthetic N`` small
messages) that a fresh index syncs for the first time; Boris idles. While Anna's first sync runs,
a message is delivered to Boris over LMTP, and again each time the last one is indexed; the
latency is from the start of the delivery to the row's ``indexed_at`` (the clock of the worker,
this process). Each round measures, in the same run:

- ``alone``: a worker serving Boris only (the floor: Dovecot's IDLE push and Boris's own pass);
- ``before``: the loop a worker would have had without this change: one pipeline per account
  stepped in turn, with the old pass bounds (5 s, batches of 500, the sizes of the whole backlog
  asked in every pass);
- ``after``: ``MailPipeline(..., accounts=[...])`` as it is.

It prints Boris's latency (median, max) and how long Anna's backlog took, per mode, and the ratios
of ``before`` to ``after``; the figures go to ``bench/results/fairness.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy import Engine, text

from bench._report import figure, headline, write_result
from bench._servers import synthetic_messages
from bench.corpus import iter_spamassassin
from emailops import account_watch
from emailops.config import SyncConfig
from emailops.imap import new_mail
from emailops.pipeline import MailPipeline
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from localmail.dovecot import LocalDovecot
from tests.index_helpers import imap_config, indexed_at, message

ANNA = "anna@example.test"
BORIS = "boris@example.test"


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    backlog_seconds: float = 0.0


def _count(engine: Engine, sql: str, **values: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), values).scalar_one())


ANNAS = (
    "SELECT count(*) FROM messages JOIN folders ON folders.id = messages.folder_id WHERE folders.account = :a"
)
SUBJECT = "SELECT count(*) FROM messages WHERE subject = :s"


@contextlib.contextmanager
def _old_pass_bounds() -> Iterator[None]:
    """The pass bounds the pipeline had before: 5 s, batches of 500, no window of sizes."""
    saved = (account_watch.PASS_BUDGET_SECONDS, account_watch.FETCH_BATCH_MESSAGES, new_mail.SIZE_WINDOW_UIDS)
    account_watch.PASS_BUDGET_SECONDS, account_watch.FETCH_BATCH_MESSAGES = 5.0, 500
    new_mail.SIZE_WINDOW_UIDS = 10**9
    try:
        yield
    finally:
        account_watch.PASS_BUDGET_SECONDS, account_watch.FETCH_BATCH_MESSAGES, new_mail.SIZE_WINDOW_UIDS = (
            saved
        )


def _measure(dovecot: LocalDovecot, db: Path, mode: str, backlog: int, tag: str) -> Run:
    engine = create_index_engine(f"sqlite:///{db}")
    migrate(engine)
    anna = (imap_config(dovecot, ANNA), SyncConfig(account=ANNA, poll_interval_seconds=300))
    boris = (imap_config(dovecot, BORIS), SyncConfig(account=BORIS, poll_interval_seconds=300))
    if mode == "after":
        pipelines = [MailPipeline(engine, *boris, owner="bench:w1", step_seconds=0.05, accounts=[anna])]
    elif mode == "before":
        pipelines = [
            MailPipeline(engine, *boris, owner="bench:w1", step_seconds=0.05),
            MailPipeline(engine, *anna, owner="bench:w1", step_seconds=0.05),
        ]
    else:
        pipelines = [MailPipeline(engine, *boris, owner="bench:w1", step_seconds=0.05)]

    def run_until(done: Callable[[], bool], limit: float = 600.0) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > limit:
                raise RuntimeError(f"{mode}: not done in {limit} s")
            for pipeline in pipelines:
                pipeline.run_once()
        return time.monotonic() - started

    def anna_done() -> bool:
        return mode == "alone" or _count(engine, ANNAS, a=ANNA) >= backlog

    def indexed(subject: str) -> Callable[[], bool]:
        return lambda: _count(engine, SUBJECT, s=subject) == 1

    boris_inbox = pipelines[0].accounts[0].watchers
    started = time.monotonic()
    run_until(lambda: "INBOX" in boris_inbox and boris_inbox["INBOX"].idling)
    result = Run()
    n = 0
    # Deliveries while Anna's backlog is being synced (alone: five).
    while (mode == "alone" and n < 5) or (mode != "alone" and not anna_done()):
        n += 1
        subject = f"for boris {tag} {mode} {n}"
        delivered_at = datetime.now(UTC)
        dovecot.deliver(BORIS, message(n, subject=subject, message_id=f"<{tag}-{mode}-{n}@example.org>"))
        run_until(indexed(subject))
        result.latencies.append((indexed_at(engine, subject) - delivered_at).total_seconds())
    run_until(anna_done)
    result.backlog_seconds = time.monotonic() - started
    for pipeline in pipelines:
        pipeline.close()
    engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alone, before, after (default 3)")
    parser.add_argument("--synthetic", type=int, default=0, help="N small messages instead of the corpus")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    runs: dict[str, list[Run]] = {"alone": [], "before": [], "after": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-fairness-") as work,
        LocalDovecot({ANNA: "anna-pw", BORIS: "boris-pw"}) as dovecot,
    ):
        backlog = dovecot.bulk_load(
            ANNA,
            "INBOX",
            synthetic_messages(args.synthetic) if args.synthetic else iter_spamassassin(),
        )
        headline(f"Boris's new mail while Anna's {backlog} messages are synced for the first time")
        for round_number in range(args.rounds):
            # A different order each round: the machine's load drifts.
            order = ["alone", "before", "after"] if round_number % 2 == 0 else ["after", "before", "alone"]
            for mode in order:
                db = Path(work) / f"{mode}-{round_number}.sqlite3"
                bounds = _old_pass_bounds() if mode == "before" else contextlib.nullcontext()
                with bounds:
                    runs[mode].append(_measure(dovecot, db, mode, backlog, f"r{round_number}"))
    summary: dict[str, dict[str, float]] = {}
    for mode, mode_runs in runs.items():
        latencies = [latency for run in mode_runs for latency in run.latencies]
        summary[mode] = {
            "deliveries": len(latencies),
            "latency_median_s": statistics.median(latencies),
            "latency_max_s": max(latencies),
            "backlog_s": statistics.median(run.backlog_seconds for run in mode_runs),
        }
        figure(
            f"{mode}: Boris's latency median / max",
            f"{summary[mode]['latency_median_s']:.2f} s / {summary[mode]['latency_max_s']:.2f} s"
            f" ({len(latencies)} deliveries)",
        )
        if mode != "alone":
            figure(f"{mode}: Anna's backlog synced in (median)", f"{summary[mode]['backlog_s']:.1f} s")
    before, after = summary["before"], summary["after"]
    figure("before / after, latency median", f"{before['latency_median_s'] / after['latency_median_s']:.1f}x")
    figure("before / after, latency max", f"{before['latency_max_s'] / after['latency_max_s']:.1f}x")
    figure("after / before, Anna's backlog time", f"{after['backlog_s'] / before['backlog_s']:.2f}x")
    write_result("fairness", {"backlog": backlog, "rounds": args.rounds, "summary": summary})


if __name__ == "__main__":
    main()
