"""The one wall clock of the product: aware UTC datetimes. Components take a ``Clock`` argument
defaulting to ``utc_now`` so that tests can move time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)
