"""The console's rule test on an indexed message (``try_rules_on_indexed``) on both backends: the
daemon's decision, and nothing recorded."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

from emailops.replies import outbox
from emailops.replies.trial import try_rules_on_indexed, try_rules_on_raw
from emailops.rules.loader import parse_rules
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from tests.index_helpers import ACCOUNT, index_engine, message, rows
from tests.reply_factories import reply_config
from tests.test_store import NOW, fetched

RULES = parse_rules(
    tomllib.loads(
        '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "subject"\n[rules.reply]\ntemplate = "Got it"\n'
    ),
    path=Path("rules.toml"),
)


def test_a_trial_on_an_indexed_message_decides_as_the_daemon_and_records_nothing(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        pk = message_store.insert_messages(conn, folder.id, 1, [fetched(1)], baseline_uidnext=1, now=NOW)[1]
    now = datetime.now(UTC)
    trial = {"account": ACCOUNT, "rules": RULES, "config": reply_config(), "client": None, "now": now}
    (outcome,) = try_rules_on_indexed(engine, pk, **trial) or []
    assert (outcome.rule, outcome.verdict) == ("ack", "would reply")
    assert (
        outcome.reply is not None
        and b"Got it" in outcome.reply
        and b"Subject: Re: subject 1" in outcome.reply
    )
    assert rows(engine, "SELECT count(*) FROM outbox") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM rule_decisions") == [(0,)]
    assert rows(engine, "SELECT count(*) FROM messages") == [(1,)]

    with engine.begin() as conn:  # the daemon replied to it meanwhile
        outbox.insert_reply(
            conn,
            account=ACCOUNT,
            inbound_key="<m1@example.org>",
            message_pk=pk,
            rule_name="ack",
            action="send",
            recipient="ann@example.org",
            reply_message_id="<r@example.net>",
            subject="Re: subject 1",
            raw=b"x",
            now=now,
        )
    (again,) = try_rules_on_indexed(engine, pk, **trial) or []
    assert again.verdict == "already recorded"
    assert try_rules_on_indexed(engine, pk, **{**trial, "account": "other"}) is None

    (uploaded,) = try_rules_on_raw(
        engine, message(7, subject="subject of an upload"), max_message_bytes=10**6, folder="INBOX", **trial
    )
    assert uploaded.verdict == "would reply" and rows(engine, "SELECT count(*) FROM outbox") == [(1,)]
    engine.dispose()
