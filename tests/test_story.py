"""A message's story after the daemon processed it (Dovecot, the SMTP relay, both backends): the
rules that match, the decision and why, the reply and its delivery."""

from __future__ import annotations

from pathlib import Path

from emailops.request_ids import request_id
from emailops.rules import load_rules
from emailops.story import message_story
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import ACCOUNT, ALICE, rows
from tests.test_replies_e2e import BOB, ROBOTS, RULES, Daemon, inbound

MORE_RULES = (
    RULES
    + '\n[[rules]]\nname = "invoices"\n[rules.match]\nsubject = "invoice"\n[rules.actions]\nflag = true\n'
)


def test_the_story_tells_matches_decisions_and_delivery(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, db_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(MORE_RULES)
    rules = load_rules(rules_file)
    daemon = Daemon(dovecot, smtp_relay, db_url, rules_file)
    try:
        daemon.run_until(daemon.watching)
        dovecot.deliver(ALICE, inbound("I need help", n=1))
        dovecot.deliver(ALICE, inbound("help, automatic", n=2, extra=ROBOTS["auto-submitted"]))
        daemon.run_until(
            lambda: rows(daemon.engine, "SELECT count(*) FROM messages WHERE rules_state = 'done'") == [(2,)]
        )
        daemon.run_until(lambda: daemon.outbox() == [("support-ack", "sent", BOB, None)])
        (human, robot) = [r[0] for r in rows(daemon.engine, "SELECT id FROM messages ORDER BY uid")]
        with daemon.engine.connect() as conn:
            told = message_story(conn, human, account=ACCOUNT, rules=rules)
            robot_told = message_story(conn, robot, account=ACCOUNT, rules=rules)
            assert message_story(conn, human, account="other", rules=rules) is None
    finally:
        daemon.close()
    assert told is not None and robot_told is not None
    assert (told.folder, told.subject, told.sender, told.rules_state) == ("INBOX", "I need help", BOB, "done")
    ((uidvalidity,),) = rows(daemon.engine, "SELECT uidvalidity FROM folders")
    assert told.request_id == request_id(ACCOUNT, "INBOX", int(str(uidvalidity)), 1)  # as in its log lines
    assert [(m.rule, m.matches) for m in told.rules] == [("support-ack", True), ("invoices", False)]
    assert [(d.rule, d.outcome, d.reason) for d in told.decisions] == [("support-ack", "replied", None)]
    (sent,) = told.replies
    assert (sent.rule, sent.state, sent.recipient, sent.outbox_id) == (
        "support-ack",
        "sent",
        BOB,
        told.decisions[0].outbox_id,
    )
    assert sent.sent_at is not None and told.drafts == []
    (suppressed,) = robot_told.decisions
    assert (suppressed.outcome, suppressed.reason) == ("suppressed", "auto-submitted: auto-generated")
    assert robot_told.replies == []
