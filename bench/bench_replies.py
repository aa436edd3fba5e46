"""Reply benchmarks of issue 4: the real daemon answering mail on loopback (not a test).

    python -m bench.bench_replies                          # both scenarios, default sizes (a few minutes)
    python -m bench.bench_replies --only burst --workers 2 --burst 300
    python -m bench.bench_replies --profile                # plus a py-spy profile of the burst workers

Each scenario starts a fresh private Dovecot, an SMTP submission server (the test relay of
``localmail``, AUTH required, no TLS, accepting every recipient without passing anything on)
and ``python -m prod.run`` with ``LOG_LEVEL=WARNING`` and a rules file holding one reply rule. The
daemon is warmed up with one answered message first (imports, IMAP in IDLE, SMTP connection open).

- ``latency``: ``--deliveries`` messages, each from a new sender, delivered one at a time over LMTP
  into the account's INBOX with ``WORKERS=1`` and IDLE; latency is from the end of the LMTP
  transaction (the message is in the mailbox) to the moment the relay answers 250 to the reply's
  DATA. Printed: p50, p95 (target under 2 s), max, and the median of each stage, from the index's
  own timestamps (``messages.indexed_at``, ``outbox.created_at``) and a bare IDLE client that shows
  Dovecot's own notification delay.
- ``burst``: ``--burst`` messages from as many senders delivered back to back over one LMTP
  connection (``REPLY_MAX_PER_HOUR`` raised so the storm breaker stays out of the way), once per
  value of ``--workers``: time from the first delivery to the last reply accepted, replies/s, and
  the exactly-once check (replies accepted, distinct recipients, outbox rows all ``sent``, no
  duplicate, nothing more accepted during a settle period).

Figures are printed and written to ``bench/results/replies.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import random
import shutil
import signal
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from bench._accounts import accounts_file, import_accounts, index_accounts_env, index_users
from bench._report import figure, headline, percentile, write_result
from bench._servers import (
    BENCH_PASSWORD,
    BENCH_USER,
    Daemon,
    PushProbe,
    emailops_env,
    start_dovecot,
    synthetic_messages,
)
from localmail.dovecot import LocalDovecot, default_scratch_root
from localmail.smtp_relay import AcceptedMessage, LocalSmtpRelay
from prod.heartbeat import SupervisorState, state_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = ("latency", "burst")
RULE_NAME = "bench-ack"
RULES_TOML = f'''[[rules]]
name = "{RULE_NAME}"
[rules.match]
subject = "help"
[rules.reply]
template = """Hello {{sender_name}},
we received "{{subject}}" and will answer soon."""
'''
LATENCY_TARGET_SECONDS = 2.0
WARM_UP_SENDER = "warm-up@example.org"
BOOT_TIMEOUT_SECONDS = 300.0  # workers took over a minute to boot on the shared 2-core machine


# -- servers -----------------------------------------------------------------------------------


class TimedRelay(LocalSmtpRelay):
    """The test relay, also noting the wall-clock moment each message was accepted.

    ``_record`` runs right before the handler returns the 250 that ends DATA, so the moment is the
    acceptance as the client sees it (minus one loopback write). Nothing is passed on over LMTP:
    replies go to outside senders, which a real relay would queue for the internet.
    """

    def __init__(self, credentials: Mapping[str, str] | None = None) -> None:
        super().__init__(None, credentials or {BENCH_USER: BENCH_PASSWORD})
        self.accepted_at: list[float] = []

    def _record(self, message: AcceptedMessage) -> None:
        with self._lock:  # an RLock: the parent takes it again
            self.accepted_at.append(time.time())
            super()._record(message)

    def timed(self) -> list[tuple[float, AcceptedMessage]]:
        with self._lock:
            return list(zip(self.accepted_at, self._accepted, strict=True))


@dataclass
class Rig:
    """One scenario's servers and daemon, with the paths to read its index."""

    dovecot: LocalDovecot
    relay: TimedRelay
    daemon: Daemon
    work: Path
    users: list[str] = field(default_factory=lambda: [BENCH_USER])  # the mailboxes the daemon serves

    @property
    def db(self) -> Path:
        return self.work / "emailops.db"

    def worker_pids(self) -> list[int]:
        state = SupervisorState.from_json(state_path(self.work / "state").read_text())
        return [worker.pid for worker in state.workers]


