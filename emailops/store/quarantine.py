"""What the operator is told of a message set aside because a stage kept failing on it."""

from __future__ import annotations

from dataclasses import dataclass

# A quarantine reason is kept to this length (it may quote an exception's text).
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class QuarantinedMessage:
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    attempts: int
    reason: str
