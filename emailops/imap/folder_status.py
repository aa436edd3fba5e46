"""What one sync pass saw of a folder on the server, and what it did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MailboxStatus:
    """The folder as SELECT showed it."""

    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None


@dataclass
class SyncReport:
    folder: str
    new: int = 0
    flags_changed: int = 0
    expunged: int = 0
    resynced: bool = False
    seconds: float = 0.0
    new_message_pks: list[int] = field(default_factory=list)
    # False when the pass stopped at its time budget; the next pass carries on where it stopped.
    complete: bool = True
    # True when the folder does not exist on the server (``sync_once`` goes on with the others).
    missing: bool = False


def mailbox_status(response: dict[bytes, object]) -> MailboxStatus:
    """The status in a SELECT answer (imapclient's ``select_folder``)."""

    def number(key: bytes) -> int | None:
        value = response.get(key)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        return int(value) if value is not None else None  # type: ignore[call-overload]

    uidvalidity = number(b"UIDVALIDITY")
    if uidvalidity is None:
        raise ValueError("the server's SELECT answer has no UIDVALIDITY")
    return MailboxStatus(
        uidvalidity=uidvalidity,
        uidnext=number(b"UIDNEXT"),
        exists=number(b"EXISTS") or 0,
        highestmodseq=number(b"HIGHESTMODSEQ"),
    )