@contextlib.contextmanager
def running_rig(
    scratch: Path, name: str, workers: int, extra: dict[str, str], preload: int = 0, accounts: int = 0
) -> Iterator[Rig]:
    """Fresh Dovecot, relay and ``prod.run``; returns once a warm-up message has been answered.

    ``preload`` synthetic messages are put into INBOX before the daemon starts (its first sync
    indexes them; none is answered). With ``accounts`` N, the daemon serves N accounts of the index
    (``bench._accounts``, imported before it starts) instead of the ``EMAIL_*`` one, each warmed up."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    (work / "rules.toml").write_text(RULES_TOML)
    users = index_users(accounts) if accounts else {BENCH_USER: BENCH_PASSWORD}
    with contextlib.ExitStack() as stack:
        dovecot = start_dovecot(users=users)
        stack.callback(dovecot.close)
        if preload:
            for user in users:
                dovecot.bulk_load(user, "INBOX", synthetic_messages(preload))
        relay = TimedRelay(users)
        relay.start()
        stack.callback(relay.close)
        env = emailops_env(
            imap_port=dovecot.imap_port,
            work_dir=work,
            extra={"WORKERS": str(workers), "EMAIL_SMTP_PORT": str(relay.port), **extra},
        )
        if accounts:
            env = index_accounts_env(env)
            listed = accounts_file(work / "accounts.toml", dovecot, accounts, ["INBOX"], smtp_port=relay.port)
            import_accounts(env, work, listed)
        daemon = Daemon(env, work)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stack.callback(daemon.stop)
        rig = Rig(dovecot, relay, daemon, work, list(users))
        warm_up(rig)
        try:
            yield rig
        finally:
            if "Traceback" in daemon.log_tail(1_000_000):
                print("   note: the daemon logged a traceback:\n" + daemon.log_tail())


def warm_up(rig: Rig) -> None:
    """Wait for the end of each INBOX's first sync pass, then for one answered message in each.

    Not just for the baseline (mail before it is never answered): a message that arrives while a
    sync pass is still running is announced (EXISTS) in the answer to one of the pass's own
    commands, which the watcher does not look at, and IDLE then has nothing new to say; such a
    message waits for the next poll (``POLL_INTERVAL_SECONDS``, 60 s). The index's ``uidnext`` is
    written by the pass's last database write, after its last IMAP command.
    """
    deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
    while not _first_pass_done(rig.db, len(rig.users)):
        if not rig.daemon.alive():
            raise RuntimeError(f"prod.run exited {rig.daemon.process.returncode}:\n{rig.daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no first sync of INBOX in time:\n{rig.daemon.log_tail()}")
        time.sleep(0.05)
    time.sleep(0.1)  # from that write to IDLE: no IMAP command in between, but let it get there
    for n, user in enumerate(rig.users):
        warm_up_message = inbound_message(WARM_UP_SENDER, "warm-up", n, to=user)
        rig.dovecot.deliver(user, warm_up_message, mail_from=WARM_UP_SENDER)
    try:
        rig.relay.wait_for_accepted(len(rig.users), timeout=BOOT_TIMEOUT_SECONDS)
    except TimeoutError:
        raise RuntimeError(f"the warm-up message was not answered:\n{rig.daemon.log_tail()}") from None


def _first_pass_done(db: Path, inboxes: int) -> bool:
    """Whether ``inboxes`` INBOX folders (one per account) have finished their first sync pass."""
    if not db.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            (done,) = conn.execute(
                "SELECT count(*) FROM folders WHERE name = 'INBOX'"
                " AND baseline_uidnext IS NOT NULL AND uidnext IS NOT NULL"
            ).fetchone()
    except sqlite3.Error:
        return False
    return int(done) >= inboxes


def inbound_message(sender: str, tag: str, n: int, to: str = BENCH_USER) -> bytes:
    """A small plain-text message the bench rule answers (its subject holds "help")."""
    return (
        f"From: Sender {n} <{sender}>\r\n"
        f"To: {to}\r\n"
        f"Subject: help needed with order {n}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: <{tag}-{n}@bench.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"Hello, my order {n} did not arrive. Could you look into it?\r\n"
    ).encode()


# -- index timestamps ----------------------------------------------------------------------------


def _epoch(value: str | None) -> float | None:
    """SQLite keeps the index's UTC datetimes as text; naive ones are UTC."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class IndexStamps:
    """What the index says about one inbound message and its reply (wall-clock seconds)."""

    indexed: float | None
    rules_state: str
    outbox_state: str | None
    decided: float | None
    sent: float | None
    recipient: str | None


