"""Soak of issue 14: the real daemon for a set time, each process's memory and CPU sampled (not a test).

    python -m bench.soak --minutes 15                  # steady mail: a message every 3 s, each answered
    python -m bench.soak --minutes 15 --idle           # no mail at all after the warm-up message
    python -m bench.soak --minutes 30 --every 1 --workers 3
    python -m bench.soak --minutes 120 --warm-up 15 --every 1 --accounts 50

Starts what ``bench_replies`` starts (a private Dovecot, the test SMTP relay, ``python -m prod.run``
with a rules file holding one reply rule, warmed up with one answered message), here with the
production ``LOG_LEVEL=INFO`` so that every worker's log lines cross the log channel to the
supervisor. Then, for ``--minutes``, one message from a new sender every ``--every`` seconds is
delivered over LMTP (none with ``--idle``), and every ``--sample`` seconds the RSS (``VmRSS``) and
the CPU time (``utime + stime``) of each process of the daemon are read from ``/proc``: the
supervisor, each worker (named from the supervisor's state file), and any other descendant (the
multiprocessing resource tracker, helpers). With ``--accounts N`` the daemon serves N accounts of
the index instead of the ``EMAIL_*`` one (N Dovecot users, imported with ``emailops accounts
import``; the rule applies to each), every one warmed up, and the mail goes to them in turn.

Printed per process, over the samples after ``--warm-up`` minutes: the RSS at the start and the end
of that window, the least-squares slope of RSS in kB per minute (and of the window's second half:
growth that slows down is a cache filling up, growth that does not is a leak), and the CPU seconds
used per minute. A process whose slope exceeds ``GROWTH_LIMIT_KB_PER_MINUTE`` grows, unless the
window is two flat stretches (each slope within the limit) either side of one step: memory taken
once, not growth; the step's size and minute are printed with the slope. Also printed: the lowest
RSS of each 5 minutes of the window and their slope, the plateau a worker comes back to between its
passing rises (page caches filled and dropped). The target is that none grows. A worker replaced
during the run is reported (a finding in itself); its figures are those of its last process.
Samples and figures go to ``bench/results/soak[-idle].json`` (``--result NAME``: ``NAME.json``).

With ``--probe SECONDS`` the workers run ``bench.memory_probe`` (the production unit, measured from
inside every SECONDS): at the end the probe's figures are printed per worker, each with its start,
end and slope over the same window (RSS split into anonymous, file and shared memory; SQLite's
memory and page caches; glibc's heap; descriptors and threads; the pool; Python's blocks; with
``--tracemalloc FRAMES`` the lines whose allocations grew most). ``--env NAME=VALUE`` sets a
variable in the daemon's environment (e.g. ``MALLOC_ARENA_MAX=2``), to try a setting without a change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._report import figure, headline, write_result
from bench.bench_replies import Rig, inbound_message, machine_busy_now, machine_cpu_ticks, running_rig
from bench.memory_probe import (
    PROBE_BASELINE_ENV,
    PROBE_FILE_ENV,
    PROBE_SECONDS_ENV,
    PROBE_TRACEMALLOC_ENV,
    TARGET,
    read_samples,
)
from localmail.dovecot import default_scratch_root

# A 10-minute window's least-squares slope moves by 0.6 kB/min for each 4 kB page that RSS gains
# or loses once (a step of h in the middle of a window of T minutes gives a slope of 1.5 h / T), so
# 2 kB/min is a few pages of jitter over the whole window, and a seventh of the 14 kB/min that
# issue 14 measured on the idle supervisor.
GROWTH_LIMIT_KB_PER_MINUTE = 2.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessSeries:
    """One process's samples: (seconds since the start, RSS kB, CPU ticks)."""

    label: str
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)  # earlier pids under the same label


