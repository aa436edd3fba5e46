"""The operator's "re-run rules" and "fetch now" against a real IMAP server and SMTP relay, and
the log of the rules' decisions (statistics, purge) on both index backends."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from emailops.actions.messages import request_fetch, rerun_rules
from emailops.audit import Actor, list_entries
from emailops.pipeline import MailPipeline
from emailops.processes import ProcessIdentity
from emailops.replies import decision_log, history
from emailops.replies.decisions import Decision
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from tests.index_helpers import ACCOUNT, ALICE, imap_config, index_engine, message, rows, sync_config
from tests.test_replies_e2e import BOB, RULES, Daemon, inbound, mailbox_of
from tests.test_store import NOW, fetched

OPERATOR = Actor("olga", "operator", "192.0.2.7")


def test_rules_run_again_never_reply_twice(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, db_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    daemon = Daemon(dovecot, smtp_relay, db_url, rules_file)
    try:
        daemon.run_until(daemon.watching)
        dovecot.deliver(ALICE, inbound("I need help"))
        daemon.run_until(lambda: daemon.outbox() == [("support-ack", "sent", BOB, None)])
        (pk,) = [r[0] for r in rows(daemon.engine, "SELECT id FROM messages")]
        # The mailbox keyword that marks the message answered is lost (another client cleared it):
        # only the index's record of the reply stands between the re-run and a second reply.
        with dovecot.imap(ALICE) as other:
            other.select_folder("INBOX")
            daemon.run_until(lambda: bool(other.get_flags(other.search("ALL")).get(1)))
            other.remove_flags(other.search("ALL"), ["$AutoReplied"])
        daemon.run_until(lambda: "$AutoReplied" not in str(rows(daemon.engine, "SELECT flags FROM messages")))

        change = rerun_rules(daemon.engine, pk, account=ACCOUNT, actor=OPERATOR)
        assert change.done and change.before is not None and change.before["state"] == "done"

        def decided() -> list[str]:
            with daemon.engine.connect() as conn:
                return [d.outcome for d in decision_log.for_message(conn, pk)]

        daemon.run_until(lambda: len(decided()) == 2)  # the re-run decided
        daemon.settle(1.0)
        assert decided() == ["replied", "recorded_before"]
        assert daemon.outbox() == [("support-ack", "sent", BOB, None)]
        assert len(smtp_relay.accepted) == 1 and len(mailbox_of(dovecot, BOB)) == 1
        with daemon.engine.connect() as conn:
            (entry,) = list_entries(conn)
        assert (entry.action, entry.target, entry.after["state"]) == (
            "messages.rerun_rules",
            f"{ACCOUNT}/message:{pk}",
            "pending",
        )
        refused = rerun_rules(daemon.engine, pk + 1000, account=ACCOUNT, actor=OPERATOR)
        assert refused.refusal == f"no indexed message of {ACCOUNT} with this id"
    finally:
        daemon.close()


def test_fetch_now_syncs_a_polled_folder_within_seconds(dovecot: LocalDovecot, db_url: str) -> None:
    engine = index_engine(db_url)
    pipeline = MailPipeline(
        engine,
        imap_config(dovecot),
        sync_config(use_idle=False, poll_interval_seconds=3600),
        owner=str(ProcessIdentity.of_this_process(1, run="fetch-now")),
        step_seconds=0.1,
    )
    try:
        deadline = time.monotonic() + 15
        while not any(w.last_sync_at for w in pipeline.watchers.values()):  # the first pass is done
            assert time.monotonic() < deadline
            pipeline.run_once()
        dovecot.deliver(ALICE, message(1))
        for _ in range(10):
            pipeline.run_once()
        assert rows(engine, "SELECT count(*) FROM messages") == [(0,)]  # the next poll is an hour away

        assert request_fetch(engine, "INBOX", account=ACCOUNT, actor=OPERATOR)
        assert not request_fetch(engine, "Nowhere", account=ACCOUNT, actor=OPERATOR)
        asked = time.monotonic()
        while rows(engine, "SELECT count(*) FROM messages") != [(1,)]:
            assert time.monotonic() - asked < 10, "not fetched"
            pipeline.run_once()
        assert rows(engine, "SELECT fetch_requested_at FROM folders") == [(None,)]
        with engine.connect() as conn:
            (entry,) = list_entries(conn)
        assert (entry.action, entry.target) == ("accounts.fetch_now", f"{ACCOUNT}/INBOX")
    finally:
        pipeline.close()
        engine.dispose()


def test_decisions_are_counted_per_rule_and_purged_with_the_history(db_url: str) -> None:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        pks = message_store.insert_messages(
            conn, folder.id, 1, [fetched(1), fetched(2)], baseline_uidnext=1, now=NOW
        )
        made = [
            Decision("ack", "send", outbox_id=None, created=True),
            Decision("ack", "send", suppressed="per-sender limit: replied 2 days ago"),
            Decision("tag", None),
            Decision("ack", "send", dry_run=True),
        ]
        decision_log.record(
            conn, account=ACCOUNT, message_pk=pks[1], made=made[:1], now=NOW - timedelta(days=9)
        )
        decision_log.record(
            conn, account=ACCOUNT, message_pk=pks[2], made=made[1:], now=NOW - timedelta(hours=1)
        )
    with engine.connect() as conn:
        stats = decision_log.rules_stats(conn, ACCOUNT, ["ack", "tag", "unused"], now=NOW)
        assert [(s.rule, s.matches, s.last_match) for s in stats] == [
            ("ack", 1, NOW - timedelta(hours=1)),  # the match of 9 days ago is outside the 7 days
            ("tag", 1, NOW - timedelta(hours=1)),
            ("unused", 0, None),
        ]
        assert [(d.rule, d.outcome, d.reason) for d in decision_log.for_message(conn, pks[2])] == [
            ("ack", "suppressed", "per-sender limit: replied 2 days ago"),
            ("tag", "matched", None),
        ]
    with engine.begin() as conn:
        assert history.purge_batch(conn, older_than=NOW - timedelta(days=7), now=NOW) == 1
    assert rows(engine, "SELECT rule_name FROM rule_decisions ORDER BY id") == [("ack",), ("tag",)]
    with engine.begin() as conn:
        assert history.purge_batch(conn, older_than=NOW - timedelta(days=7), now=NOW) == 0
    engine.dispose()
