"""A worker target that measures the worker's memory from inside (issue 14; not a test, no product hook).

    EMAILOPS_WORKER_TARGET=bench.memory_probe:probe_unit
    EMAILOPS_MEMORY_PROBE_FILE=/path/probe.jsonl        # required: where the samples go
    EMAILOPS_MEMORY_PROBE_SECONDS=30                    # between two samples (default 30)
    EMAILOPS_MEMORY_PROBE_TRACEMALLOC=1                 # frames per traceback; 0 (default): off
    EMAILOPS_MEMORY_PROBE_BASELINE_SECONDS=180          # tracemalloc's baseline: first sample after

``probe_unit`` is the production unit (``prod.mail_worker.create_unit``) whose ``run_once`` is
wrapped: after a call, once ``EMAILOPS_MEMORY_PROBE_SECONDS`` have passed since the last sample, one
JSON line is appended to the file (each worker appends its own lines, tagged with its id and pid).
Sampling happens in the worker's own thread, between two units of work, so the probe starts no
thread (a thread would get a glibc arena of its own and change what is measured).

A sample holds: ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` and ``Threads`` from
``/proc/self/status``; open file descriptors; SQLite's ``sqlite3_memory_used`` and
``sqlite3_memory_highwater`` and the page-cache bytes taken from the heap
(``SQLITE_STATUS_PAGECACHE_OVERFLOW``), read with ctypes from the ``libsqlite3`` that ``_sqlite3``
links (the library is process-wide, so this is every connection's memory), and the page cache of
each connection resting in the engine's pool (``SQLITE_DBSTATUS_CACHE_USED``); glibc's
``mallinfo2`` (``arena``: bytes in the heap arenas, ``hblkhd``: bytes in mmap'd blocks,
``uordblks``: bytes in use, ``fordblks``: bytes free but kept, ``keepcost``: bytes trimmable at the
top of the main heap); the engine's pool (size, checked in, checked out, overflow) and the size of
its compiled-statement cache; Python's allocated blocks, gc counts and collections per generation;
with tracemalloc on, its current and peak totals and the 10 places whose allocations grew most since
the baseline snapshot (the first sample ``EMAILOPS_MEMORY_PROBE_BASELINE_SECONDS`` after the unit was
built, so that start-up and warm-up are left out): source lines with one frame, else tracebacks.

Malloc and SQLite figures need glibc and a ``libsqlite3.so`` (Debian's Python links it); without
them those keys are absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sqlite3
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from emailops.pipeline import MailPipeline
from prod.mail_worker import create_unit
from prod.runtime_settings import RuntimeSettings

PROBE_FILE_ENV = "EMAILOPS_MEMORY_PROBE_FILE"
PROBE_SECONDS_ENV = "EMAILOPS_MEMORY_PROBE_SECONDS"
PROBE_TRACEMALLOC_ENV = "EMAILOPS_MEMORY_PROBE_TRACEMALLOC"
PROBE_BASELINE_ENV = "EMAILOPS_MEMORY_PROBE_BASELINE_SECONDS"
TARGET = "bench.memory_probe:probe_unit"

_STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads")
_SQLITE_STATUS_PAGECACHE_OVERFLOW = 2
_SQLITE_DBSTATUS_CACHE_USED = 1
_TOP_LINES = 10


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    return libc


def _libsqlite() -> Any | None:
    """The libsqlite3 that ``_sqlite3`` links: the one already mapped into this process."""
    import _sqlite3

    maps = Path("/proc/self/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in maps if "libsqlite3" in line and line.split()[-1].startswith("/")}
    if not paths:  # sqlite statically built into _sqlite3
        paths = {_sqlite3.__file__ or ""}
    try:
        lib = ctypes.CDLL(sorted(paths)[0])
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
        lib.sqlite3_status64.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int,
        ]
        lib.sqlite3_db_status.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
    except (OSError, AttributeError):
        return None
    return lib


def _sqlite_handle(connection: sqlite3.Connection) -> int:
    """The ``sqlite3 *`` of a Python connection: the first field after the object header
    (``pysqlite_Connection`` in CPython's Modules/_sqlite/connection.h)."""
    return ctypes.c_void_p.from_address(id(connection) + object.__basicsize__).value or 0


def _proc_status() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in _STATUS_KEYS:
            values[key] = int(rest.split()[0])
    return values


class MemoryProbe:
    def __init__(
        self, path: Path, engine: Engine, worker_id: int, trace_frames: int, baseline_seconds: float
    ) -> None:
        self.path = path
        self.engine = engine
        self.worker_id = worker_id
        self.libc = _libc()
        self.sqlite = _libsqlite()
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_due = time.monotonic() + baseline_seconds
        self.group_by = "traceback" if trace_frames > 1 else "lineno"
        if trace_frames > 0:
            tracemalloc.start(trace_frames)

    def sample(self) -> dict[str, Any]:
        record: dict[str, Any] = {"t": time.time(), "worker": self.worker_id, "pid": os.getpid()}
        record.update(_proc_status())
        record["fds"] = len(os.listdir("/proc/self/fd"))
        record["python_threads"] = threading.active_count()
        record["allocated_blocks"] = sys.getallocatedblocks()
        record["gc_counts"] = list(gc.get_count())
        record["gc_collections"] = [stats["collections"] for stats in gc.get_stats()]
        # SQLAlchemy's LRU of compiled statements (500 by default): a statement whose text differs
        # per message (literals instead of parameters) fills it.
        record["compiled_cache"] = len(getattr(self.engine, "_compiled_cache", None) or ())
        pool = self.engine.pool
        record["pool"] = {
            "class": type(pool).__name__,
            **{
                name: getattr(pool, name)()
                for name in ("size", "checkedin", "checkedout", "overflow")
                if callable(getattr(pool, name, None))
            },
        }
        if self.sqlite is not None:
            current, highwater = ctypes.c_int64(), ctypes.c_int64()
            self.sqlite.sqlite3_status64(
                _SQLITE_STATUS_PAGECACHE_OVERFLOW, ctypes.byref(current), ctypes.byref(highwater), 0
            )
            record["sqlite"] = {
                "memory_used": self.sqlite.sqlite3_memory_used(),
                "memory_highwater": self.sqlite.sqlite3_memory_highwater(0),
                "pagecache_heap": current.value,
                "pooled_connection_cache_used": self._pooled_cache_used(),
            }
        if self.libc is not None:
            info = self.libc.mallinfo2()
            record["mallinfo2"] = {
                name: getattr(info, name) for name in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")
            }
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            current_bytes, peak_bytes = tracemalloc.get_traced_memory()
            record["tracemalloc"] = {"current": current_bytes, "peak": peak_bytes}
            if self.baseline is None and time.monotonic() >= self.baseline_due:
                self.baseline = snapshot
            elif self.baseline is not None:
                record["tracemalloc"]["top_growth"] = [
                    {
                        "where": " <- ".join(str(frame) for frame in reversed(stat.traceback[-4:])),
                        "size_diff": stat.size_diff,
                        "count_diff": stat.count_diff,
                    }
                    for stat in snapshot.compare_to(self.baseline, self.group_by)[:_TOP_LINES]
                ]
        return record

    def _pooled_cache_used(self) -> list[int]:
        """Page-cache bytes of each connection resting in the pool (QueuePool's queue; else none)."""
        assert self.sqlite is not None
        queue = getattr(getattr(self.engine.pool, "_pool", None), "queue", ())
        used: list[int] = []
        for record in list(queue):
            dbapi = getattr(record, "dbapi_connection", None)
            if not isinstance(dbapi, sqlite3.Connection):
                continue
            current, highwater = ctypes.c_int(), ctypes.c_int()
            self.sqlite.sqlite3_db_status(
                _sqlite_handle(dbapi),
                _SQLITE_DBSTATUS_CACHE_USED,
                ctypes.byref(current),
                ctypes.byref(highwater),
                0,
            )
            used.append(current.value)
        return used

    def write(self) -> None:
        line = json.dumps(self.sample()) + "\n"
        with self.path.open("a") as out:  # O_APPEND: the workers' lines do not interleave
            out.write(line)


def probe_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    unit = create_unit(settings, worker_id)
    probe = MemoryProbe(
        Path(os.environ[PROBE_FILE_ENV]),
        unit.engine,
        worker_id,
        int(os.environ.get(PROBE_TRACEMALLOC_ENV) or 0),
        float(os.environ.get(PROBE_BASELINE_ENV) or 0),
    )
    every = float(os.environ.get(PROBE_SECONDS_ENV) or 30)
    run_once = unit.run_once
    next_sample = [0.0]

    def measured_run_once() -> None:
        run_once()
        if time.monotonic() >= next_sample[0]:
            next_sample[0] = time.monotonic() + every
            probe.write()

    unit.run_once = measured_run_once  # type: ignore[method-assign]
    return unit


def read_samples(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
