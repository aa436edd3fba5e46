"""Memory and per-line masking cost of a worker's redactor over many OAuth2 refreshes (issue 22).

    python -m bench.bench_redaction                      # 10,000 refreshes, about 6 minutes
    python -m bench.bench_redaction --refreshes 2000
    python -m bench.bench_redaction --no-tracemalloc     # memory as a worker holds it, without tracemalloc
    python -m bench.bench_redaction --accounts 2         # two accounts refreshing in turn

The token source is the one the daemon builds (``prod.oauth2_tokens.account_token_source``, announcing
to this process's ``REDACTOR``), against ``LocalOAuth2Server`` on loopback with an SQLite index;
its clock moves an hour per refresh, so every ``access_token()`` is a real refresh: a token
request, a rotated refresh token, a commit. The server runs in a child process (it keeps every
token it issued), so this process is only what a worker holds. tracemalloc runs from the start.
``--accounts N``: N accounts' token sources in one process (each its own mailbox, client and
refresh token) refresh in turn, the refreshes counted over all of them (the clock still moves an
hour per refresh); each signs in first (at 0).

Printed at 0 (after the sign-in), 1,000 and the last refresh: the values the redactor masks,
tracemalloc's current total and the size of its own tables (which ``VmRSS`` includes; without
them: ``--no-tracemalloc``), ``VmRSS``, and the cost of one log line through the daemon's JSON
formatter and of its known-values pass alone, which tries every masked value on every line
(medians of ``--lines``; tracemalloc makes both slower than without it).

Every ``MEMORY_EVERY`` refreshes, the process's memory as a worker holds it: the process takes the
worker's malloc settings at the start (``prod.worker``: the fixed mmap threshold, the table of
interned strings sized), and before each reading runs a full collection and gives free pages back
(``give_back_free_pages``); ``--glibc-defaults``: none of these, to compare. Read then: the lowest
``VmRSS`` after each of the last ``LOW_OF`` refreshes, malloc's bytes in use and heap
(``mallinfo2``) and Python's allocated blocks.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine

from bench._report import figure, headline, write_result
from bench.memory_probe import _libc, _proc_status
from emailops.auth.token_source import TokenSource
from localmail.dovecot import default_scratch_root
from prod.logging_setup import JsonLineFormatter
from prod.oauth2_tokens import account_token_source
from prod.redaction import REDACTOR
from prod.runtime_settings import RuntimeSettings
from prod.worker import fix_mmap_threshold, presize_interned_strings
from tests.index_helpers import ALICE, index_engine
from tests.oauth2_helpers import Clock, delegated_client, oauth2_server, oauth2_settings

CHECKPOINTS = (0, 1000)
# Refreshes between two memory readings, and how many of the last refreshes before one give their
# VmRSS, the lowest kept (RSS moves by a few pages from one refresh to the next); as a worker, the
# free pages are given back just before those.
MEMORY_EVERY = 500
LOW_OF = 5


def mailbox(n: int) -> str:
    """The sign-in name of the ``n``-th account."""
    return ALICE if n == 0 else f"user{n}@example.test"


def serve_tokens(channel: Connection, accounts: int) -> None:
    """The authorization server's process: sends its token URL and a refresh token for each
    account (``mailbox(n)`` at ``delegated_client(n)``), then, when told to stop, how many refresh
    grants it answered to each client."""
    with oauth2_server(clients=accounts) as server:
        clients = [delegated_client(n)[0] for n in range(accounts)]
        seeds = [server.issue_refresh_token(mailbox(n), client) for n, client in enumerate(clients)]
        channel.send((server.token_url, seeds))
        channel.recv()
        channel.send([server.count(f"token:refresh_token:{client}") for client in clients])


def account_sources(settings: RuntimeSettings, seeds: list[str], engine: Engine) -> list[TokenSource]:
    """The token sources of ``len(seeds)`` accounts as a worker builds them: the ``EMAIL_*`` one
    (``seeds[0]``), then accounts of their own mailbox, client and refresh token."""
    default = settings.default_account()
    assert default.oauth2 is not None
    accounts = [default]
    for n, seed in enumerate(seeds[1:], start=1):
        client_id, client_secret = delegated_client(n)
        options = replace(
            default.oauth2, client_id=client_id, client_secret=client_secret, refresh_token=seed
        )
        accounts.append(replace(default, name=f"account-{n}", username=mailbox(n), oauth2=options))
    sources = [account_token_source(account, settings.deployment(), engine) for account in accounts]
    return [source for source in sources if source is not None]


def line_costs_us(token: str, lines: int) -> tuple[float, float]:
    """Median microseconds to render one WARNING line carrying ``token`` (masked) through the
    daemon's formatter, and of the known-values pass alone (the part that grows with them)."""
    formatter = JsonLineFormatter()
    record = logging.LogRecord(
        "emailops.imap", logging.WARNING, "", 0, "sign-in refused for %s with %s", ("alice", token), None
    )
    line = f'{{"level":"WARNING","message":"sign-in refused for alice with {token}"}}'
    rendered, known = [], []
    for _ in range(lines):
        start = time.perf_counter()
        masked = formatter.format(record)
        middle = time.perf_counter()
        REDACTOR.redact_known_values(line)
        rendered.append((middle - start) * 1e6)
        known.append((time.perf_counter() - middle) * 1e6)
    assert token not in masked
    return statistics.median(rendered), statistics.median(known)


