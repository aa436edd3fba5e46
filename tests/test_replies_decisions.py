"""apply_rules: robots, limits, outbox rows in the caller's transaction, dry run, mailbox actions.

Runs on SQLite and PostgreSQL (``db_url``), since the limits are counted from the outbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from structlog.testing import capture_logs

from emailops.mime.model import Address
from emailops.replies import outbox
from emailops.replies.decisions import (
    Decision,
    MailboxAction,
    MailboxActionKind,
    apply_rules,
    mailbox_actions,
)
from emailops.rules import RuleSet, load_rules
from emailops.store.database import create_index_engine
from emailops.store.schema import metadata
from emailops.store.schema import outbox as outbox_table
from tests.reply_factories import parsed_message, reply_config

T0 = datetime(2024, 5, 6, 8, 0, 0, tzinfo=UTC)
RULES = """
[[rules]]
name = "ack"
[rules.match]
subject = "help"
[rules.reply]
template = "Hello {sender_name}, we got \\"{subject}\\"."
once_per_sender_days = 7
[rules.actions]
flag = true

[[rules]]
name = "vip-draft"
[rules.match]
from = "*@vip.example"
[rules.reply]
template = "Draft for {sender}"
draft = true
[rules.actions]
move = "VIP"
stop = true

[[rules]]
name = "never-reached-for-vip"
[rules.actions]
mark_seen = true
"""


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_index_engine(db_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(RULES, encoding="utf-8")
    return load_rules(path)


def run(
    engine: Engine, rules: RuleSet, *, uid: int = 1, now: datetime = T0, config: Any = None, **parsed: Any
) -> list[Decision]:
    with engine.begin() as conn:
        return apply_rules(
            conn,
            account="acct",
            message_pk=None,
            folder="INBOX",
            uidvalidity=7,
            uid=uid,
            parsed=parsed_message(**parsed),
            rules=rules,
            config=config or reply_config(),
            now=now,
        )


def rows(engine: Engine) -> list[outbox.OutboxRow]:
    with engine.connect() as conn:
        return outbox.list_replies(conn)


def test_reply_recorded_with_mailbox_actions(engine: Engine, rules: RuleSet) -> None:
    decisions = run(engine, rules)
    assert [(d.rule, d.reply_action, d.suppressed, d.created) for d in decisions] == [
        ("ack", "send", None, True),
        ("never-reached-for-vip", None, None, False),
    ]
    (row,) = rows(engine)
    assert decisions[0].outbox_id == row.id
    assert row.inbound_key == "<m1@example.org>" and row.recipient == "alice@example.org"
    msg = message_from_bytes(row.raw, policy=policy.default)
    assert msg["To"] == "Alice Example <alice@example.org>"
    assert 'Hello Alice Example, we got "Need help with my order".' in msg.get_content()
    assert mailbox_actions(decisions) == [
        MailboxAction(MailboxActionKind.FLAG),
        MailboxAction(MailboxActionKind.MARK_SEEN),
    ]


def test_rerun_is_idempotent(engine: Engine, rules: RuleSet) -> None:
    first = run(engine, rules)
    again = run(engine, rules, uid=2)  # same Message-ID seen again (e.g. copied to a second folder)
    assert again[0].outbox_id == first[0].outbox_id and not again[0].created and again[0].suppressed is None
    assert len(rows(engine)) == 1


def test_draft_move_and_stop(engine: Engine, rules: RuleSet) -> None:
    decisions = run(engine, rules, subject="hi", from_=(Address("V", "ceo@vip.example"),))
    assert [(d.rule, d.reply_action) for d in decisions] == [("vip-draft", "draft")]
    assert mailbox_actions(decisions) == [MailboxAction(MailboxActionKind.MOVE, "VIP")]
    assert rows(engine)[0].action == "draft"


def test_robot_suppressed_and_logged(engine: Engine, rules: RuleSet) -> None:
    with capture_logs() as logs:
        decisions = run(engine, rules, headers={"Precedence": ["bulk"]})
    assert decisions[0].suppressed == "precedence: bulk" and decisions[0].outbox_id is None
    assert rows(engine) == []
    suppressed = [e for e in logs if e["event"] == "reply suppressed"]
    assert suppressed == [suppressed[0]] and suppressed[0]["reason"] == "precedence: bulk"
    assert suppressed[0]["component"] == "rules" and suppressed[0]["rule"] == "ack"
    # Mailbox actions still happen: suppressing the reply does not unmatch the rule.
    assert MailboxAction(MailboxActionKind.FLAG) in mailbox_actions(decisions)


def test_once_per_sender_window(engine: Engine, rules: RuleSet) -> None:
    run(engine, rules, message_id="<a@x>")
    second = run(engine, rules, message_id="<b@x>", now=T0 + timedelta(days=6))
    assert second[0].suppressed == "already answered this sender within 7 days"
    third = run(engine, rules, message_id="<c@x>", now=T0 + timedelta(days=7, seconds=1))
    assert third[0].suppressed is None and third[0].created
    with engine.begin() as conn:
        assert outbox.cancel_reply(conn, third[0].outbox_id or 0, now=T0)
    fourth = run(engine, rules, message_id="<d@x>", now=T0 + timedelta(days=7, seconds=2))
    assert fourth[0].created  # a cancelled reply does not count


def test_global_caps(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[rules]]\nname = "all"\n[rules.reply]\ntemplate = "x"\nonce_per_sender_days = 0\n')
    rules = load_rules(path)
    config = reply_config(max_replies_per_sender_per_day=2, max_replies_per_hour=3)
    got = [run(engine, rules, message_id=f"<s{i}@x>", config=config)[0].suppressed for i in range(3)]
    assert got == [None, None, "sender cap: 2 replies to this sender in 24 hours"]
    others = [
        run(engine, rules, message_id=f"<o{i}@x>", config=config, from_=(Address("", f"u{i}@example.org"),))[
            0
        ]
        for i in range(2)
    ]
    assert [d.suppressed for d in others] == [None, "hourly cap: 3 replies in the last hour"]
    later = run(
        engine,
        rules,
        message_id="<late@x>",
        config=config,
        now=T0 + timedelta(hours=1, seconds=1),
        from_=(Address("", "u9@example.org"),),
    )
    assert later[0].suppressed is None


def test_dry_run_records_nothing(engine: Engine, rules: RuleSet) -> None:
    with capture_logs() as logs:
        decisions = run(engine, rules, config=reply_config(dry_run=True))
    assert decisions[0].dry_run and decisions[0].outbox_id is None and decisions[0].suppressed is None
    assert mailbox_actions(decisions) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox_table)).scalar_one() == 0
    assert any(e["event"] == "dry run: would reply" and e["recipient"] == "alice@example.org" for e in logs)


def test_message_without_message_id_uses_folder_key(engine: Engine, rules: RuleSet) -> None:
    run(engine, rules, message_id=None)
    run(engine, rules, message_id="not a valid id", uid=2)
    assert sorted(r.inbound_key for r in rows(engine)) == ["INBOX/7/1"]  # second: once per sender


def test_rollback_leaves_no_row(engine: Engine, rules: RuleSet) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        apply_rules(
            conn,
            account="acct",
            message_pk=None,
            folder="INBOX",
            uidvalidity=7,
            uid=1,
            parsed=parsed_message(),
            rules=rules,
            config=reply_config(),
            now=T0,
        )
        raise RuntimeError("crash before commit")
    assert rows(engine) == []
