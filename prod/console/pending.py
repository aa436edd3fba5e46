"""Browser flows started on the console and finished by a redirect back from another site (OIDC
sign-in, OAuth2 Reconnect): what the callback must match stays in this process, found by the
flow's ``state``, taken at most once and only within its lifetime."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class PendingFlows(Generic[T]):
    """Started flows by state; at most ``limit`` kept (the oldest dropped: anyone may start one)."""

    def __init__(self, seconds: float, limit: int = 10_000) -> None:
        self.seconds = seconds
        self.limit = limit
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def put(self, state: str, value: T) -> None:
        with self._lock:
            self._pending[state] = (time.monotonic(), value)
            while len(self._pending) > self.limit:
                self._pending.popitem(last=False)

    def take(self, state: str) -> T | None:
        with self._lock:
            found = self._pending.pop(state, None)
        if found is None or time.monotonic() - found[0] > self.seconds:
            return None
        return found[1]
