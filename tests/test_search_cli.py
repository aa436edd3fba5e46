"""``emailops search`` as a user runs it, against a real Dovecot synced into the index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, daemon_env
from tests.test_cli import REPO, emailops

SUBJECT_CJK = "外贸客户开发\uff0c势在必行"


def mail(n: int, subject: str, body: str, sender: str, extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMessage-ID: <cli-{n}@example.org>\r\n"
        f"Date: Tue, {n} Nov 2026 10:00:00 +0000\r\n{extra}"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def env(dovecot: LocalDovecot, tmp_path: Path) -> dict[str, str]:
    dovecot.append(ALICE, "INBOX", mail(2, "Invoice 4711", "please pay the invoice", "Ann <ann@example.org>"))
    reply = "In-Reply-To: <cli-2@example.org>\r\nReferences: <cli-2@example.org>\r\n"
    dovecot.append(ALICE, "INBOX", mail(3, "Re: Invoice 4711", "paid, thanks", "bob@example.net", reply))
    dovecot.append(ALICE, "INBOX", mail(4, SUBJECT_CJK, "WhatsApp外贸", "news@cn.example"), flags=["\\Seen"])
    environment = daemon_env(dovecot, tmp_path)
    synced = emailops(environment, "sync", "--once")
    assert synced.returncode == 0, synced.stderr
    return environment


def test_outputs(env: dict[str, str]) -> None:
    ids = emailops(env, "search", "--output", "ids", "invoice")
    assert ids.returncode == 0, ids.stderr
    lines = ids.stdout.splitlines()
    assert [line.split()[::2] for line in lines] == [["INBOX", "2"], ["INBOX", "1"]]  # newest first
    assert all(line.split()[1].isdigit() for line in lines)  # the UIDVALIDITY

    assert emailops(env, "search", "--count", "invoice").stdout == "2\n"
    assert emailops(env, "search", "--count", "is:unread").stdout == "2\n"
    oldest = emailops(
        env,
        "search",
        "--output",
        "ids",
        "--sort",
        "oldest",
        "--limit",
        "1",
        "--offset",
        "1",
        "--",
        "-is:read",
    )
    assert [line.split()[2] for line in oldest.stdout.splitlines()] == ["2"]

    threads = emailops(env, "search", "--output", "threads", "invoice OR 外贸")
    assert threads.stdout.splitlines() == [
        f"2026-11-04 10:00     1  {SUBJECT_CJK}  thread:<cli-4@example.org>",
        "2026-11-03 10:00     2  Re: Invoice 4711  thread:<cli-2@example.org>",
    ]

    found = json.loads(emailops(env, "search", "--json", "pay*").stdout)
    assert [(h["uid"], h["snippet"], h["marks"]) for h in found] == [(1, "please pay the invoice", [[7, 10]])]
    cjk = json.loads(emailops(env, "search", "--output", "json", "subject:外贸").stdout)
    assert [h["subject"] for h in cjk] == [SUBJECT_CJK]
    summary = emailops(env, "search", "from:ann@example.org invoice")
    assert "INBOX:1" in summary.stdout and "[invoice]" in summary.stdout, summary.stdout


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("(((", "emailops search: at character 3: expected ) to close the ( here"),
        (
            '"unclosed',
            'emailops search: at character 1: expected a closing " for the phrase that starts here',
        ),
        (
            "from:",
            "emailops search: at character 6: expected a value after from: "
            '(a word, "a phrase" or an address)',
        ),
        ("frm:x", "emailops search: at character 1: unknown operator frm:; did you mean from:?"),
        ("date:2026-13-45", "emailops search: at character 6: expected a real date, found '2026-13-45'"),
    ],
)
def test_unparsable_queries_exit_2_with_one_line(tmp_path: Path, query: str, message: str) -> None:
    # Parsed before the index or the server is touched: no mail server needed.
    env = {
        "PATH": "/usr/bin:/bin",
        "EMAIL_IMAP_HOST": "imap.invalid",
        "EMAIL_IMAP_PORT": "993",
        "EMAIL_SMTP_HOST": "smtp.invalid",
        "EMAIL_SMTP_PORT": "465",
        "EMAIL_USERNAME": ALICE,
        "EMAIL_PASSWORD": "x",
        "INDEX_DB_URL": f"sqlite:///{tmp_path / 'index.db'}",
        "STATE_DIR": str(tmp_path / "state"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "LOG_FILE_ENABLED": "false",
        "RULES_FILE": str(tmp_path / "rules.toml"),
    }
    result = emailops(env, "search", query)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_help_lists_every_operator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emailops", "search", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    from emailops.search.query import OPERATORS

    assert result.returncode == 0
    missing = [op for op in OPERATORS if f"{op}:" not in result.stdout]
    assert missing == [] and "--output" in result.stdout and "--sort" in result.stdout
