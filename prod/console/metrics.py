"""The console's request metrics, served by the supervisor's ``/metrics`` with the workers'.

Like a worker's (``emailops.metrics``), the values go to prometheus-client's multiprocess directory
the supervisor set up, when ``METRICS_PORT`` is set; without it nothing is counted. The ``route``
label is the route's template (``/users/{name}/disable``), never the address asked for, and a
method outside HTTP's usual ones counts as ``other``: bounded, whatever clients send.
"""

from __future__ import annotations

from typing import Any

from emailops.metrics import LATENCY_BUCKETS

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics:
    def __init__(self, *, enabled: bool, registry: Any = None) -> None:
        """``registry=None``: the multiprocess files (the console process); a test passes its own."""
        self._requests: Any = None
        self._duration: Any = None
        if not enabled:
            return
        from prometheus_client import Counter, Histogram

        self._requests = Counter(
            "emailops_http_requests",
            "Requests the operator console answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self._duration = Histogram(
            "emailops_http_request_duration_seconds",
            "Seconds the operator console took to answer a request, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if self._requests is None:
            return
        self._requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self._duration.labels(route).observe(seconds)