def memory_reading(refreshes: int, rss_low_kib: int, libc: Any) -> dict[str, Any]:
    """The process's memory after ``refreshes``, with the lowest VmRSS of the last ones."""
    reading: dict[str, Any] = {
        "refreshes": refreshes,
        "vm_rss_low_kib": rss_low_kib,
        "python_blocks": sys.getallocatedblocks(),
        "masked_values": REDACTOR.size,
    }
    if libc is not None:
        info = libc.mallinfo2()
        reading |= {"malloc_in_use_kib": info.uordblks // 1024, "malloc_heap_kib": info.arena // 1024}
    return reading


def give_back_free_pages() -> None:
    """A full collection, which a worker's own work runs many times between two refreshes of an
    account (an hour apart; here a few milliseconds), then the free pages given back, as the
    worker does once a minute (``prod.worker``)."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def growth_per_thousand(readings: list[dict[str, Any]], key: str, start: int) -> float:
    """Least-squares slope of ``key`` per 1,000 refreshes over the readings from ``start`` on."""
    points = [(r["refreshes"], r[key]) for r in readings if r["refreshes"] >= start and key in r]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--refreshes", type=int, default=10_000, help="over all accounts")
    parser.add_argument("--accounts", type=int, default=1, help="token sources refreshing in turn")
    parser.add_argument("--lines", type=int, default=2_000, help="log lines timed at each checkpoint")
    parser.add_argument(
        "--no-tracemalloc", action="store_true", help="VmRSS without tracemalloc's own tables in it"
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="without the worker's malloc settings, collection and trim: the memory the process keeps",
    )
    args = parser.parse_args()
    as_worker = not args.glibc_defaults
    libc = _libc()
    if as_worker:
        fix_mmap_threshold()
    # The token source's "refreshed" line at every refresh would be most of the run.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not args.no_tracemalloc:
        tracemalloc.start()
    checkpoints = sorted({*CHECKPOINTS, args.refreshes})
    rows = []
    channel, child_end = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=serve_tokens, args=(child_end, args.accounts), daemon=True
    )
    server.start()
    token_url, seeds = channel.recv()
    with tempfile.TemporaryDirectory(dir=default_scratch_root()) as scratch:
        settings = oauth2_settings(token_url, seeds[0], f"sqlite:///{Path(scratch) / 'index.sqlite3'}")
        sources = account_sources(settings, seeds, index_engine(settings.index_db_url))
        assert len(sources) == args.accounts
        clock = Clock()
        for tokens in sources:
            tokens.clock = clock
            token = tokens.access_token()
        if as_worker:
            presize_interned_strings()  # as the worker does once built
            give_back_free_pages()
        readings = [memory_reading(0, _proc_status()["VmRSS"], libc)]
        rss_low = 1 << 62
        started = time.perf_counter()
        headline(
            f"{args.refreshes:,} OAuth2 refreshes through the daemon's token source"
            + (f"s of {args.accounts} accounts in turn" if args.accounts > 1 else "")
        )
        for refresh in range(args.refreshes + 1):
            if refresh > 0:
                clock.advance(3600)
                token = sources[refresh % args.accounts].access_token()
                if as_worker and refresh % MEMORY_EVERY == MEMORY_EVERY - LOW_OF:
                    give_back_free_pages()
                if refresh % MEMORY_EVERY > MEMORY_EVERY - LOW_OF or refresh % MEMORY_EVERY == 0:
                    rss_low = min(rss_low, _proc_status()["VmRSS"])
                if refresh % MEMORY_EVERY == 0:
                    readings.append(memory_reading(refresh, rss_low, libc))
                    rss_low = 1 << 62
            if refresh in checkpoints:
                gc.collect()
                line_us, known_us = line_costs_us(token, args.lines)
                row = {
                    "refreshes": refresh,
                    "masked_values": REDACTOR.size,
                    "tracemalloc_kib": tracemalloc.get_traced_memory()[0] / 1024,
                    "tracemalloc_own_kib": tracemalloc.get_tracemalloc_memory() / 1024,
                    "vm_rss_kib": _proc_status()["VmRSS"],
                    "line_us": line_us,
                    "known_values_us": known_us,
                    "elapsed_s": time.perf_counter() - started,
                }
                rows.append(row)
                figure(
                    f"after {refresh:,} refreshes",
                    f"{row['masked_values']:,} masked values, tracemalloc {row['tracemalloc_kib']:,.0f} KiB "
                    f"(its own {row['tracemalloc_own_kib']:,.0f} KiB), "
                    f"VmRSS {row['vm_rss_kib']:,} KiB, line {line_us:.1f} us (known {known_us:.1f} us)",
                )
    channel.send("stop")
    per_client = channel.recv()
    assert sum(per_client) == args.refreshes + args.accounts, "every access_token() was a refresh grant"
    rounds = args.refreshes // args.accounts
    assert all(rounds <= count - 1 <= rounds + 1 for count in per_client), f"each in turn: {per_client}"
    server.join()
    first, thousand, last = rows[0], rows[1], rows[-1]
    growth = last["masked_values"] - thousand["masked_values"]
    figure("masked values: growth after 1,000", f"{growth:+,}", "0", growth == 0)
    traced = last["tracemalloc_kib"] - thousand["tracemalloc_kib"]
    figure("tracemalloc: growth after 1,000", f"{traced:+,.0f} KiB")
    figure("VmRSS: growth after 1,000", f"{last['vm_rss_kib'] - thousand['vm_rss_kib']:+,} KiB")
    own = last["tracemalloc_own_kib"] - thousand["tracemalloc_own_kib"]
    figure("tracemalloc's own tables: growth after 1,000", f"{own:+,.0f} KiB")
    figure("per-line cost: end / start", f"{last['line_us'] / first['line_us']:.2f}")
    figure("known-values pass: end / start", f"{last['known_values_us'] / first['known_values_us']:.2f}")
    figure("time per refresh", f"{last['elapsed_s'] / max(1, args.refreshes) * 1000:.1f} ms")
    headline(
        f"memory every {MEMORY_EVERY:,} refreshes, "
        + (
            "as a worker holds it (fixed mmap threshold, collected, trimmed)"
            if as_worker
            else "glibc's defaults, neither collected nor trimmed"
        )
    )
    for reading in readings:
        malloc = (
            f", malloc in use {reading['malloc_in_use_kib']:,} KiB (heap {reading['malloc_heap_kib']:,} KiB)"
            if "malloc_in_use_kib" in reading
            else ""
        )
        figure(
            f"after {reading['refreshes']:,} refreshes",
            f"VmRSS low {reading['vm_rss_low_kib']:,} KiB{malloc}, "
            f"{reading['python_blocks']:,} Python blocks",
        )
    at_thousand = next(r for r in readings if r["refreshes"] >= 1000)
    for key, label in (
        ("vm_rss_low_kib", "VmRSS low"),
        ("malloc_in_use_kib", "malloc in use"),
        ("malloc_heap_kib", "malloc heap"),
    ):
        if key in readings[-1]:
            start, end = at_thousand[key], readings[-1][key]
            figure(
                f"{label}: 1,000 -> {readings[-1]['refreshes']:,} refreshes",
                f"{start:,} -> {end:,} KiB ({end - start:+,}), "
                f"slope {growth_per_thousand(readings, key, 1000):+.1f} KiB per 1,000",
            )
    write_result(
        "redaction"
        + (f"-{args.accounts}-accounts" if args.accounts > 1 else "")
        + ("" if as_worker else "-glibc-defaults"),
        {"as_worker": as_worker, "accounts": args.accounts, "rows": rows, "memory": readings},
    )


if __name__ == "__main__":
    main()
