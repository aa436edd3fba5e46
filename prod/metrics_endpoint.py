"""The supervisor's Prometheus endpoint: ``/metrics`` for itself and all its workers.

On when ``METRICS_PORT`` is set, listening on ``METRICS_ADDR`` (default 127.0.0.1). It uses
prometheus-client's multiprocess mode: ``MetricsEndpoint.start`` empties ``STATE_DIR/metrics`` and
points ``PROMETHEUS_MULTIPROC_DIR`` at it *before* any worker is spawned, so that each worker's
``emailops.metrics`` values are kept in files there (one set per worker process). A scrape sums
them: the files of a dead worker stay, so counters survive a worker's restart, and ``worker_gone``
drops its "live" gauges (the outbox counts). The files grow by one set per worker process started;
they are removed at the next start of the supervisor.

The supervisor's own figures (workers up, restarts, memory of each process, the data filesystem,
log lines by level, build info) are computed at scrape time from the last ``Figures`` the
supervisor loop handed over with ``update`` and from ``/proc``: the HTTP thread never touches the
supervisor's state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_SUBDIR = "metrics"
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Figures:
    """What the supervisor knows, as of its last loop iteration."""

    started_at: float = 0.0
    workers_expected: int = 0
    workers_up: int = 0
    worker_pids: Mapping[int, int] = field(default_factory=dict)  # worker id -> pid, live processes
    restarts: Mapping[str, int] = field(default_factory=dict)  # reason -> count since start
    console_pid: int | None = None  # the operator console's process (WEB_PORT), when running


def resident_memory_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (Linux ``/proc``), None if it is gone or unknown."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * _PAGE_SIZE


def memory_limit_bytes() -> int | None:
    """The container's memory limit (cgroup v2 or v1), or the machine's memory when lower or unset."""
    candidates = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            candidates.append(int(text))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    return min(candidates) if candidates else None


class SupervisorCollector:
    """The supervisor's figures as Prometheus families (a prometheus-client custom collector)."""

    def __init__(
        self,
        settings: RuntimeSettings,
        figures: Callable[[], Figures],
        log_lines: Callable[[], dict[str, int]],
    ) -> None:
        self._data_dir = settings.state_dir
        self._figures = figures
        self._log_lines = log_lines

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from emailops import __version__

        figures = self._figures()
        build = GaugeMetricFamily(
            "emailops_build_info", "Version of the running EmailOps.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily(
            "emailops_supervisor_start_time_seconds",
            "UNIX time the supervisor started.",
            value=figures.started_at,
        )
        yield GaugeMetricFamily("emailops_workers_expected", "WORKERS.", value=figures.workers_expected)
        yield GaugeMetricFamily(
            "emailops_workers_up", "Workers running (booted, heartbeating).", value=figures.workers_up
        )
        restarts = CounterMetricFamily(
            "emailops_worker_restarts",
            "Workers restarted since the supervisor started, by reason (died, hung, boot_failure).",
            labels=["reason"],
        )
        for reason in ("died", "hung", "boot_failure"):
            restarts.add_metric([reason], figures.restarts.get(reason, 0))
        yield restarts
        memory = GaugeMetricFamily(
            "emailops_resident_memory_bytes",
            "Resident memory of the supervisor, of each worker process and of the console.",
            labels=["process"],
        )
        processes = [("supervisor", os.getpid())]
        processes += [(f"worker-{worker}", pid) for worker, pid in sorted(figures.worker_pids.items())]
        if figures.console_pid is not None:
            processes.append(("console", figures.console_pid))
        for name, pid in processes:
            rss = resident_memory_bytes(pid)
            if rss is not None:
                memory.add_metric([name], rss)
        yield memory
        limit = memory_limit_bytes()
        if limit is not None:
            yield GaugeMetricFamily(
                "emailops_memory_limit_bytes",
                "Memory the processes may use: the container's limit, or the machine's memory.",
                value=limit,
            )
        try:
            disk = os.statvfs(self._data_dir)
        except OSError:
            pass
        else:
            yield GaugeMetricFamily(
                "emailops_data_filesystem_size_bytes",
                "Size of the filesystem holding STATE_DIR (the data volume).",
                value=disk.f_blocks * disk.f_frsize,
            )
            yield GaugeMetricFamily(
                "emailops_data_filesystem_avail_bytes",
                "Bytes available to unprivileged users on the filesystem holding STATE_DIR.",
                value=disk.f_bavail * disk.f_frsize,
            )
        lines = CounterMetricFamily(
            "emailops_log_lines",
            "Log lines written by the supervisor for all processes, by level.",
            labels=["level"],
        )
        counts = self._log_lines()
        for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            lines.add_metric([level], counts.get(level, 0))
        yield lines


class MetricsEndpoint:
    """The HTTP server of ``/metrics``; ``start`` must run before the first worker is spawned."""

    def __init__(self, directory: Path, server: Any) -> None:
        self.directory = directory
        self._server = server
        self._figures = Figures()

    @classmethod
    def start(
        cls, settings: RuntimeSettings, log_lines: Callable[[], dict[str, int]] = dict
    ) -> MetricsEndpoint:
        """Empty the multiprocess directory, export its path to the workers to come, and listen.

        Raises ``OSError`` when the address cannot be bound (a port in use, an unknown address)."""
        assert settings.metrics_port is not None
        directory = settings.state_dir / METRICS_SUBDIR
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        # Inherited by every worker spawned from now on; prometheus-client reads it at import.
        os.environ[MULTIPROC_ENV] = str(directory)
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        endpoint = cls(directory, None)
        registry.register(SupervisorCollector(settings, lambda: endpoint._figures, log_lines))
        endpoint._server, _thread = start_http_server(
            settings.metrics_port, addr=settings.metrics_addr, registry=registry
        )
        return endpoint

    def update(self, figures: Figures) -> None:
        self._figures = figures  # one reference swap: the HTTP thread reads whole snapshots

    def worker_gone(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
