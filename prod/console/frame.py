"""What every console response gets, whatever its route: a request id, strict headers, one log
line and the request metrics (a pure ASGI middleware, around the routing)."""

from __future__ import annotations

import secrets
import time
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prod.console.metrics import HttpMetrics
from prod.logging_setup import get_logger

# No inline script or style anywhere: htmx is a file of ours, its inline indicator style is off
# (htmx-config in base.html). Nothing may frame the console (clickjacking); its pages frame only
# its own sanitized mail, which is served with its own stricter policy (FRAMED_HEADERS).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "frame-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STATIC_PREFIX = "/static/"
# Headers a response may set itself to be framed by the console (a message's HTML: FRAME_CSP).
FRAMED_HEADERS = {b"content-security-policy", b"x-frame-options"}


def new_request_id() -> str:
    """16 hex digits, the shape of ``emailops.request_ids.request_id``: one grep finds either."""
    return secrets.token_hex(8)


class RequestFrame:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics, *, https: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.https = https
        self.log = get_logger("console")

    def _headers(self, path: str, request_id: str) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-request-id", request_id.encode()),
            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
            # Static files are the same for everyone; every other answer may be someone's.
            (b"cache-control", b"public, max-age=3600" if path.startswith(STATIC_PREFIX) else b"no-store"),
        ]
        if self.https:
            headers.append((b"strict-transport-security", b"max-age=31536000"))
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        started = time.perf_counter()
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            seconds = time.perf_counter() - started
            static = scope["path"].startswith(STATIC_PREFIX)
            route = state.get("route") or ("/static" if static else "unmatched")
            self.metrics.observe(route, scope["method"], status, seconds)
            self.log.info(
                "request",
                request_id=request_id,
                method=scope["method"],
                route=route,
                status=status,
                duration_ms=round(seconds * 1000, 1),
                user=state.get("user"),
            )

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                own = {k.lower() for k, _ in message.get("headers", [])} & FRAMED_HEADERS
                ours = [(k, v) for k, v in self._headers(scope["path"], request_id) if k not in own]
                names = {name for name, _ in ours}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + ours
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the client has the whole answer: whoever got it finds it counted.
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if not recorded:  # no answer completed (the app failed, or the client went away)
                record()
