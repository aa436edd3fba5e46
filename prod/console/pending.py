"""Browser flows started on the console and finished by a redirect back from another site (OIDC
sign-in, OAuth2 Reconnect): what the callback must match stays in this process, found by the
flow's ``state``, taken at most once and only within its lifetime."""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

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


class FlowCookie:
    """The short-lived cookie that binds a flow's ``state`` to the browser that started it:
    ``HttpOnly``, ``SameSite=Lax`` (the redirect back is a cross-site navigation, which would
    not carry a Strict cookie), ``__Host-`` and ``Secure`` under https."""

    def __init__(self, name: str, seconds: int) -> None:
        self.name = name
        self.seconds = seconds

    def _name(self, secure: bool) -> str:
        return f"__Host-{self.name}" if secure else self.name

    def redirect(self, url: str, state: str, *, secure: bool) -> RedirectResponse:
        """Send the browser to ``url`` (the other site), the cookie set to ``state``."""
        response = RedirectResponse(url, status_code=303)
        response.set_cookie(
            self._name(secure), state, max_age=self.seconds, httponly=True, samesite="lax", secure=secure
        )
        return response

    def matches(self, request: Request, state: str, *, secure: bool) -> bool:
        expected = request.cookies.get(self._name(secure), "")
        return bool(state and expected) and hmac.compare_digest(state.encode(), expected.encode())

    def forget(self, response: Response, *, secure: bool) -> None:
        response.delete_cookie(self._name(secure), secure=secure, samesite="lax")
