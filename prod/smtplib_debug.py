"""The only patch of a library's private part: smtplib's debug output goes to logging.

smtplib prints its debug output (the AUTH lines included) to stderr through the private method
``SMTP._print_debug``; replacing it sends those lines through the logging pipeline, where they are
redacted like any other. ``tests/test_smtplib_debug.py`` pins that smtplib still prints through
that method, so that a Python upgrade that changes it fails a test rather than leaking credentials
to stderr.
"""

from __future__ import annotations

import logging
import smtplib
from typing import Any


def route_smtplib_debug_to_logging() -> None:
    """Every ``smtplib.SMTP`` (and subclass) of this process logs its debug output on the
    ``smtplib`` logger at DEBUG level instead of printing it."""
    smtplib.SMTP._print_debug = _smtplib_debug_to_logging  # type: ignore[attr-defined]


def _smtplib_debug_to_logging(self: smtplib.SMTP, *args: Any) -> None:
    logging.getLogger("smtplib").debug(" ".join(str(arg) for arg in args))
