"""The console's Rules page in-process on SQLite and PostgreSQL: the running rules with their
matches; an edit with an error refused at its line (nothing saved), a good one checked against
the running file, saved and running at once, an earlier version restored, each audited; a rule
set tried on an indexed message with nothing sent or recorded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from emailops.audit import list_entries
from emailops.rules import load_rules
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.database import reading
from prod.console.guard import MAX_BODY_BYTES
from tests.console_helpers import BASE, Console, MovingClock, add_users, console_settings
from tests.index_helpers import index_engine, message, rows
from tests.test_store import NOW, fetched

pytestmark = pytest.mark.timeout(240)
ACCOUNT = "bob@example.test@127.0.0.1"
ACK = '[[rules]]\nname = "ack"\n[rules.match]\nsubject = "subject"\n[rules.reply]\ntemplate = "Got it"\n'
BAD = ACK + '\n[[rules]]\nname = "bad"\n[rules.match]\nsubject = "x"\n[rules.reply]\ntemplate = "Hi"\n'
BAD += 'once_per_sender_days = "often"\n'  # line 14
THANKS = (
    ACK + '\n[[rules]]\nname = "thanks"\n[rules.match]\nsubject = "thanks"\n[rules.reply]\ntemplate = "Ok"\n'
)


@pytest.fixture
def console(tmp_path: Path, db_url: str) -> Console:
    engine: Engine = index_engine(db_url)
    add_users(engine)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(ACK, encoding="utf-8")
    return Console(console_settings(tmp_path, db_url, rules_file=rules_file), engine, MovingClock())


def _post(client: TestClient, path: str, csrf: str, **form: str) -> Any:
    return client.post(path, data={"csrf_token": csrf, **form}, headers={"Origin": BASE})


def test_an_admin_edit_is_refused_at_its_line_then_saved_running_and_restored(console: Console) -> None:
    rules_file = console.settings.rules_file
    viewer, _ = console.session("vic")
    page = viewer.get("/rules").text
    assert '<tr id="rule-1"><td>1</td><td>ack</td>' in page and "<textarea" not in page
    admin, csrf = console.session("ann")
    assert "<textarea" in admin.get("/rules").text

    refused = _post(admin, "/rules/check", csrf, text=BAD)
    assert refused.status_code == 422
    assert re.search(r'id="problem-line-14">.*line 14: .*once_per_sender_days', refused.text)
    not_saved = _post(admin, "/rules/save", csrf, text=BAD)
    assert not_saved.status_code == 422 and "Not saved" in not_saved.text
    assert rules_file.read_text(encoding="utf-8") == ACK
    assert rows(console.engine, "SELECT count(*) FROM rules_versions") == [(0,)]

    checked = _post(admin, "/rules/check", csrf, text=THANKS)
    assert checked.status_code == 200 and "+name = &#34;thanks&#34;" in checked.text
    assert rules_file.read_text(encoding="utf-8") == ACK  # a check saves nothing
    saved = _post(admin, "/rules/save", csrf, text=THANKS)
    assert saved.status_code == 200 and "the daemon runs it from its next message" in saved.text
    assert [rule.name for rule in load_rules(rules_file).rules] == ["ack", "thanks"]
    assert "<td>2</td><td>thanks</td>" in viewer.get("/rules").text
    versions = viewer.get("/api/v1/rules").json()["versions"]
    assert [v["author"] for v in versions] == ["ann", "(edited in the file)"]

    restored = _post(admin, f"/rules/versions/{versions[1]['id']}/restore", csrf)
    assert restored.status_code == 200 and "running now" in restored.text
    assert rules_file.read_text(encoding="utf-8") == ACK
    with reading(console.engine) as conn:
        assert [e.actor for e in list_entries(conn, actions=["rules.edit"])] == ["ann", "ann"]


def test_an_operator_tries_the_rules_on_an_indexed_message_and_nothing_is_recorded(console: Console) -> None:
    with console.engine.begin() as conn:
        folder = folder_store.ensure_folder(conn, ACCOUNT, "INBOX")
        pk = message_store.insert_messages(conn, folder.id, 1, [fetched(1)], baseline_uidnext=1, now=NOW)[1]
    operator, csrf = console.session("otto")
    page = _post(operator, "/rules/test", csrf, message=str(pk))
    assert page.status_code == 200, page.text
    assert "rule ack: matches; reply (send)" in page.text and "decision: would reply" in page.text
    answer = operator.post(
        "/api/v1/rules/test", data={"message": str(pk)}, headers={"Origin": BASE, "X-CSRF-Token": csrf}
    )
    assert [(o["rule"], o["verdict"]) for o in answer.json()["outcomes"]] == [("ack", "would reply")]
    assert "Got it" in answer.json()["outcomes"][0]["reply"]
    missing = operator.post(
        "/api/v1/rules/test", data={"message": "999999"}, headers={"Origin": BASE, "X-CSRF-Token": csrf}
    )
    assert missing.status_code == 404
    assert rows(console.engine, "SELECT count(*) FROM outbox") == [(0,)]
    assert rows(console.engine, "SELECT count(*) FROM rule_decisions") == [(0,)]
    assert _post(operator, "/rules/save", csrf, text=ACK).status_code == 403

    headers = {"Origin": BASE, "X-CSRF-Token": csrf}
    uploaded = operator.post(
        "/rules/test",
        files={"eml": ("m.eml", message(3, subject="a subject"))},
        data={"folder": "INBOX"},
        headers=headers,
    )
    assert uploaded.status_code == 200 and "decision: would reply" in uploaded.text
    too_large = b"Subject: big\r\n\r\n" + b"x" * MAX_BODY_BYTES
    refused = operator.post("/api/v1/rules/test", files={"eml": ("big.eml", too_large)}, headers=headers)
    assert refused.status_code == 413 and "larger than 10 MB" in refused.json()["error"]
    assert rows(console.engine, "SELECT count(*) FROM outbox") == [(0,)]