def index_stamps(db: Path, tag: str) -> dict[str, IndexStamps]:
    """Per inbound Message-ID starting with ``<tag-``: indexing, decision and delivery times."""
    query = """
        SELECT m.message_id, m.indexed_at, m.rules_state, o.state, o.created_at, o.sent_at, o.recipient
        FROM messages AS m LEFT JOIN outbox AS o ON o.message_pk = m.id
        WHERE m.message_id LIKE ?
    """
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        rows = conn.execute(query, (f"<{tag}-%",)).fetchall()
    return {
        message_id: IndexStamps(_epoch(indexed), rules, state, _epoch(created), _epoch(sent), recipient)
        for message_id, indexed, rules, state, created, sent, recipient in rows
    }


def outbox_rows(db: Path) -> list[tuple[str, str, str, str]]:
    """(inbound_key, rule, recipient, state) of every outbox row."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute("SELECT inbound_key, rule_name, recipient, state FROM outbox").fetchall()


def pipeline_counts(db: Path, tag: str) -> tuple[int, int, int]:
    """(indexed, decided, sent) of the messages whose Message-ID starts with ``<tag-``."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        indexed, decided = conn.execute(
            "SELECT count(*), coalesce(sum(rules_state != 'pending'), 0) FROM messages"
            " WHERE message_id LIKE ?",
            (f"<{tag}-%",),
        ).fetchone()
        sent = conn.execute(
            "SELECT count(*) FROM outbox WHERE inbound_key LIKE ? AND state = 'sent'", (f"<{tag}-%",)
        ).fetchone()[0]
    return int(indexed), int(decided), int(sent)


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "n/a"


# -- 1. latency ----------------------------------------------------------------------------------


def scenario_latency(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    count = args.deliveries
    headline(f"delivery -> reply accepted: {count} messages one at a time (prod.run, WORKERS=1, IDLE)")
    rng = random.Random(5)
    tag = "latency"
    with running_rig(scratch, tag, 1, {}) as rig:
        probe = PushProbe(rig.dovecot)
        delivered_at: dict[str, float] = {}
        push_seconds: list[float] = []
        lmtp_seconds: list[float] = []
        with contextlib.closing(probe):
            for n in range(count):
                sender = f"{tag}{n}@example.org"
                before = len(rig.relay.accepted)
                started_perf, started = time.perf_counter(), time.time()
                rig.dovecot.deliver(BENCH_USER, inbound_message(sender, tag, n), mail_from=sender)
                delivered_at[sender] = time.time()
                lmtp_seconds.append(delivered_at[sender] - started)
                rig.relay.wait_for_accepted(before + 1, timeout=30)
                pushed = probe.first_after(started_perf, timeout=1.0)
                if pushed is not None:
                    push_seconds.append(pushed - started_perf - lmtp_seconds[-1])
                # A random pause, so that deliveries do not fall in step with the worker's loop.
                time.sleep(rng.uniform(0.05, 0.5))
        accepted = {message.rcpt_tos[0]: moment for moment, message in rig.relay.timed()}
        stamps = index_stamps(rig.db, tag)

    latencies = [accepted[sender] - delivered for sender, delivered in delivered_at.items()]
    to_indexed, to_decided, to_accepted = [], [], []
    for n in range(count):
        sender = f"{tag}{n}@example.org"
        stamp = stamps.get(f"<{tag}-{n}@bench.example>")
        if stamp is None or stamp.indexed is None or stamp.decided is None:
            continue
        to_indexed.append(stamp.indexed - delivered_at[sender])
        to_decided.append(stamp.decided - stamp.indexed)
        to_accepted.append(accepted[sender] - stamp.decided)
    p50, p95 = percentile(latencies, 0.50), percentile(latencies, 0.95)
    met = p95 < LATENCY_TARGET_SECONDS
    figure("LMTP delivery itself (median)", median_ms(lmtp_seconds))
    figure("delivery -> reply accepted p50", f"{p50 * 1000:.0f} ms")
    figure("delivery -> reply accepted p95", f"{p95 * 1000:.0f} ms", "< 2 s", met)
    figure("delivery -> reply accepted max", f"{max(latencies) * 1000:.0f} ms")
    print("   stages (medians):")
    figure("  delivered -> IDLE EXISTS at a bare client", median_ms(push_seconds) + "  (Dovecot's own delay)")
    figure("  delivered -> indexed (messages.indexed_at)", median_ms(to_indexed))
    figure("  indexed -> reply recorded (outbox.created_at)", median_ms(to_decided))
    figure("  recorded -> accepted by the relay", median_ms(to_accepted))
    return {
        "deliveries": count,
        "runner": "python -m prod.run (WORKERS=1, IDLE, LOG_LEVEL=WARNING)",
        "measured_from": "end of the LMTP transaction",
        "measured_to": "the relay's 250 after DATA of the reply",
        "latencies_ms": [round(v * 1000, 1) for v in latencies],
        "p50_ms": round(p50 * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "stage_medians_ms": {
            "lmtp_delivery": _ms(lmtp_seconds),
            "delivered_to_idle_push": _ms(push_seconds),
            "delivered_to_indexed": _ms(to_indexed),
            "indexed_to_recorded": _ms(to_decided),
            "recorded_to_accepted": _ms(to_accepted),
        },
        "target_p95_ms": LATENCY_TARGET_SECONDS * 1000,
        "met": met,
    }


def _ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 1) if values else None


# -- 2. burst ------------------------------------------------------------------------------------


@dataclass
class BurstRun:
    workers: int
    messages: int
    delivery_seconds: float = 0.0
    total_seconds: float | None = None
    accepted: int = 0
    # (seconds since the first delivery, indexed, decided, outbox sent, accepted by the relay)
    progress: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float | None] = field(default_factory=dict)
    worker_cpu_seconds: float = 0.0
    machine_busy: float = 0.0
    profile: str | None = None


