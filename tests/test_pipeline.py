"""Work sharing: N pipelines on one database watch each folder once and index each message once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from emailops.pipeline import LEASE_TTL, MailPipeline
from prod.localmail.dovecot import LocalDovecot
from tests.index_helpers import ALICE, imap_config, index_engine, message, rows, sync_config


def test_two_workers_share_folders_without_double_fetching(dovecot: LocalDovecot, db_url: str) -> None:
    dovecot.create_folder(ALICE, "Archive")
    for n in range(1, 11):
        dovecot.append(ALICE, "INBOX", message(n))
        dovecot.append(ALICE, "Archive", message(100 + n))
    engine = index_engine(db_url)
    config = sync_config(folders=("INBOX", "Archive"), poll_interval_seconds=300)
    first = MailPipeline(engine, imap_config(dovecot), config, owner="host:w1", workers=2, step_seconds=0.2)
    second = MailPipeline(engine, imap_config(dovecot), config, owner="host:w2", workers=2, step_seconds=0.2)
    for _ in range(10):
        first.run_once()
        second.run_once()
    assert len(first.watchers) == 1 and len(second.watchers) == 1
    assert set(first.watchers) | set(second.watchers) == {"INBOX", "Archive"}
    dovecot.deliver(ALICE, message(50))
    for _ in range(10):
        first.run_once()
        second.run_once()
    assert rows(engine, "SELECT count(*), count(DISTINCT message_id) FROM messages") == [(21, 21)]

    # The other worker stops and is not replaced: its folder is taken over once nobody has
    # watched it for two lease periods, not before.
    first.close()
    second.next_lease_check = 0
    second.run_once()
    assert len(second.watchers) == 1
    second.clock = lambda: datetime.now(UTC) + 2 * LEASE_TTL + timedelta(seconds=5)
    second.next_lease_check = 0
    second.run_once()
    assert set(second.watchers) == {"INBOX", "Archive"}
    second.close()