def read_proc(pid: int) -> tuple[int, int] | None:
    """(VmRSS in kB, utime + stime in ticks) of ``pid``, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss is None:  # a zombie has no memory left to report
        return None
    fields = stat.rpartition(")")[2].split()
    return rss, int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def daemon_processes(rig: Rig) -> dict[str, int]:
    """Label -> pid for the supervisor and all its descendants, workers named from the state file."""
    supervisor = rig.daemon.process.pid
    worker_label: dict[int, str] = {}
    with contextlib.suppress(OSError, ValueError):  # the state file is replaced atomically; rarely absent
        worker_label = {pid: f"worker {n}" for n, pid in enumerate(rig.worker_pids(), start=1)}
    labels = {supervisor: "supervisor"}
    queue = [supervisor]
    while queue:
        parent = queue.pop()
        for child in children(parent):
            if child in worker_label:
                labels[child] = worker_label[child]
            elif "resource_tracker" in command_line(child):
                labels[child] = "resource tracker"
            else:
                labels[child] = f"{labels[parent]} / child"
            queue.append(child)
    return {label: pid for pid, label in labels.items()}


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 3 or len({t for t, _ in points}) < 2:
        return None
    return 60 * _fit(points)[0]


# Each side of a step must span this much of the window for its slope to mean anything.
_STEP_SIDE_MINUTES = 5.0
# A worker's RSS rises for a minute or two and falls back (SQLite's page cache filled, then dropped
# when the other worker commits; work freed and trimmed), so its plateau is read from the lowest
# sample of each stretch this long.
LOW_STRETCH_MINUTES = 5.0


def stretch_lows(
    points: list[tuple[float, float]], minutes: float = LOW_STRETCH_MINUTES
) -> list[tuple[float, float]]:
    """(start of the stretch in seconds, lowest value) of each whole ``minutes`` stretch of
    (seconds, value) points, counted from the first point; a last stretch cut short is left out."""
    if not points:
        return []
    start, width = points[0][0], minutes * 60
    whole = int((points[-1][0] - start) // width)
    lows: list[tuple[float, float]] = []
    for n in range(whole):
        values = [v for t, v in points if start + n * width <= t < start + (n + 1) * width]
        if values:
            lows.append((start + n * width, min(values)))
    return lows


@dataclass(frozen=True)
class Step:
    """The best fit of a window as two straight lines that meet at one jump."""

    at_seconds: float  # time of the first sample after the jump
    size: float  # the second line's value minus the first's, at the jump
    slope_before: float  # per minute
    slope_after: float  # per minute


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(slope per second, intercept, sum of squared residuals) of a least-squares line."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t if var_t else 0.0
    intercept = mean_v - slope * mean_t
    return slope, intercept, sum((v - intercept - slope * t) ** 2 for t, v in points)


def largest_step(points: list[tuple[float, float]]) -> Step | None:
    """The jump that best splits (seconds, value) points into two lines, each side at least
    _STEP_SIDE_MINUTES long; None if the window is too short to have two such sides.

    Tells a one-time step (a table that doubles once, a cache that fills at once) from growth that
    goes on: a step leaves both sides flat, a leak does not flatten on either side."""
    best: tuple[float, float, tuple[float, float, float], tuple[float, float, float]] | None = None
    for split in range(2, len(points) - 1):
        before, after = points[:split], points[split:]
        if min(before[-1][0] - before[0][0], after[-1][0] - after[0][0]) < _STEP_SIDE_MINUTES * 60:
            continue
        fit_before, fit_after = _fit(before), _fit(after)
        residuals = fit_before[2] + fit_after[2]
        if best is None or residuals < best[0]:
            best = (residuals, after[0][0], fit_before, fit_after)
    if best is None:
        return None
    _, at, (slope_1, intercept_1, _), (slope_2, intercept_2, _) = best
    return Step(at, (intercept_2 + slope_2 * at) - (intercept_1 + slope_1 * at), 60 * slope_1, 60 * slope_2)


@contextlib.contextmanager
def steady_mail(rig: Rig, every_seconds: float) -> Iterator[list[int]]:
    """Deliver one message from a new sender every ``every_seconds`` while the block runs, to the
    rig's mailboxes in turn."""
    delivered = [0]
    stop = threading.Event()

    def deliver() -> None:
        n = 0
        while not stop.wait(every_seconds):
            n += 1
            sender, to = f"soak-{n}@example.org", rig.users[n % len(rig.users)]
            rig.dovecot.deliver(to, inbound_message(sender, "soak", n, to=to), mail_from=sender)
            delivered[0] = n

    thread = threading.Thread(target=deliver, name="soak-mail", daemon=True)
    thread.start()
    try:
        yield delivered
    finally:
        stop.set()
        thread.join(timeout=30)


