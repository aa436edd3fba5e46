"""The console's Outbox and Quarantine on both index backends: an operator resolves an unknown
reply and releases a quarantined message, by form and by the JSON API; a viewer may not; each
change is in the audit log with the operator and their address."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from emailops.audit import list_entries
from emailops.imap.connection import connect
from emailops.imap.sync import FolderSync
from emailops.replies import outbox
from emailops.store.database import reading
from emailops.store.schema import messages
from emailops.users import accounts
from localmail.dovecot import LocalDovecot
from tests.console_helpers import (
    BASE,
    BOB_KEY,
    CLI,
    Console,
    MovingClock,
    add_unknown_reply_and_quarantined_message,
    add_users,
    alice_console,
    console_settings,
)
from tests.index_helpers import ALICE, imap_config, index_engine, message, rows, sync_config

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def console(tmp_path: Path, db_url: str) -> Console:
    engine: Engine = index_engine(db_url)
    add_users(engine)
    return Console(console_settings(tmp_path, db_url), engine, MovingClock())


def test_an_operator_resolves_a_reply_and_releases_a_message_audited(console: Console) -> None:
    reply_id, pk = add_unknown_reply_and_quarantined_message(console.engine)
    viewer, viewer_csrf = console.session("vic")
    listed = viewer.get("/api/v1/outbox").json()["replies"]
    assert [(r["id"], r["state"], r["resolutions"]) for r in listed] == [
        (reply_id, "unknown", ["sent", "resend", "cancel"])
    ]
    assert "Mark sent reply" not in viewer.get("/outbox").text
    headers = {"Origin": BASE, "X-CSRF-Token": viewer_csrf}
    assert (
        viewer.post(f"/api/v1/outbox/{reply_id}/resolve", json={"as": "sent"}, headers=headers).status_code
        == 403
    )

    operator, csrf = console.session("otto", source="203.0.113.5")
    assert f"Mark sent reply {reply_id}" in operator.get("/outbox").text
    headers = {"Origin": BASE, "X-CSRF-Token": csrf}
    assert (
        operator.post(f"/api/v1/outbox/{reply_id}/resolve", json={"as": "later"}, headers=headers).status_code
        == 400
    )
    done = operator.post(f"/api/v1/outbox/{reply_id}/resolve", json={"as": "sent"}, headers=headers)
    assert done.status_code == 200, done.text
    assert done.json() == {
        "id": reply_id,
        "url": f"{BASE}/outbox#reply-{reply_id}",
        "done": f"Reply {reply_id} of bob@example.test resolved as sent: now sent.",
    }
    again = operator.post(f"/api/v1/outbox/{reply_id}/resolve", json={"as": "resend"}, headers=headers)
    assert (
        again.status_code == 409
        and "it is sent; resend applies to failed or unknown replies" in again.json()["error"]
    )
    missing = operator.post("/api/v1/outbox/999999/resolve", json={"as": "cancel"}, headers=headers)
    assert missing.status_code == 404
    with reading(console.engine) as conn:
        reply = outbox.get_reply(conn, reply_id)
    assert reply is not None and reply.state == "sent"

    assert "Release INBOX 7" in operator.get("/quarantine").text
    page = operator.post(
        f"/quarantine/rules/{pk}/release", data={"csrf_token": csrf}, headers={"Origin": BASE}
    )
    released = f"Message rules-{pk} of bob@example.test: released (done, not answered)."
    assert page.status_code == 200 and released in page.text
    assert operator.get("/api/v1/quarantine").json()["messages"] == []
    assert rows(console.engine, f"SELECT rules_state FROM messages WHERE id = {int(pk)}") == [("done",)]  # noqa: S608

    token = accounts.issue_api_token(console.engine, "otto", actor=CLI)
    by_token = console.client().post(
        f"/api/v1/quarantine/rules/{pk}/retry", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert by_token.status_code == 409 and "its rules are done, not quarantined" in by_token.json()["error"]

    with reading(console.engine) as conn:
        entries = list_entries(conn, actions=["outbox.resolve", "quarantine.release"])
    assert [(e.actor, e.role, e.source, e.action, e.target) for e in reversed(entries)] == [
        ("otto", "operator", "203.0.113.5", "outbox.resolve", f"{BOB_KEY}/outbox:{reply_id}"),
        ("otto", "operator", "203.0.113.5", "quarantine.release", f"{BOB_KEY}/quarantine.rules:{pk}"),
    ]


def test_a_quarantined_message_is_downloaded_as_the_server_holds_it(
    tmp_path: Path, db_url: str, dovecot: LocalDovecot
) -> None:
    console = alice_console(tmp_path, db_url, dovecot)
    engine = console.engine
    original = message(1, subject="makes the rules fail")
    dovecot.deliver(ALICE, message(0))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(connect(imap_config(dovecot)))  # the first sync: message 0 is there before
    dovecot.deliver(ALICE, original)
    sync.sync(connect(imap_config(dovecot)))
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.uid == 2).values(rules_state="quarantined"))
    ((pk,),) = rows(engine, "SELECT id FROM messages WHERE uid = 2")
    viewer, _ = console.session("vic")
    assert f'href="/quarantine/rules/{pk}/raw?account=alice%40example.test"' in viewer.get("/quarantine").text
    answer = viewer.get(f"/quarantine/rules/{pk}/raw")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "message/rfc822"
    assert answer.headers["content-disposition"] == f'attachment; filename="quarantined-rules-{pk}.eml"'
    assert answer.content.replace(b"\r\n", b"\n").rstrip().endswith(original.replace(b"\r\n", b"\n").rstrip())
    assert viewer.get(f"/quarantine/index/{pk}/raw").status_code == 404  # no such index-stage entry
    with dovecot.imap(ALICE) as other:
        other.select_folder("INBOX")
        other.delete_messages([2])
        other.expunge()
    assert viewer.get(f"/quarantine/rules/{pk}/raw").status_code == 410
