"""Sync benchmarks of issue 3: figures against a private Dovecot on loopback (not a test).

    python -m bench.bench_sync                       # every scenario, default sizes (a few minutes)
    python -m bench.bench_sync --only initial,poll   # some of them
    python -m bench.bench_sync --help

Scenarios (each prints its figures with the target and writes ``bench/results/<name>.json``):

- ``initial``: ``emailops sync --once`` (the whole process, fresh index and cache each run) of the
  6,046-message SpamAssassin corpus, against ``mbsync`` to a Maildir followed by ``notmuch new``;
  both in the same run, alternating which goes first, medians of ``--runs``.
- ``idle-bytes``: ``python -m prod.run`` watching the corpus folder in IDLE, nothing arriving:
  bytes from the server in ``--idle-seconds``, through a counting proxy.
- ``idle-latency``: the same daemon; ``--deliveries`` messages delivered one by one over LMTP, each
  with a unique word; the SQLite full-text index is polled every ``--probe-ms`` until the word is
  found. Latency is from the start of the LMTP delivery to the first successful search.
- ``poll``: one ``FolderSync.sync()`` pass with nothing new on a ``--big``-message folder and on a
  ``--small``-message folder (each in its own index), through the counting proxy: wall time, IMAP
  commands (round trips) and bytes; medians of ``--poll-repeats``.
- ``memory``: peak resident memory (``ru_maxrss``) of ``emailops sync --once`` indexing the
  ``--big`` folder, and a folder holding one ``--huge-mb`` message (default limit, then the limit
  raised above the message's size so that it is fetched whole).
- ``metrics``: the cost of the Prometheus metrics: ``python -m prod.run`` (one worker) indexing the
  corpus into a fresh index, with ``METRICS_PORT`` set and unset, alternating, ``--runs`` each:
  sync throughput (messages per second between the first and the last batch's commit), wall time
  from the start to the last row, and CPU time of the daemon's processes; medians.
- ``backends``: ``emailops sync --once`` of the corpus into a fresh SQLite index and into a fresh
  PostgreSQL database (``--pg``), alternating, ``--runs`` each: medians and the ratio
  PostgreSQL / SQLite. ``--compare-with DIR`` adds a third side, another checkout's ``emailops``
  on PostgreSQL (``git archive main | tar -x -C DIR``: before and after in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from sqlalchemy import create_engine, text

from bench._report import RESULTS_DIR, figure, headline, percentile, write_result
from bench._servers import (
    BENCH_PASSWORD,
    BENCH_USER,
    REPO_ROOT,
    ChildResult,
    Daemon,
    PushProbe,
    emailops_env,
    emailops_sync_once,
    huge_message,
    run_child,
    start_dovecot,
    synthetic_messages,
    token_message,
)
from bench.imap_proxy import CountingProxy
from localmail.dovecot import LocalDovecot, default_scratch_root, free_loopback_port

SCENARIOS = ("initial", "idle-bytes", "idle-latency", "poll", "memory", "metrics", "backends")
ACCOUNT = f"{BENCH_USER}@127.0.0.1"
MB = 1024 * 1024


# -- shared fixtures -------------------------------------------------------------------------


class Bench:
    """Servers and data shared by the scenarios of one run, made on first use, closed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scratch = Path(tempfile.mkdtemp(prefix="emailops-bench-", dir=args.scratch))
        self._stack = contextlib.ExitStack()
        self._corpus: list[bytes] | None = None
        self._corpus_dovecot: LocalDovecot | None = None
        self._big_dovecot: LocalDovecot | None = None
        self.big_syncs: dict[str, tuple[ChildResult, Path]] = {}

    def close(self) -> None:
        self._stack.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def workdir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch))
        return path

    @property
    def corpus(self) -> list[bytes]:
        if self._corpus is None:
            from bench.corpus import load_spamassassin

            self._corpus = load_spamassassin()
        return self._corpus

    def corpus_dovecot(self) -> LocalDovecot:
        """A Dovecot whose INBOX holds the corpus, its index built and its files in the page cache."""
        if self._corpus_dovecot is None:
            dovecot = self._stack.enter_context(start_dovecot())
            dovecot.bulk_load(BENCH_USER, "INBOX", self.corpus)
            warm_up(dovecot, "INBOX")
            self._corpus_dovecot = dovecot
        return self._corpus_dovecot

    def big_dovecot(self) -> LocalDovecot:
        """A Dovecot with folders ``Big`` (``--big`` messages), ``Small`` and ``Huge``."""
        if self._big_dovecot is None:
            dovecot = self._stack.enter_context(start_dovecot())
            started = time.perf_counter()
            dovecot.bulk_load(BENCH_USER, "Big", synthetic_messages(self.args.big, seed=1))
            dovecot.bulk_load(BENCH_USER, "Small", synthetic_messages(self.args.small, seed=2))
            dovecot.bulk_load(
                BENCH_USER,
                "Huge",
                [*synthetic_messages(3, seed=3), huge_message(self.args.huge_mb * MB)],
            )
            for folder in ("Big", "Small", "Huge"):
                warm_up(dovecot, folder)
            print(
                f"   (loaded {self.args.big:,} + {self.args.small:,} messages and a "
                f"{self.args.huge_mb} MB one in {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            self._big_dovecot = dovecot
        return self._big_dovecot

    def synced_folder(self, folder: str) -> tuple[ChildResult, Path]:
        """``emailops sync --once`` of one folder of the big Dovecot into a fresh index (once)."""
        if folder not in self.big_syncs:
            dovecot = self.big_dovecot()
            work = self.workdir(f"sync-{folder.lower()}")
            env = emailops_env(imap_port=dovecot.imap_port, work_dir=work, folders=folder)
            self.big_syncs[folder] = (emailops_sync_once(env, work), work)
        return self.big_syncs[folder]


def warm_up(dovecot: LocalDovecot, folder: str) -> None:
    """Read every message once through Dovecot, untimed, so that no measured client pays for
    Dovecot's first scan of the maildir (UID assignment, index and cache files)."""
    subprocess.run(
        [
            "doveadm", "-c", str(dovecot.config_file), "fetch", "-u", BENCH_USER,
            "uid flags date.received size.virtual text", "mailbox", folder, "all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=600,
    )  # fmt: skip


def index_counts(db: Path) -> tuple[int, int]:
    """(live messages, full-text rows) of an index, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        live = conn.execute("SELECT count(*) FROM messages WHERE expunged_at IS NULL").fetchone()[0]
        fts = conn.execute("SELECT count(*) FROM messages_fts").fetchone()[0]
    return int(live), int(fts)


# -- 1. initial sync versus mbsync + notmuch -----------------------------------------------------


@dataclass
class InitialRun:
    ours_seconds: float
    ours_max_rss_mb: float
    mbsync_seconds: float
    notmuch_seconds: float
    baseline_seconds: float


def run_ours_initial(bench: Bench, dovecot: LocalDovecot, expected: int) -> ChildResult:
    work = bench.workdir("ours")
    try:
        result = emailops_sync_once(emailops_env(imap_port=dovecot.imap_port, work_dir=work), work)
        live, fts = index_counts(work / "emailops.db")
        if live != expected or fts != expected:
            raise RuntimeError(f"emailops indexed {live} messages ({fts} in FTS), expected {expected}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_baseline_initial(bench: Bench, dovecot: LocalDovecot, expected: int) -> tuple[float, float]:
    """mbsync (pull INBOX into a fresh Maildir) then ``notmuch new`` (fresh database)."""
    work = bench.workdir("baseline")
    try:
        mail = work / "mail"
        mail.mkdir()
        config = work / "mbsyncrc"
        config.write_text(
            f"IMAPAccount bench\nHost 127.0.0.1\nPort {dovecot.imap_port}\nUser {BENCH_USER}\n"
            f"Pass {BENCH_PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\n"
            "IMAPStore remote\nAccount bench\n\n"
            f"MaildirStore local\nPath {mail}/\nInbox {mail}/INBOX\nSubFolders Verbatim\n\n"
            "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\n"
            "Sync Pull\nSyncState *\n"
        )
        notmuch_config = work / "notmuch-config"
        notmuch_config.write_text(
            f"[database]\npath={mail}\n\n[new]\ntags=unread;inbox;\n"
            "ignore=.mbsyncstate;.uidvalidity\n\n[maildir]\nsynchronize_flags=true\n"
        )
        env = {**os.environ, "NOTMUCH_CONFIG": str(notmuch_config)}
        mbsync = run_child(["mbsync", "-c", str(config), "-a", "-q"], env=env, cwd=work)
        if mbsync.returncode != 0:
            raise RuntimeError(f"mbsync exited {mbsync.returncode}: {mbsync.stderr[-1000:]}")
        notmuch = run_child(["notmuch", "new", "--quiet"], env=env, cwd=work)
        if notmuch.returncode != 0:
            raise RuntimeError(f"notmuch new exited {notmuch.returncode}: {notmuch.stderr[-1000:]}")
        count = subprocess.run(
            ["notmuch", "count", "*"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        if int(count) != expected:
            raise RuntimeError(f"notmuch indexed {count} messages, expected {expected}")
        return mbsync.seconds, notmuch.seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scenario_initial(bench: Bench) -> None:
    runs = bench.args.runs
    headline(f"initial sync of the SpamAssassin corpus: emailops vs mbsync + notmuch ({runs} runs)")
    dovecot = bench.corpus_dovecot()
    expected = len(bench.corpus)
    runs: list[InitialRun] = []
    for n in range(bench.args.runs):
        # Alternate the order so that neither side always runs on a machine the other just heated.
        order = ("ours", "baseline") if n % 2 == 0 else ("baseline", "ours")
        ours: ChildResult | None = None
        mbsync_s = notmuch_s = 0.0
        for side in order:
            if side == "ours":
                ours = run_ours_initial(bench, dovecot, expected)
            else:
                mbsync_s, notmuch_s = run_baseline_initial(bench, dovecot, expected)
        assert ours is not None
        run = InitialRun(ours.seconds, ours.max_rss_bytes / MB, mbsync_s, notmuch_s, mbsync_s + notmuch_s)
        runs.append(run)
        print(
            f"   run {n + 1}: emailops {run.ours_seconds:.2f} s | mbsync {mbsync_s:.2f} s + "
            f"notmuch new {notmuch_s:.2f} s = {run.baseline_seconds:.2f} s",
            flush=True,
        )
    ours_median = statistics.median(r.ours_seconds for r in runs)
    baseline_median = statistics.median(r.baseline_seconds for r in runs)
    ratio = baseline_median / ours_median
    figure("messages", f"{expected:,}")
    figure("emailops sync --once (median)", f"{ours_median:.2f} s  ({expected / ours_median:,.0f} msg/s)")
    figure("mbsync (median)", f"{statistics.median(r.mbsync_seconds for r in runs):.2f} s")
    figure("notmuch new (median)", f"{statistics.median(r.notmuch_seconds for r in runs):.2f} s")
    figure("mbsync + notmuch new (median)", f"{baseline_median:.2f} s")
    figure("speed-up baseline/ours", f"{ratio:.1f}x", ">= 10x", ratio >= 10)
    figure("emailops peak RSS (median)", f"{statistics.median(r.ours_max_rss_mb for r in runs):.0f} MB")
    profile = None
    if bench.args.profile:
        profile = profile_initial(bench, dovecot)
    write_result(
        "initial",
        {
            "messages": expected,
            "scratch": str(bench.args.scratch),
            "runs": [asdict(r) for r in runs],
            "ours_median_seconds": ours_median,
            "mbsync_median_seconds": statistics.median(r.mbsync_seconds for r in runs),
            "notmuch_median_seconds": statistics.median(r.notmuch_seconds for r in runs),
            "baseline_median_seconds": baseline_median,
            "ratio_baseline_over_ours": ratio,
            "target_ratio": 10,
            "met": ratio >= 10,
            "profile": profile,
        },
    )


def profile_initial(bench: Bench, dovecot: LocalDovecot) -> str:
    """One more ``emailops sync --once`` under cProfile; the profile lands in bench/results."""
    work = bench.workdir("profile")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    output = RESULTS_DIR / "initial.prof"
    env = emailops_env(imap_port=dovecot.imap_port, work_dir=work)
    argv = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "emailops", "sync", "--once"]
    subprocess.run(argv, env=env, cwd=work, check=True, capture_output=True, timeout=900)
    shutil.rmtree(work, ignore_errors=True)
    print(f"   profile of one more run: {output} (python -m pstats {output})")
    return str(output)


# -- 2 and 5. the daemon in IDLE -------------------------------------------------------------------


@contextlib.contextmanager
def running_daemon(bench: Bench) -> Iterator[tuple[LocalDovecot, CountingProxy, Path]]:
    """``prod.run`` watching the corpus INBOX through a counting proxy, caught up and in IDLE."""
    dovecot = bench.corpus_dovecot()
    expected = dovecot.folder_status(BENCH_USER)["messages"]
    with CountingProxy(dovecot.host, dovecot.imap_port) as proxy:
        work = bench.workdir("daemon")
        env = emailops_env(imap_port=proxy.port, work_dir=work, extra={"WORKERS": "1"})
        daemon = Daemon(env, work)
        try:
            db = work / "emailops.db"
            deadline = time.monotonic() + 300
            while True:
                if not daemon.alive():
                    raise RuntimeError(f"prod.run exited {daemon.process.returncode}:\n{daemon.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not catch up in time:\n{daemon.log_tail()}")
                caught_up = db.exists() and _live_count(db) >= expected
                commands = proxy.snapshot().commands
                if caught_up and commands and commands[-1] == "IDLE":
                    break
                time.sleep(0.1)
            yield dovecot, proxy, db
        finally:
            daemon.stop()
            if "Traceback" in daemon.log_tail(100_000):
                print("   note: the daemon logged a traceback; see below\n" + daemon.log_tail())
            shutil.rmtree(work, ignore_errors=True)


def _live_count(db: Path) -> int:
    try:
        return index_counts(db)[0]
    except sqlite3.Error:
        return 0


def scenario_idle_bytes(bench: Bench, proxy: CountingProxy) -> None:
    seconds = bench.args.idle_seconds
    headline(f"idle: bytes from the server in {seconds:.0f} s with nothing new (prod.run, IDLE)")
    proxy.reset()
    time.sleep(seconds)
    traffic = proxy.snapshot()
    received = traffic.server_bytes
    figure("bytes received from the server", f"{received:,} B", "< 20 KB", received < 20_000)
    figure("bytes sent to the server", f"{traffic.client_bytes:,} B")
    figure("commands sent", f"{traffic.round_trips} {traffic.commands}")
    write_result(
        "idle-bytes",
        {
            "seconds": seconds,
            "server_bytes": traffic.server_bytes,
            "client_bytes": traffic.client_bytes,
            "commands": traffic.commands,
            "target_server_bytes": 20_000,
            "met": traffic.server_bytes < 20_000,
        },
    )


def scenario_idle_latency(bench: Bench, dovecot: LocalDovecot, db: Path) -> None:
    count = bench.args.deliveries
    headline(f"new mail visible in search: {count} LMTP deliveries, prod.run in IDLE")
    probe_seconds = bench.args.probe_ms / 1000
    rng = random.Random(11)
    latencies: list[float] = []
    delivery_seconds: list[float] = []
    push_seconds: list[float] = []
    probe = PushProbe(dovecot)
    with (
        contextlib.closing(probe),
        contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn,
    ):
        for n in range(count):
            token = f"probe{uuid.uuid4().hex}"
            raw = token_message(token, n)
            started = time.perf_counter()
            dovecot.deliver(BENCH_USER, raw)
            delivered = time.perf_counter()
            deadline = delivered + 30
            while not conn.execute(
                "SELECT 1 FROM messages_fts WHERE messages_fts MATCH ?", (f'"{token}"',)
            ).fetchone():
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"message {n} not searchable after 30 s")
                time.sleep(probe_seconds)
            latencies.append(time.perf_counter() - started)
            delivery_seconds.append(delivered - started)
            pushed = probe.first_after(started)
            if pushed is not None:
                push_seconds.append(pushed - started)
            # A random pause, so that deliveries do not fall in step with the worker's 1 s loop.
            time.sleep(rng.uniform(0.05, 0.5))
    p50, p95 = percentile(latencies, 0.50), percentile(latencies, 0.95)
    figure("LMTP delivery itself (median)", f"{statistics.median(delivery_seconds) * 1000:.0f} ms")
    figure("delivery -> searchable p50", f"{p50 * 1000:.0f} ms", "< 300 ms", p50 < 0.3)
    figure("delivery -> searchable p95", f"{p95 * 1000:.0f} ms", "< 1 s", p95 < 1.0)
    figure("delivery -> searchable max", f"{max(latencies) * 1000:.0f} ms")
    push_p50 = percentile(push_seconds, 0.5) if push_seconds else float("nan")
    figure("delivery -> IDLE EXISTS at a bare client p50", f"{push_p50 * 1000:.0f} ms  (Dovecot's own delay)")
    figure("emailops' share (p50 minus that)", f"{(p50 - push_p50) * 1000:.0f} ms")
    write_result(
        "idle-latency",
        {
            "deliveries": count,
            "runner": "python -m prod.run (WORKERS=1), through the counting proxy",
            "latencies_ms": [round(v * 1000, 1) for v in latencies],
            "lmtp_delivery_ms": [round(v * 1000, 1) for v in delivery_seconds],
            "idle_push_ms": [round(v * 1000, 1) for v in push_seconds],
            "idle_push_p50_ms": push_p50 * 1000,
            "p50_ms": p50 * 1000,
            "p95_ms": p95 * 1000,
            "max_ms": max(latencies) * 1000,
            "met": p50 < 0.3 and p95 < 1.0,
        },
    )


# -- 3. a poll with nothing new ------------------------------------------------------------------


@dataclass
class PollFigures:
    folder: str
    messages: int
    median_ms: float
    p95_ms: float
    select_only_median_ms: float
    round_trips: int
    commands: list[str]
    client_bytes: int
    server_bytes: int


def measure_poll(bench: Bench, folder: str, messages: int) -> PollFigures:
    from emailops.config import ServerConfig, SyncConfig, TlsSecurity
    from emailops.imap.connection import connect, logout_quietly
    from emailops.imap.sync import FolderSync
    from emailops.store.database import create_index_engine

    dovecot = bench.big_dovecot()
    _result, work = bench.synced_folder(folder)
    engine = create_index_engine(f"sqlite:///{work / 'emailops.db'}")
    sync = FolderSync(engine, SyncConfig(account=ACCOUNT, folders=(folder,)), folder)
    with CountingProxy(dovecot.host, dovecot.imap_port) as proxy:
        server = ServerConfig(
            host=proxy.host, port=proxy.port, username=BENCH_USER, password=BENCH_PASSWORD,
            security=TlsSecurity.NONE,
        )  # fmt: skip
        client = connect(server)
        try:
            for _ in range(3):
                sync.sync(client)
            seconds: list[float] = []
            traffic = []
            for _ in range(bench.args.poll_repeats):
                proxy.reset()
                started = time.perf_counter()
                report = sync.sync(client)
                seconds.append(time.perf_counter() - started)
                traffic.append(proxy.snapshot())
                if report.new or report.expunged or report.flags_changed:
                    raise RuntimeError(f"a poll with nothing new found changes: {report}")
            select_seconds = []
            for _ in range(bench.args.poll_repeats):
                started = time.perf_counter()
                sync.select(client)
                select_seconds.append(time.perf_counter() - started)
        finally:
            logout_quietly(client)
            engine.dispose()
    last = traffic[-1]
    return PollFigures(
        folder=folder,
        messages=messages,
        median_ms=statistics.median(seconds) * 1000,
        p95_ms=percentile(seconds, 0.95) * 1000,
        select_only_median_ms=statistics.median(select_seconds) * 1000,
        round_trips=max(t.round_trips for t in traffic),
        commands=last.commands,
        client_bytes=max(t.client_bytes for t in traffic),
        server_bytes=max(t.server_bytes for t in traffic),
    )


def scenario_poll(bench: Bench) -> None:
    args = bench.args
    headline(f"poll with nothing new: {args.big:,}-message vs {args.small:,}-message folder")
    bench.big_dovecot()
    for folder in ("Big", "Small"):
        result, _work = bench.synced_folder(folder)
        print(f"   (initial sync of {folder}: {result.seconds:.1f} s)", flush=True)
    big = measure_poll(bench, "Big", args.big)
    small = measure_poll(bench, "Small", args.small)
    ratio = big.median_ms / small.median_ms
    for figures in (small, big):
        figure(
            f"{figures.messages:,} messages: FolderSync.sync()",
            f"{figures.median_ms:.2f} ms median, {figures.p95_ms:.2f} ms p95 "
            f"(SELECT alone {figures.select_only_median_ms:.2f} ms)",
        )
        figure(
            f"{figures.messages:,} messages: round trips",
            f"{figures.round_trips} {figures.commands}",
            "<= 3",
            figures.round_trips <= 3,
        )
        figure(
            f"{figures.messages:,} messages: bytes",
            f"{figures.client_bytes} B sent, {figures.server_bytes} B received",
        )
    figure("cost ratio big/small (median time)", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
    write_result(
        "poll",
        {
            "small": asdict(small),
            "big": asdict(big),
            "ratio_big_over_small": ratio,
            "repeats": args.poll_repeats,
            "met": ratio <= 1.5 and big.round_trips <= 3 and small.round_trips <= 3,
        },
    )


# -- 4. peak memory --------------------------------------------------------------------------------


def scenario_memory(bench: Bench) -> None:
    args = bench.args
    headline("peak memory (ru_maxrss) of emailops sync --once")
    dovecot = bench.big_dovecot()
    big, _work = bench.synced_folder("Big")
    limit_mb = 150
    big_mb = big.max_rss_bytes / MB
    figure(
        f"{args.big:,} messages",
        f"{big_mb:.0f} MB  (sync took {big.seconds:.1f} s, {args.big / big.seconds:,.0f} msg/s)",
        f"< {limit_mb} MB",
        big_mb < limit_mb,
    )
    huge: dict[str, float] = {}
    for label, extra in (
        ("default MAX_MESSAGE_BYTES (25 MiB)", {}),
        ("MAX_MESSAGE_BYTES above the message", {"MAX_MESSAGE_BYTES": str((args.huge_mb + 16) * MB)}),
    ):
        work = bench.workdir("huge")
        env = emailops_env(imap_port=dovecot.imap_port, work_dir=work, folders="Huge", extra=extra)
        result = emailops_sync_once(env, work)
        live, _fts = index_counts(work / "emailops.db")
        shutil.rmtree(work, ignore_errors=True)
        if live != 4:
            raise RuntimeError(f"the Huge folder indexed {live} messages, expected 4")
        mb = result.max_rss_bytes / MB
        huge[label] = mb
        figure(
            f"{args.huge_mb} MB message, {label}",
            f"{mb:.0f} MB  ({result.seconds:.1f} s)",
            f"< {limit_mb} MB",
            mb < limit_mb,
        )
    write_result(
        "memory",
        {
            "big_messages": args.big,
            "big_max_rss_mb": big_mb,
            "big_sync_seconds": big.seconds,
            "huge_message_mb": args.huge_mb,
            "huge_max_rss_mb": huge,
            "target_mb": limit_mb,
            "met": big_mb < limit_mb and all(v < limit_mb for v in huge.values()),
        },
    )


# -- main ------------------------------------------------------------------------------------------


# -- 6. the cost of the metrics -------------------------------------------------------------------


@dataclass
class MetricsRun:
    metrics_on: bool
    seconds: float  # from the daemon's start to the last row
    cpu_seconds: float  # of all the daemon's processes, start and stop included
    sync_rate: float  # messages per second from the first batch's commit to the last's


def sync_rate(db: Path) -> float:
    """Messages indexed per second between the first batch's commit and the last's (each batch's
    rows share their commit time, ``indexed_at``): the sync alone, without the daemon's start."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        first, last = conn.execute("SELECT min(indexed_at), max(indexed_at) FROM messages").fetchone()
        after_first = conn.execute("SELECT count(*) FROM messages WHERE indexed_at > ?", (first,)).fetchone()[
            0
        ]
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return after_first / seconds


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_daemon_initial(bench: Bench, dovecot: LocalDovecot, expected: int, *, metrics_on: bool) -> MetricsRun:
    """The daemon's initial sync of the corpus; with metrics on, one scrape afterwards proves they
    counted every message (its cost, a few milliseconds, is in the CPU figure)."""
    work = bench.workdir("metrics-on" if metrics_on else "metrics-off")
    port = free_loopback_port()
    extra = {"WORKERS": "1", **({"METRICS_PORT": str(port)} if metrics_on else {})}
    env = emailops_env(imap_port=dovecot.imap_port, work_dir=work, extra=extra)
    db = work / "emailops.db"
    cpu_before = _children_cpu_seconds()
    started = time.perf_counter()
    daemon = Daemon(env, work)
    try:
        while not (db.exists() and _live_count(db) >= expected):
            if not daemon.alive():
                raise RuntimeError(f"prod.run exited {daemon.process.returncode}:\n{daemon.log_tail()}")
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"the daemon did not index the corpus in time:\n{daemon.log_tail()}")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        rate = sync_rate(db)
        if metrics_on:
            wanted = f'emailops_messages_indexed_total{{folder="INBOX"}} {float(expected)}'
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                if wanted not in answer.read().decode():
                    raise RuntimeError(f"the metrics do not say {wanted}")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return MetricsRun(metrics_on, seconds, _children_cpu_seconds() - cpu_before, rate)


def scenario_metrics(bench: Bench) -> None:
    headline(
        f"cost of the metrics: the daemon's initial sync, METRICS_PORT set and unset ({bench.args.runs} runs)"
    )
    dovecot = bench.corpus_dovecot()
    expected = len(bench.corpus)
    runs: list[MetricsRun] = []
    for n in range(bench.args.runs):
        for metrics_on in (False, True) if n % 2 == 0 else (True, False):
            run = run_daemon_initial(bench, dovecot, expected, metrics_on=metrics_on)
            runs.append(run)
            print(
                f"   run {n + 1}, metrics {'on ' if metrics_on else 'off'}: {run.sync_rate:,.0f} msg/s, "
                f"{run.seconds:.2f} s from the start, CPU {run.cpu_seconds:.2f} s",
                flush=True,
            )

    def median(on: bool, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in runs if r.metrics_on is on)

    off_rate, on_rate = median(False, "sync_rate"), median(True, "sync_rate")
    off_s, on_s = median(False, "seconds"), median(True, "seconds")
    off_cpu, on_cpu = median(False, "cpu_seconds"), median(True, "cpu_seconds")
    rate_cost = 1 - on_rate / off_rate
    figure("messages", f"{expected:,}")
    figure("sync throughput, metrics off (median)", f"{off_rate:,.0f} msg/s")
    figure("sync throughput, metrics on (median)", f"{on_rate:,.0f} msg/s")
    figure("cost in throughput", f"{rate_cost:+.1%}", "<= 3 %", rate_cost <= 0.03)
    # The best run of each side is the least disturbed by other load on the machine.
    best_off = max(r.sync_rate for r in runs if not r.metrics_on)
    best_on = max(r.sync_rate for r in runs if r.metrics_on)
    figure("best run, off / on", f"{best_off:,.0f} / {best_on:,.0f} msg/s ({1 - best_on / best_off:+.1%})")
    figure("start to last row, off / on (median)", f"{off_s:.2f} s / {on_s:.2f} s ({on_s / off_s - 1:+.1%})")
    figure(
        "CPU of the daemon, off / on (median)",
        f"{off_cpu:.2f} s / {on_cpu:.2f} s ({on_cpu / off_cpu - 1:+.1%})",
    )
    write_result(
        "metrics",
        {
            "messages": expected,
            "runs": [asdict(r) for r in runs],
            "off_median_sync_rate": off_rate,
            "on_median_sync_rate": on_rate,
            "off_median_seconds": off_s,
            "on_median_seconds": on_s,
            "off_median_cpu_seconds": off_cpu,
            "on_median_cpu_seconds": on_cpu,
            "throughput_cost": rate_cost,
            "best_off_sync_rate": best_off,
            "best_on_sync_rate": best_on,
            "target_cost": 0.03,
            "met": rate_cost <= 0.03,
        },
    )


# -- 7. PostgreSQL against SQLite ---------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One side of ``backends``: which database, and which checkout's ``emailops`` writes it."""

    label: str
    database: str  # sqlite or postgresql
    checkout: Path


@dataclass
class BackendRun:
    seconds: float  # wall time of ``emailops sync --once``
    cpu_seconds: float  # of its processes (the parsing helper included)
    server_cpu_seconds: float  # of the PostgreSQL backends serving its database (0 on SQLite)

    @property
    def total_cpu_seconds(self) -> float:
        return self.cpu_seconds + self.server_cpu_seconds


@contextlib.contextmanager
def scratch_index(bench: Bench, backend: Backend, work: Path) -> Iterator[tuple[str, str | None]]:
    """The URL of a fresh, empty index and its PostgreSQL database name (None for a SQLite file in
    ``work``); the database is created before and dropped after the timed child."""
    if backend.database == "sqlite":
        yield f"sqlite:///{work / 'emailops.db'}", None
        return
    name = f"emailops_bench_sync_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(bench.args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        server = psycopg.conninfo.conninfo_to_dict(bench.args.pg)
        yield f"postgresql+psycopg://{server['user']}@{server['host']}:{server['port']}/{name}", name
    finally:
        with psycopg.connect(bench.args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU seconds of the PostgreSQL backends serving ``database``, read from ``/proc`` every
    ``interval`` while they run (the server must run on this machine). The last interval of each
    backend is missed: a few hundredths of a second."""

    def __init__(self, conninfo: str, database: str, interval: float = 0.02) -> None:
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(conninfo, database, interval), daemon=True)
        self._thread.start()

    def _watch(self, conninfo: str, database: str, interval: float) -> None:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            while not self._stop.is_set():
                found = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
                for (pid,) in found.fetchall():
                    with contextlib.suppress(OSError):
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        self._seen[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
                self._stop.wait(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self._seen.values())


def indexed_counts(url: str) -> tuple[int, int]:
    """(live messages, full-text rows) of an index on either backend."""
    count_terms = (
        "SELECT count(*) FROM search_fts" if url.startswith("sqlite") else "SELECT count(*) FROM search_terms"
    )
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            live = conn.execute(text("SELECT count(*) FROM messages WHERE expunged_at IS NULL")).scalar_one()
            terms = conn.execute(text(count_terms)).scalar_one()
    finally:
        engine.dispose()
    return int(live), int(terms)


def run_backend_initial(bench: Bench, dovecot: LocalDovecot, expected: int, backend: Backend) -> BackendRun:
    """One ``emailops sync --once`` of the corpus into a fresh index of ``backend``."""
    work = bench.workdir(backend.label.replace(" ", "-").replace(",", ""))
    try:
        with scratch_index(bench, backend, work) as (url, database):
            env = emailops_env(
                imap_port=dovecot.imap_port,
                work_dir=work,
                checkout=backend.checkout,
                extra={"INDEX_DB_URL": url},
            )
            server = ServerCpu(bench.args.pg, database) if database else None
            result = emailops_sync_once(env, work)
            server_cpu = server.stop() if server else 0.0
            live, terms = indexed_counts(url)
        if live != expected or terms != expected:
            raise RuntimeError(
                f"{backend.label}: {live} messages indexed ({terms} searchable), expected {expected}"
            )
        return BackendRun(result.seconds, result.cpu_seconds, server_cpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scenario_backends(bench: Bench) -> None:
    sides = [Backend("sqlite", "sqlite", REPO_ROOT), Backend("postgresql", "postgresql", REPO_ROOT)]
    if bench.args.compare_with:
        sides.append(Backend("postgresql, compared", "postgresql", Path(bench.args.compare_with).resolve()))
    headline(f"initial sync of the SpamAssassin corpus, PostgreSQL against SQLite ({bench.args.runs} runs)")
    dovecot = bench.corpus_dovecot()
    expected = len(bench.corpus)
    runs: dict[str, list[BackendRun]] = {side.label: [] for side in sides}
    for n in range(bench.args.runs):
        # A different side first in each run, so that none always runs on a machine another just heated.
        order = sides[n % len(sides) :] + sides[: n % len(sides)]
        for side in order:
            runs[side.label].append(run_backend_initial(bench, dovecot, expected, side))
        last = {label: side_runs[-1] for label, side_runs in runs.items()}
        print(
            f"   run {n + 1}: "
            + " | ".join(
                f"{label} {run.seconds:.2f} s (CPU {run.cpu_seconds:.2f} + {run.server_cpu_seconds:.2f} s)"
                for label, run in last.items()
            )
            + f" | postgresql / sqlite {last['postgresql'].seconds / last['sqlite'].seconds:.2f}x",
            flush=True,
        )

    def median(label: str, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in runs[label])

    figure("messages", f"{expected:,}")
    for side in sides:
        walls = [run.seconds for run in runs[side.label]]
        figure(
            f"{side.label}: wall (median, min-max)",
            f"{median(side.label, 'seconds'):.2f} s ({min(walls):.2f}-{max(walls):.2f})",
        )
        figure(
            f"{side.label}: CPU, client + server (median)",
            f"{median(side.label, 'cpu_seconds'):.2f} + {median(side.label, 'server_cpu_seconds'):.2f} s "
            f"= {median(side.label, 'total_cpu_seconds'):.2f} s",
        )
    ratios = [pg.seconds / lite.seconds for pg, lite in zip(runs["postgresql"], runs["sqlite"], strict=True)]
    ratio = median("postgresql", "seconds") / median("sqlite", "seconds")
    cpu_ratio = median("postgresql", "total_cpu_seconds") / median("sqlite", "total_cpu_seconds")
    figure("wall ratio of each run, min-max", f"{min(ratios):.2f}x-{max(ratios):.2f}x")
    figure("postgresql / sqlite, CPU (medians)", f"{cpu_ratio:.2f}x")
    figure("postgresql / sqlite, wall (medians)", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
    if bench.args.compare_with:
        label = "postgresql, compared"
        figure(
            "compared checkout / sqlite, wall and CPU (medians)",
            f"{median(label, 'seconds') / median('sqlite', 'seconds'):.2f}x, "
            f"{median(label, 'total_cpu_seconds') / median('sqlite', 'total_cpu_seconds'):.2f}x",
        )
    write_result(
        "backends",
        {
            "messages": expected,
            "compare_with": bench.args.compare_with,
            "runs": {label: [asdict(run) for run in side_runs] for label, side_runs in runs.items()},
            "ratio_postgresql_over_sqlite": ratio,
            "cpu_ratio_postgresql_over_sqlite": cpu_ratio,
            "target_ratio": 1.5,
            "met": ratio <= 1.5,
        },
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, default=3, help="initial: runs of each side (median)")
    parser.add_argument("--profile", action="store_true", help="initial: one more run under cProfile")
    parser.add_argument(
        "--pg",
        default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        help="backends: the PostgreSQL server (libpq conninfo of a user who may create databases)",
    )
    parser.add_argument(
        "--compare-with", metavar="DIR", help="backends: another checkout, timed on PostgreSQL too"
    )
    parser.add_argument("--deliveries", type=int, default=50, help="idle-latency: messages delivered")
    parser.add_argument("--probe-ms", type=float, default=2.0, help="idle-latency: index poll interval")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle-bytes: listening time")
    parser.add_argument("--big", type=int, default=100_000, help="poll/memory: messages in the big folder")
    parser.add_argument("--small", type=int, default=1_000, help="poll: messages in the small folder")
    parser.add_argument("--poll-repeats", type=int, default=50, help="poll: passes measured (median)")
    parser.add_argument("--huge-mb", type=int, default=50, help="memory: size of the large message")
    parser.add_argument(
        "--scratch",
        default=default_scratch_root(),
        help="where index, Maildir and notmuch files go (default: /dev/shm, so that neither side "
        "is timed on disk syncs)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    try:
        if "initial" in args.only:
            scenario_initial(bench)
        if "idle-bytes" in args.only or "idle-latency" in args.only:
            with running_daemon(bench) as (dovecot, proxy, db):
                if "idle-bytes" in args.only:
                    scenario_idle_bytes(bench, proxy)
                if "idle-latency" in args.only:
                    scenario_idle_latency(bench, dovecot, db)
        if "poll" in args.only:
            scenario_poll(bench)
        if "memory" in args.only:
            scenario_memory(bench)
        if "metrics" in args.only:
            scenario_metrics(bench)
        if "backends" in args.only:
            scenario_backends(bench)
    finally:
        bench.close()
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
