"""Pins what ``prod/smtplib_debug.py`` relies on: smtplib prints its debug output through
``SMTP._print_debug``, so that replacing it keeps every line (AUTH included) off stderr."""

from __future__ import annotations

import logging
import smtplib

import pytest

from localmail.smtp_relay import LocalSmtpRelay
from prod.smtplib_debug import route_smtplib_debug_to_logging


def test_smtplib_debug_output_goes_to_the_smtplib_logger_only(
    smtp_relay: LocalSmtpRelay,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(smtplib.SMTP, "_print_debug", smtplib.SMTP._print_debug)  # restored after
    route_smtplib_debug_to_logging()
    with (
        caplog.at_level(logging.DEBUG, logger="smtplib"),
        smtplib.SMTP(smtp_relay.host, smtp_relay.port, timeout=10) as smtp,
    ):
        smtp.set_debuglevel(2)
        smtp.ehlo("client.example.test")
    lines = [record.getMessage() for record in caplog.records if record.name == "smtplib"]
    assert any("ehlo client.example.test" in line for line in lines), lines
    assert any("reply:" in line for line in lines), lines
    assert capsys.readouterr().err == ""