def sample_until(rig: Rig, seconds: float, every: float) -> dict[str, ProcessSeries]:
    series: dict[str, ProcessSeries] = {}
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) <= seconds:
        if not rig.daemon.alive():
            raise RuntimeError(f"prod.run exited {rig.daemon.process.returncode}:\n{rig.daemon.log_tail()}")
        for label, pid in daemon_processes(rig).items():
            reading = read_proc(pid)
            if reading is None:
                continue
            current = series.get(label)
            if current is None:
                current = series[label] = ProcessSeries(label, pid)
            elif current.pid != pid:
                current.replaced.append(current.pid)
                current.pid, current.samples = pid, []
            current.samples.append((round(elapsed, 2), *reading))
        time.sleep(max(0.0, every - (time.monotonic() - started - elapsed)))
    return series


def summarise(process: ProcessSeries, warm_up_seconds: float) -> dict[str, Any]:
    window = [sample for sample in process.samples if sample[0] >= warm_up_seconds]
    if len(window) < 3:
        return {
            "label": process.label,
            "pid": process.pid,
            "samples": len(window),
            "replaced": process.replaced,
        }
    second_half = window[len(window) // 2 :]
    minutes = (window[-1][0] - window[0][0]) / 60
    rss_points = [(t, float(rss)) for t, rss, _ in window]
    slope = slope_per_minute(rss_points)
    step = largest_step(rss_points)
    lows = stretch_lows(rss_points)
    lows_slope = slope_per_minute(lows)
    # One step with both sides flat is memory taken once (measured: CPython's table of interned
    # strings doubling, about 940 kB, at a moment that differs from run to run), not growth.
    one_step_only = (
        step is not None
        and abs(step.slope_before) <= GROWTH_LIMIT_KB_PER_MINUTE
        and abs(step.slope_after) <= GROWTH_LIMIT_KB_PER_MINUTE
    )
    return {
        "label": process.label,
        "pid": process.pid,
        "samples": len(window),
        "minutes": round(minutes, 2),
        "rss_start_kb": window[0][1],
        "rss_end_kb": window[-1][1],
        "rss_min_kb": min(rss for _, rss, _ in window),
        "rss_max_kb": max(rss for _, rss, _ in window),
        "slope_kb_per_minute": round(slope, 2) if slope is not None else None,
        "second_half_slope_kb_per_minute": round(
            slope_per_minute([(t, rss) for t, rss, _ in second_half]) or 0.0, 2
        ),
        "cpu_seconds_per_minute": round((window[-1][2] - window[0][2]) / _CLOCK_TICKS / minutes, 3),
        "largest_step": None
        if step is None
        else {
            "at_minute": round(step.at_seconds / 60, 2),
            "size_kb": round(step.size),
            "slope_before_kb_per_minute": round(step.slope_before, 2),
            "slope_after_kb_per_minute": round(step.slope_after, 2),
        },
        "grows": slope is not None and slope > GROWTH_LIMIT_KB_PER_MINUTE and not one_step_only,
        "five_minute_lows_kb": [round(low) for _, low in lows],
        "lows_slope_kb_per_minute": None if lows_slope is None else round(lows_slope, 2),
        "lows_grow": lows_slope is not None and lows_slope > GROWTH_LIMIT_KB_PER_MINUTE,
        "replaced": process.replaced,
    }


def report(summaries: list[dict[str, Any]]) -> None:
    headline(
        f"RSS slope after the warm-up (a process grows above {GROWTH_LIMIT_KB_PER_MINUTE} kB/min, "
        "unless flat both sides of one step)"
    )
    for item in summaries:
        if "slope_kb_per_minute" not in item:
            figure(item["label"], f"pid {item['pid']}: too few samples ({item['samples']})")
            continue
        replaced = f", replaced pids {item['replaced']}" if item["replaced"] else ""
        step = item["largest_step"]
        step_text = (
            f", largest step {step['size_kb']:+,} kB at minute {step['at_minute']} "
            f"(slope {step['slope_before_kb_per_minute']:+.2f} before, "
            f"{step['slope_after_kb_per_minute']:+.2f} after)"
            if step and item["slope_kb_per_minute"] > GROWTH_LIMIT_KB_PER_MINUTE
            else ""
        )
        figure(
            f"{item['label']} (pid {item['pid']})",
            f"{item['rss_start_kb']:,} -> {item['rss_end_kb']:,} kB over {item['minutes']} min, "
            f"slope {item['slope_kb_per_minute']:+.2f} kB/min "
            f"(second half {item['second_half_slope_kb_per_minute']:+.2f}){step_text}, "
            f"CPU {item['cpu_seconds_per_minute']:.3f} s/min{replaced}",
            f"<= {GROWTH_LIMIT_KB_PER_MINUTE} kB/min, or flat both sides of one step",
            not item["grows"],
        )
        if item["lows_slope_kb_per_minute"] is not None:
            figure(
                f"  its {LOW_STRETCH_MINUTES:g}-minute lows",
                ", ".join(f"{low:,}" for low in item["five_minute_lows_kb"])
                + f" kB: slope {item['lows_slope_kb_per_minute']:+.2f} kB/min",
                f"<= {GROWTH_LIMIT_KB_PER_MINUTE} kB/min",
                not item["lows_grow"],
            )


# Probe figures: (label, how to read it from a sample, unit divisor, unit name).
_PROBE_FIGURES: list[tuple[str, Callable[[dict[str, Any]], float | None], float, str]] = [
    ("VmRSS", lambda s: s.get("VmRSS"), 1, "kB"),
    ("RssAnon", lambda s: s.get("RssAnon"), 1, "kB"),
    ("RssFile", lambda s: s.get("RssFile"), 1, "kB"),
    ("RssShmem", lambda s: s.get("RssShmem"), 1, "kB"),
    ("sqlite3_memory_used", lambda s: s.get("sqlite", {}).get("memory_used"), 1024, "kB"),
    ("sqlite page cache (heap)", lambda s: s.get("sqlite", {}).get("pagecache_heap"), 1024, "kB"),
    (
        "page cache of pooled connections",
        lambda s: sum(s["sqlite"]["pooled_connection_cache_used"]) if "sqlite" in s else None,
        1024,
        "kB",
    ),
    ("malloc arena (heap)", lambda s: s.get("mallinfo2", {}).get("arena"), 1024, "kB"),
    ("malloc hblkhd (mmap'd)", lambda s: s.get("mallinfo2", {}).get("hblkhd"), 1024, "kB"),
    ("malloc uordblks (in use)", lambda s: s.get("mallinfo2", {}).get("uordblks"), 1024, "kB"),
    ("malloc fordblks (free, kept)", lambda s: s.get("mallinfo2", {}).get("fordblks"), 1024, "kB"),
    ("malloc keepcost (trimmable top)", lambda s: s.get("mallinfo2", {}).get("keepcost"), 1024, "kB"),
    ("tracemalloc current", lambda s: s.get("tracemalloc", {}).get("current"), 1024, "kB"),
    ("Python allocated blocks", lambda s: s.get("allocated_blocks"), 1, "blocks"),
    ("compiled statements cached", lambda s: s.get("compiled_cache"), 1, "statements"),
    ("file descriptors", lambda s: s.get("fds"), 1, "fds"),
    ("threads", lambda s: s.get("Threads"), 1, "threads"),
    ("pool: connections checked in", lambda s: s.get("pool", {}).get("checkedin"), 1, "conns"),
]


def summarise_probe(samples: list[dict[str, Any]], t0: float, warm_up_seconds: float) -> list[dict[str, Any]]:
    """Per worker (its last pid): each probe figure's start, end and slope over the window."""
    last_pid: dict[int, int] = {sample["worker"]: sample["pid"] for sample in samples}
    results: list[dict[str, Any]] = []
    for worker, pid in sorted(last_pid.items()):
        window = [
            s for s in samples if s["pid"] == pid and s["worker"] == worker and s["t"] - t0 >= warm_up_seconds
        ]
        figures: dict[str, Any] = {}
        for label, read, divisor, unit in _PROBE_FIGURES:
            points = [(s["t"] - t0, value / divisor) for s in window if (value := read(s)) is not None]
            if len(points) < 3:
                continue
            slope = slope_per_minute(points)
            half = slope_per_minute(points[len(points) // 2 :])
            figures[label] = {
                "unit": unit,
                "start": round(points[0][1], 1),
                "end": round(points[-1][1], 1),
                "slope_per_minute": round(slope or 0.0, 2),
                "second_half_slope_per_minute": round(half or 0.0, 2),
            }
        top = next((s["tracemalloc"].get("top_growth") for s in reversed(window) if "tracemalloc" in s), None)
        results.append(
            {
                "worker": worker,
                "pid": pid,
                "samples": len(window),
                "figures": figures,
                "pool": window[-1]["pool"] if window else None,
                "tracemalloc_top_growth": top,
            }
        )
    return results


def report_probe(workers: list[dict[str, Any]]) -> None:
    for worker in workers:
        headline(f"probe of worker {worker['worker']} (pid {worker['pid']}, {worker['samples']} samples)")
        for label, item in worker["figures"].items():
            figure(
                label,
                f"{item['start']:,.1f} -> {item['end']:,.1f} {item['unit']}, "
                f"slope {item['slope_per_minute']:+.2f}/min "
                f"(second half {item['second_half_slope_per_minute']:+.2f})",
            )
        figure("pool at the end", json.dumps(worker["pool"]))
        for line in worker["tracemalloc_top_growth"] or []:
            growth = f"{line['size_diff'] / 1024:+9,.1f} kB {line['count_diff']:+7,} blocks"
            print(f"     {growth}  {line['where']}")


def run_soak(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    extra = {"LOG_LEVEL": "INFO", "REPLY_MAX_PER_HOUR": "100000", **dict(args.env)}
    probe_file = scratch / "probe.jsonl"
    if args.probe:
        extra |= {
            "EMAILOPS_WORKER_TARGET": TARGET,
            PROBE_FILE_ENV: str(probe_file),
            PROBE_SECONDS_ENV: str(args.probe),
            PROBE_TRACEMALLOC_ENV: str(args.tracemalloc),
            PROBE_BASELINE_ENV: str(args.warm_up * 60),
        }
    with running_rig(scratch, "soak", args.workers, extra, args.preload, args.accounts) as rig:
        base_replies = len(rig.relay.accepted)
        busy_before, ticks_before = machine_cpu_ticks()
        t0 = time.time()
        with contextlib.ExitStack() as stack:
            delivered = [0] if args.idle else stack.enter_context(steady_mail(rig, args.every))
            series = sample_until(rig, args.minutes * 60, args.sample)
        busy_after, ticks_after = machine_cpu_ticks()
        if delivered[0]:
            with contextlib.suppress(TimeoutError):
                rig.relay.wait_for_accepted(base_replies + delivered[0], timeout=30)
        replies = len(rig.relay.accepted) - base_replies
    summaries = [summarise(process, args.warm_up * 60) for process in series.values()]
    headline(
        f"{args.minutes} min, WORKERS={args.workers}, "
        + (f"{args.accounts} accounts of the index, " if args.accounts else "")
        + f"{args.preload} messages preloaded, "
        + ("no mail" if args.idle else f"a message every {args.every} s")
    )
    figure("messages delivered / replies accepted", f"{delivered[0]} / {replies}")
    figure(
        "machine CPU busy (all processes)",
        f"{(busy_after - busy_before) / max(1, ticks_after - ticks_before):.0%}",
    )
    report(summaries)
    probe_samples = read_samples(probe_file) if args.probe else []
    probe = summarise_probe(probe_samples, t0, args.warm_up * 60)
    report_probe(probe)
    return {
        "minutes": args.minutes,
        "warm_up_minutes": args.warm_up,
        "workers": args.workers,
        "accounts": args.accounts,
        "idle": args.idle,
        "preload": args.preload,
        "every_seconds": None if args.idle else args.every,
        "delivered": delivered[0],
        "replies": replies,
        "growth_limit_kb_per_minute": GROWTH_LIMIT_KB_PER_MINUTE,
        "environment": dict(args.env),
        "processes": summaries,
        "probe": probe,
        "samples_t_rss_kb_cpu_ticks": {label: process.samples for label, process in series.items()},
        "probe_samples": probe_samples,
    }


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="how long to run after the warm-up message"
    )
    parser.add_argument(
        "--warm-up", type=float, default=3.0, help="minutes of samples left out of the figures"
    )
    parser.add_argument("--workers", type=int, default=2, help="WORKERS")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between two messages")
    parser.add_argument("--idle", action="store_true", help="deliver nothing: the daemon idles")
    parser.add_argument(
        "--accounts",
        type=int,
        default=0,
        metavar="N",
        help="serve N accounts of the index (no EMAIL_*), the mail to each in turn (0: the EMAIL_* one)",
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="N messages in INBOX (each account's) before the start: the soak runs on an index of that size",
    )
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between two samples")
    parser.add_argument(
        "--probe",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the workers under bench.memory_probe, sampling every SECONDS (0: off)",
    )
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES", help="with --probe: trace Python allocations"
    )
    parser.add_argument(
        "--env",
        type=_name_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable in the daemon's environment (repeatable)",
    )
    parser.add_argument(
        "--result",
        metavar="NAME",
        help="write bench/results/NAME.json (default soak, soak-idle): runs side by side keep theirs",
    )
    parser.add_argument(
        "--scratch",
        default=default_scratch_root(),
        help="where the index and daemon state go (default /dev/shm)",
    )
    args = parser.parse_args(argv)
    if args.minutes <= args.warm_up:
        parser.error("--minutes must exceed --warm-up: the slope is taken over what follows it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # the relay's AUTH-without-TLS warning
    busy = machine_busy_now()
    if busy > 0.15:
        print(f"note: the machine was {busy:.0%} busy before the start (other processes)")
    scratch = Path(tempfile.mkdtemp(prefix="emailops-bench-soak-", dir=args.scratch))
    try:
        results = run_soak(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_result(
        args.result or ("soak-idle" if args.idle else "soak"), {"machine_busy_before_start": busy, **results}
    )
    grows = [item["label"] for item in results["processes"] if item.get("grows")]
    print(f"\nprocesses that grow: {', '.join(grows) if grows else 'none'}")
    lows_grow = [item["label"] for item in results["processes"] if item.get("lows_grow")]
    lows_text = ", ".join(lows_grow) if lows_grow else "none"
    print(f"processes whose {LOW_STRETCH_MINUTES:g}-minute lows grow: {lows_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
