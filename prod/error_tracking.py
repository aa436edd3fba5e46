"""Sentry for the supervisor and every worker, with nothing secret or personal in an event.

With ``SENTRY_DSN`` set, ERROR log records (with their exception) and unhandled exceptions become
events tagged with ``environment=ENV``, ``release=emailops.__version__`` and the ``worker``
(``supervisor`` for the supervisor). ``scrub_event`` runs on every event: request data, local
variables and message bodies are dropped, and every remaining string goes through the redactor
that masks the password (all its spellings), authorization data and URL passwords.

Breadcrumbs (the log lines before an event) carry no recipient, subject or message text unless
``SENTRY_SEND_PII=true``: a line of the product's own logging keeps its event name (a constant;
its fields never reach Sentry), a library's line keeps only its template (``"[%s] %r"``), not the
values formatted into it, and a line without a template is withheld. The SDK's own breadcrumb of
each SQL statement (category ``query``) is dropped: see ``breadcrumb_scrubber``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import emailops
from prod.redaction import REDACTOR

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

FLUSH_TIMEOUT_SECONDS = 2.0
WITHHELD = "(text withheld; SENTRY_SEND_PII=true sends it)"

# Keys whose values may carry message content or credentials; dropped wherever they appear.
_DROPPED_KEYS = frozenset(
    {"body", "body_text", "body_html", "raw", "raw_message", "payload", "vars", "cookies"}
)


def _scrub(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _scrub(value) for key, value in data.items() if key not in _DROPPED_KEYS}
    if isinstance(data, list):
        return [_scrub(item) for item in data]
    return REDACTOR.redact(data)


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry ``before_send``: remove request data, frame locals and bodies; mask secrets."""
    event.pop("request", None)
    event.pop("user", None)
    return REDACTOR.redact_dict(_scrub(event))


BreadcrumbScrubber = Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any] | None]

# The SDK's database integrations (SQLAlchemy's is enabled by itself) record every SQL statement.
_DROPPED_BREADCRUMB_CATEGORIES = frozenset({"query"})


def breadcrumb_scrubber(*, send_pii: bool) -> BreadcrumbScrubber:
    """Sentry ``before_breadcrumb``: breadcrumbs are log lines and HTTP calls; secrets are masked in
    all of them, and without ``send_pii`` a log line's text is cut to what names no person.

    SQL statements are dropped: the daemon runs dozens a second, so within the event's last
    ``max_breadcrumbs`` they would push out the log lines that tell what went wrong, and a
    statement's text may hold values written into it (the log lines of ``sqlalchemy.engine`` at
    ``LOG_LEVEL=DEBUG`` still show them, cut like any library's line)."""

    def scrub(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
        if crumb.get("category") in _DROPPED_BREADCRUMB_CATEGORIES:
            return None
        record = (hint or {}).get("log_record")
        if not send_pii and isinstance(record, logging.LogRecord):
            crumb = {**crumb, "message": _impersonal_text(record), "data": {}}
        return REDACTOR.redact_dict(_scrub(crumb))

    return scrub


def _impersonal_text(record: logging.LogRecord) -> str:
    if isinstance(record.msg, dict):  # a structlog event: its text is the event name
        return str(record.msg)
    if record.args and isinstance(record.msg, str):
        return record.msg
    return WITHHELD


def init_error_tracking(settings: RuntimeSettings, *, worker: int | None) -> bool:
    """Start Sentry for this process if ``SENTRY_DSN`` is set; returns whether it did.

    Call after ``configure_logging`` (which registers the secrets the scrubber masks).
    """
    if not settings.sentry_dsn:
        return False
    # Imported here: without a DSN, processes do not pay for importing the SDK.
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    REDACTOR.register(settings.email_password.get_secret_value(), username=settings.email_username)
    for secret in settings.oauth2_secrets():
        REDACTOR.register(secret)
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.env,
        release=emailops.__version__,
        send_default_pii=False,
        include_local_variables=False,
        include_source_context=False,
        max_request_body_size="never",
        before_send=scrub_event,  # type: ignore[arg-type]
        before_breadcrumb=breadcrumb_scrubber(send_pii=settings.sentry_send_pii),
        shutdown_timeout=FLUSH_TIMEOUT_SECONDS,
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
    )
    sentry_sdk.set_tag("worker", "supervisor" if worker is None else str(worker))
    return True


def flush_error_tracking() -> None:
    """Send what is queued (called on every exit path; a no-op without Sentry)."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is None:
        return
    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=FLUSH_TIMEOUT_SECONDS)
