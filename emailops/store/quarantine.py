"""What the operator is told of a message set aside because a stage kept failing on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuarantinedMessage:
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    attempts: int
    reason: str
