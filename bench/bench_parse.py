"""Parse benchmark (prints figures; not a test).

    python -m bench.bench_parse [--cache-dir DIR] [--repeat N]

Figures: messages/s, median and p99 per message over the SpamAssassin corpus for ``parse_message``
and, for comparison, ``email.parser.BytesParser(policy=compat32)`` (which only splits, decoding
nothing); then time and peak traced memory (beyond the raw message) for each hostile message.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from bench.corpus import load_spamassassin
from emailops.mime.parse import parse_message
from tests.corpus.hostile import CASES, huge_attachment_message


def _per_message(messages: list[bytes], parse: Callable[[bytes], object], repeat: int) -> list[float]:
    best = [float("inf")] * len(messages)
    for _ in range(repeat):
        for index, raw in enumerate(messages):
            started = time.perf_counter()
            parse(raw)
            best[index] = min(best[index], time.perf_counter() - started)
    return best


def _report(label: str, timings: list[float]) -> None:
    ordered = sorted(timings)
    total = sum(ordered)
    p99 = ordered[int(len(ordered) * 0.99)]
    print(
        f"{label:34s} {len(ordered) / total:9.0f} msg/s  median {statistics.median(ordered) * 1e3:6.3f} ms"
        f"  p99 {p99 * 1e3:6.3f} ms  max {ordered[-1] * 1e3:7.3f} ms  total {total:6.2f} s"
    )


def _measure(raw: bytes) -> tuple[float, int, tuple[str, ...]]:
    tracemalloc.start()
    try:
        started = time.perf_counter()
        parsed = parse_message(raw)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return elapsed, peak, parsed.problems


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--cache-dir", type=Path, default=None)
    options.add_argument("--repeat", type=int, default=3, help="runs per message; the best is kept")
    args = options.parse_args()

    messages = load_spamassassin(args.cache_dir)
    size = sum(len(raw) for raw in messages)
    print(f"SpamAssassin corpus: {len(messages)} messages, {size / 1e6:.1f} MB (best of {args.repeat} runs)")
    _report("emailops parse_message", _per_message(messages, parse_message, args.repeat))
    splitter = email.parser.BytesParser(policy=email.policy.compat32)
    _report("stdlib BytesParser(compat32) only", _per_message(messages, splitter.parsebytes, args.repeat))

    print("\nhostile messages (time without tracemalloc; peak traced memory beyond the input)")
    for case in CASES:
        _print_hostile(case.name, case.build())
    _print_hostile("50 MB attachment", huge_attachment_message())


def _print_hostile(name: str, raw: bytes) -> None:
    elapsed = _per_message([raw], parse_message, 1)[0]
    _, peak, problems = _measure(raw)
    figures = f"{len(raw):>10,d} B  {elapsed * 1e3:8.2f} ms  peak {peak / 1024:8.1f} KiB"
    print(f"  {name:28s} {figures}  {', '.join(problems)}")


if __name__ == "__main__":
    main()
