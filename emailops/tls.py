"""The one way the product builds a client TLS context, for IMAP and SMTP alike."""

from __future__ import annotations

import ssl
from pathlib import Path


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """System CAs, plus ``ca_file`` when given; certificate and hostname checking on.

    ``ssl.create_default_context(cafile=...)`` would trust only ``ca_file``; loading it on top of the
    default context keeps the system CAs too.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