def deliver_burst(dovecot: LocalDovecot, tag: str, count: int) -> float:
    """``count`` messages from ``count`` senders over one LMTP connection; returns the seconds taken."""
    senders = [f"{tag}{n}@example.org" for n in range(count)]
    messages = [(sender, inbound_message(sender, tag, n)) for n, sender in enumerate(senders)]
    started = time.perf_counter()
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, timeout=60) as lmtp:
        for sender, raw in messages:
            lmtp.sendmail(sender, [BENCH_USER], raw)
    return time.perf_counter() - started


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far (``/proc/PID/stat`` fields 14 and 15)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def machine_busy_now(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU busy over the next ``seconds`` (other processes included)."""
    busy_before, total_before = machine_cpu_ticks()
    time.sleep(seconds)
    busy_after, total_after = machine_cpu_ticks()
    return (busy_after - busy_before) / max(1, total_after - total_before)


def run_burst(args: argparse.Namespace, scratch: Path, workers: int) -> BurstRun:
    count = args.burst
    tag = f"burst-w{workers}"
    result = BurstRun(workers=workers, messages=count)
    extra = {"REPLY_MAX_PER_HOUR": str(max(100_000, 10 * count))}
    with running_rig(scratch, tag, workers, extra) as rig:
        base = len(rig.relay.accepted)  # the warm-up reply
        pids = rig.worker_pids()

        def deliver() -> None:
            result.delivery_seconds = deliver_burst(rig.dovecot, tag, count)

        delivery = threading.Thread(target=deliver, name="burst-delivery")
        with profiler(args, rig, tag) as profile:
            cpu_before, (busy_before, ticks_before) = process_cpu_seconds(pids), machine_cpu_ticks()
            started = time.time()
            delivery.start()
            deadline = time.monotonic() + args.burst_timeout
            while True:
                done = len(rig.relay.accepted) - base
                indexed, decided, sent = pipeline_counts(rig.db, tag)
                result.progress.append((round(time.time() - started, 2), indexed, decided, sent, done))
                if done >= count or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            busy_after, ticks_after = machine_cpu_ticks()
            result.worker_cpu_seconds = process_cpu_seconds(pids) - cpu_before
            result.machine_busy = (busy_after - busy_before) / max(1, ticks_after - ticks_before)
        delivery.join()
        timed = rig.relay.timed()[base:]
        if len(timed) >= count:
            result.total_seconds = timed[count - 1][0] - started
        time.sleep(args.settle)  # anything answered twice would show up now
        timed = rig.relay.timed()[base:]
        result.accepted = len(timed)
        rows = [row for row in outbox_rows(rig.db) if row[0].startswith(f"<{tag}-")]
        stamps = index_stamps(rig.db, tag)
    result.profile = profile.get("path")
    result.checks = exactly_once_checks(tag, count, [message for _moment, message in timed], rows, stamps)
    last_indexed = max((s.indexed or 0.0 for s in stamps.values()), default=0.0)
    last_decided = max((s.decided or 0.0 for s in stamps.values()), default=0.0)
    result.stage_seconds = {
        "all_delivered": round(result.delivery_seconds, 2),
        "all_indexed": round(last_indexed - started, 2) if last_indexed else None,
        "all_decided": round(last_decided - started, 2) if last_decided else None,
        "all_accepted": round(result.total_seconds, 2) if result.total_seconds else None,
    }
    return result


def exactly_once_checks(
    tag: str,
    count: int,
    accepted: list[AcceptedMessage],
    rows: list[tuple[str, str, str, str]],
    stamps: dict[str, IndexStamps],
) -> dict[str, Any]:
    """Every sender answered once: by the relay's records and by the outbox."""
    recipients = [message.rcpt_tos[0] for message in accepted]
    expected = {f"{tag}{n}@example.org" for n in range(count)}
    states = collections.Counter(state for _key, _rule, _recipient, state in rows)
    keys = collections.Counter((key, rule) for key, rule, _recipient, _state in rows)
    checks: dict[str, Any] = {
        "accepted": len(accepted),
        "distinct_recipients": len(set(recipients)),
        "every_sender_answered": set(recipients) == expected,
        "outbox_rows": len(rows),
        "outbox_states": dict(states),
        "distinct_outbox_recipients": len({recipient for _key, _rule, recipient, _state in rows}),
        "duplicate_outbox_keys": sum(1 for seen in keys.values() if seen > 1),
        "rules_states": dict(collections.Counter(stamp.rules_state for stamp in stamps.values())),
    }
    checks["exactly_once"] = (
        len(accepted) == count
        and checks["distinct_recipients"] == count
        and checks["every_sender_answered"]
        and len(rows) == count
        and dict(states) == {"sent": count}
        and checks["distinct_outbox_recipients"] == count
        and checks["duplicate_outbox_keys"] == 0
    )
    return checks


@contextlib.contextmanager
def profiler(args: argparse.Namespace, rig: Rig, tag: str) -> Iterator[dict[str, str]]:
    """With ``--profile``: py-spy records every worker during the burst (collapsed stacks, idle
    time included so that waits show); the top frames are printed afterwards."""
    found: dict[str, str] = {}
    if not args.profile:
        yield found
        return
    if shutil.which("py-spy") is None:
        print("   note: --profile needs py-spy on PATH; profiling skipped")
        yield found
        return
    spies = []
    paths = []
    for pid in rig.worker_pids():
        path = Path(args.scratch_root) / f"{tag}-{pid}.collapsed"
        paths.append(path)
        command = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--idle", "--format", "raw"]
        spies.append(
            subprocess.Popen(
                [*command, "--output", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        yield found
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
        report = RESULTS_DIR / f"replies-profile-{tag}.txt"
        summaries = [summarise_profile(path, pid_label=path.stem) for path in paths if path.exists()]
        report.write_text("".join(summaries))
        found["path"] = str(report)
        print(report.read_text())


_PROJECT_MARKERS = ("emailops/", "prod/")
_WORK_THREAD_MARKER = "WorkerLoop.run "  # the worker's main thread, not its parent-watch thread


def summarise_profile(path: Path, *, pid_label: str, top: int = 40) -> str:
    """Share of the worker's main-thread wall time per frame of the project (inclusive), and the
    leaf frames where the samples were taken, from py-spy's collapsed stacks (idle included)."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples_text = line.rpartition(" ")
        if not samples_text.isdigit() or _WORK_THREAD_MARKER not in stack:
            continue
        samples = int(samples_text)
        total += samples
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += samples
        leaf[frames[-1]] += samples
    if not total:
        return f"-- {pid_label}: no samples of the work loop\n"
    lines = [f"-- {pid_label}: {total} samples of the work loop; inclusive share per project frame"]
    project = [(f, n) for f, n in inclusive.most_common() if any(m in f for m in _PROJECT_MARKERS)]
    lines += [f"   {samples / total:6.1%}  {frame}" for frame, samples in project[:top]]
    lines.append("   leaf frames (where the samples were taken):")
    lines += [f"   {samples / total:6.1%}  {frame}" for frame, samples in leaf.most_common(15)]
    return "\n".join(lines) + "\n"


def scenario_burst(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    results = []
    for workers in args.workers:
        headline(f"burst: {args.burst} messages from {args.burst} senders, prod.run WORKERS={workers}")
        run = run_burst(args, scratch, workers)
        figure("LMTP delivery of the whole burst", f"{run.delivery_seconds:.1f} s")
        if run.total_seconds is not None:
            figure("first delivery -> last reply accepted", f"{run.total_seconds:.1f} s")
            figure("throughput", f"{run.messages / run.total_seconds:.1f} replies/s")
        else:
            figure("replies accepted before the timeout", f"{run.accepted} of {run.messages}")
        figure("worker CPU per reply", f"{run.worker_cpu_seconds / run.messages * 1000:.1f} ms")
        figure("machine CPU busy during the burst (2 cores)", f"{run.machine_busy:.0%}")
        for stage, seconds in run.stage_seconds.items():
            figure(f"  {stage.replace('_', ' ')} after", f"{seconds} s" if seconds is not None else "n/a")
        checks = run.checks
        figure(
            "exactly once",
            f"{checks['accepted']} accepted, {checks['distinct_recipients']} distinct recipients, "
            f"outbox {checks['outbox_rows']} rows {checks['outbox_states']}, "
            f"{checks['duplicate_outbox_keys']} duplicate keys",
            "all once",
            checks["exactly_once"],
        )
        rate = round(run.messages / run.total_seconds, 1) if run.total_seconds else None
        results.append(
            {
                "workers": run.workers,
                "messages": run.messages,
                "delivery_seconds": round(run.delivery_seconds, 2),
                "total_seconds": round(run.total_seconds, 2) if run.total_seconds else None,
                "replies_per_second": rate,
                "stage_seconds": run.stage_seconds,
                "worker_cpu_ms_per_reply": round(run.worker_cpu_seconds / run.messages * 1000, 2),
                "machine_cpu_busy": round(run.machine_busy, 3),
                "checks": checks,
                "progress_t_indexed_decided_sent_accepted": run.progress,
                "profile": run.profile,
            }
        )
    return results


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.bench_replies", description=summary)
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--deliveries", type=int, default=50, help="latency: messages, one at a time")
    parser.add_argument("--burst", type=int, default=1000, help="burst: messages (and distinct senders)")
    parser.add_argument("--workers", default="1,2", help="burst: comma list of WORKERS values to run")
    parser.add_argument("--burst-timeout", type=float, default=240.0, help="burst: give up after this many s")
    parser.add_argument("--settle", type=float, default=3.0, help="burst: wait for duplicates after the last")
    parser.add_argument("--profile", action="store_true", help="burst: py-spy the workers, print top frames")
    parser.add_argument(
        "--scratch",
        default=default_scratch_root(),
        help="where the index and daemon state go (default /dev/shm, as bench_sync)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.workers = [int(value) for value in args.workers.split(",") if value.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # aiosmtpd warns once per session that the relay takes AUTH without TLS: chosen on purpose here.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="emailops-bench-replies-", dir=args.scratch))
    args.scratch_root = str(scratch)
    results: dict[str, Any] = {"machine_busy_before_start": machine_busy_now()}
    if results["machine_busy_before_start"] > 0.15:
        print(
            f"note: the machine was {results['machine_busy_before_start']:.0%} busy before the start "
            "(other processes); the figures share its 2 cores with them"
        )
    try:
        if "latency" in args.only:
            results["latency"] = scenario_latency(args, scratch)
        if "burst" in args.only:
            results["burst"] = scenario_burst(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_result("replies", results)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
