"""The ``request_id`` of one inbound message: the same in its lines from IMAP to SMTP.

Derived from the message's identity (account, folder, UIDVALIDITY, UID), so that every stage
computes it alone, in whichever worker runs it, without storing it: the indexing, the rules
decision and the delivery of its reply log the same value, and
``grep '"request_id":"…"'`` tells the message's story. A hash, so that it carries no address.
"""

from __future__ import annotations

import hashlib


def request_id(account: str, folder: str, uidvalidity: int, uid: int) -> str:
    """16 hex digits, stable across restarts and rebuilds of the index."""
    identity = f"{account}\0{folder}\0{uidvalidity}\0{uid}".encode("utf-8", "surrogateescape")
    return hashlib.blake2s(identity, digest_size=8).hexdigest()
