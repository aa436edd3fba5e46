"""Memory and per-line masking cost of a worker's redactor over many OAuth2 refreshes (issue 22).

    python -m bench.bench_redaction                      # 10,000 refreshes, about 6 minutes
    python -m bench.bench_redaction --refreshes 2000

The token source is the one the daemon builds (``prod.oauth2_tokens.token_source``, announcing
to this process's ``REDACTOR``), against ``LocalOAuth2Server`` on loopback with an SQLite index;
its clock moves an hour per refresh, so every ``access_token()`` is a real refresh: a token
request, a rotated refresh token, a commit. The server runs in a child process (it keeps every
token it issued), so this process is only what a worker holds. tracemalloc runs from the start.

Printed at 0 (after the sign-in), 1,000 and the last refresh: the values the redactor masks,
tracemalloc's current total and the size of its own tables (which ``VmRSS`` includes; without
them: ``--no-tracemalloc``), ``VmRSS``, and the cost of one log line through the daemon's JSON
formatter and of its known-values pass alone, which tries every masked value on every line
(medians of ``--lines``; tracemalloc makes both slower than without it).
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import statistics
import tempfile
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

import structlog

from bench._report import figure, headline, write_result
from bench.memory_probe import _proc_status
from localmail.dovecot import default_scratch_root
from prod.logging_setup import JsonLineFormatter
from prod.oauth2_tokens import token_source
from prod.redaction import REDACTOR
from tests.index_helpers import ALICE, index_engine
from tests.oauth2_helpers import CLIENT_ID, Clock, oauth2_server, oauth2_settings

CHECKPOINTS = (0, 1000)


def serve_tokens(channel: Connection) -> None:
    """The authorization server's process: sends its token URL and a refresh token, then, when
    told to stop, how many refresh grants it answered."""
    with oauth2_server() as server:
        channel.send((server.token_url, server.issue_refresh_token(ALICE, CLIENT_ID)))
        channel.recv()
        channel.send(server.count("token:refresh_token"))


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--refreshes", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=2_000, help="log lines timed at each checkpoint")
    parser.add_argument(
        "--no-tracemalloc", action="store_true", help="VmRSS without tracemalloc's own tables in it"
    )
    args = parser.parse_args()
    # The token source's "refreshed" line at every refresh would be most of the run.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not args.no_tracemalloc:
        tracemalloc.start()
    checkpoints = sorted({*CHECKPOINTS, args.refreshes})
    rows = []
    channel, child_end = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve_tokens, args=(child_end,), daemon=True)
    server.start()
    token_url, seed = channel.recv()
    with tempfile.TemporaryDirectory(dir=default_scratch_root()) as scratch:
        settings = oauth2_settings(token_url, seed, f"sqlite:///{Path(scratch) / 'index.sqlite3'}")
        tokens = token_source(settings, index_engine(settings.index_db_url))
        assert tokens is not None
        clock = Clock()
        tokens.clock = clock
        token = tokens.access_token()
        started = time.perf_counter()
        headline(f"{args.refreshes:,} OAuth2 refreshes through the daemon's token source")
        for refresh in range(args.refreshes + 1):
            if refresh > 0:
                clock.advance(3600)
                token = tokens.access_token()
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
    assert channel.recv() == args.refreshes + 1, "every access_token() was a refresh grant"
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
    write_result("redaction", {"rows": rows})


if __name__ == "__main__":
    main()
