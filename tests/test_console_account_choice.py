"""The console with several mail accounts, on SQLite and PostgreSQL: the EMAIL_* one (named
bob@example.test) and the index's ``help`` (and more for the Overview). Every per-account page shows
the account ``account=NAME`` chooses (default: EMAIL_*'s), its links keep the choice, an unknown
name is a 404 that shows no account's data, and an action acts on its row's own account, never
on the one the page shows, and the audit log names it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from emailops.accounts.fields import AccountDefaults, accounts_from_file
from emailops.accounts.store import import_accounts
from emailops.audit import list_entries
from emailops.auth.crypto import SecretCipher, new_key
from emailops.llm import jobs
from emailops.replies import outbox
from emailops.store.database import reading
from emailops.store.schema import folders, messages, rule_decisions
from tests.console_helpers import (
    BASE,
    BOB_KEY,
    CLI,
    Console,
    MovingClock,
    add_failed_model_job,
    add_unknown_reply_and_quarantined_message,
    add_users,
    console_settings,
)
from tests.index_helpers import index_engine, rows

pytestmark = pytest.mark.timeout(240)
BOB = "bob@example.test"  # the EMAIL_* account's name (its username)
HELP_KEY = "carol@example.test@127.0.0.1"
RULES = '[[rules]]\nname = "ack"\n[rules.actions]\nflag = true\n'


def mailbox(name: str, username: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "username": username,
        "password": f"pw-of-{name}",
        "imap_host": "127.0.0.1",
        "imap_port": 1143,
        "smtp_host": "127.0.0.1",
        "smtp_port": 1025,
        **more,
    }


def add_accounts(engine: Engine, key: str, *boxes: dict[str, Any]) -> None:
    configs = accounts_from_file({"accounts": list(boxes)}, AccountDefaults(), {})
    import_accounts(engine, configs, SecretCipher([key]), actor=CLI)


@pytest.fixture
def console(tmp_path: Path, db_url: str) -> Console:
    """bob (EMAIL_*) and help (the index), each with an unknown reply, a message its rules
    quarantined (in its INBOX) and a failed model job."""
    engine = index_engine(db_url)
    add_users(engine)
    key = new_key()
    add_accounts(engine, key, mailbox("help", "carol@example.test"))
    settings = console_settings(tmp_path, db_url, secrets_key=key)
    settings.rules_file.write_text(RULES, encoding="utf-8")
    return Console(settings, engine, MovingClock())


def both(engine: Engine) -> dict[str, dict[str, int]]:
    """Each account's reply, quarantined message and model job."""
    made = {}
    for key in (BOB_KEY, HELP_KEY):
        reply, pk = add_unknown_reply_and_quarantined_message(engine, key)
        made[key] = {"reply": reply, "message": pk, "job": add_failed_model_job(engine, key)}
    return made


def test_each_page_shows_the_chosen_account_and_its_links_keep_it(console: Console) -> None:
    made = both(console.engine)
    bob, theirs = made[BOB_KEY], made[HELP_KEY]
    with console.engine.begin() as conn:
        conn.execute(
            rule_decisions.insert().values(
                account=HELP_KEY,
                message_pk=theirs["message"],
                rule_name="ack",
                outcome="matched",
                decided_at=console.clock(),
            )
        )
    viewer, _ = console.session("vic")

    def ids(path: str, key: str, **params: str) -> list[tuple[object, object]]:
        answer = viewer.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return [(item["id"], item.get("account")) for item in answer.json()[key]]

    # Without account=: the EMAIL_* account, as before.
    assert ids("/api/v1/outbox", "replies") == [(bob["reply"], BOB)]
    assert ids("/api/v1/outbox", "replies", account="help") == [(theirs["reply"], "help")]
    assert ids("/api/v1/outbox", "replies", account="*") == [(theirs["reply"], "help"), (bob["reply"], BOB)]
    assert ids("/api/v1/quarantine", "messages", account="help") == [(f"rules-{theirs['message']}", "help")]
    assert ids("/api/v1/quarantine", "messages", account="*") == [
        (f"rules-{bob['message']}", BOB),
        (f"rules-{theirs['message']}", "help"),
    ]
    assert ids("/api/v1/drafts", "drafts") == [(bob["job"], BOB)]
    assert ids("/api/v1/drafts", "drafts", account="*") == [(theirs["job"], "help"), (bob["job"], BOB)]
    assert [
        m["id"] for m in viewer.get("/api/v1/messages", params={"account": "help"}).json()["messages"]
    ] == [theirs["message"]]
    found = viewer.get("/api/v1/messages", params={"account": BOB, "q": "subject:7"}).json()
    assert [m["id"] for m in found["messages"]] == [bob["message"]] and found["account"] == BOB
    rules = {name: viewer.get("/api/v1/rules", params={"account": name}).json() for name in (BOB, "help")}
    assert [r["matches_7_days"] for r in rules["help"]["rules"]] == [1]
    assert [r["matches_7_days"] for r in rules[BOB]["rules"]] == [0]
    assert rules["help"]["url"] == f"{BASE}/rules?account=help"

    # The page: a labelled chooser with the choice selected, and every link keeps it.
    page = viewer.get("/outbox", params={"account": "help"}).text
    assert '<label for="account-choice">Account</label>' in page
    assert '<select id="account-choice" name="account">' in page
    assert '<option value="help" selected>help (carol@example.test)</option>' in page
    assert f'<option value="{BOB}">' in page and '<option value="*">All accounts</option>' in page
    assert '<a href="/quarantine?account=help">Quarantine</a>' in page  # the navigation
    assert '<a href="/drafts?account=help">Drafts</a>' in page
    assert 'href="/outbox?account=help&amp;state=unknown"' in page  # the filters
    assert f'id="reply-{theirs["reply"]}"' in page and f'id="reply-{bob["reply"]}"' not in page
    assert '<th scope="col">Account</th>' not in page  # one account: no column
    every = viewer.get("/outbox", params={"account": "*"}).text
    assert '<option value="*" selected>All accounts</option>' in every
    # Every account is for the lists: the navigation keeps it to them only.
    assert '<a href="/drafts?account=%2A">Drafts</a>' in every and '<a href="/messages">Search</a>' in every
    assert '<th scope="col">Account</th>' in every and f"<td>help</td><td>{theirs['reply']}</td>" in every
    search = viewer.get("/messages", params={"account": "help"}).text
    assert f'<a href="/messages/{theirs["message"]}?account=help">' in search
    assert '<option value="help" selected>' in search
    quarantine = viewer.get("/quarantine", params={"account": "help"}).text
    assert f'href="/quarantine/rules/{theirs["message"]}/raw?account=help"' in quarantine
    message = viewer.get(f"/api/v1/messages/{theirs['message']}", params={"account": "help"}).json()
    assert message["url"] == f"{BASE}/messages/{theirs['message']}?account=help"
    assert message["account"] == "help"


def test_an_unknown_account_is_a_404_that_shows_no_account_s_mail(console: Console) -> None:
    made = both(console.engine)
    viewer, _ = console.session("vic")
    for path in ("/messages", "/outbox", "/quarantine", "/drafts", "/rules"):
        page = viewer.get(path, params={"account": "nobody"})
        assert page.status_code == 404, path
        assert "There is no mail account named <strong>nobody</strong>" in page.text
        assert f'<a href="{path}?account=help">help</a>' in page.text  # the accounts there are
        assert "Re: question" not in page.text and "carol@example.org" not in page.text
    for path in (
        "/api/v1/messages",
        "/api/v1/outbox",
        "/api/v1/quarantine",
        "/api/v1/drafts",
        "/api/v1/rules",
    ):
        answer = viewer.get(path, params={"account": "nobody"})
        assert (answer.status_code, answer.json()) == (404, {"error": "no mail account named 'nobody'"}), path
    # Every account at once is for the lists only; a message of another account is not found.
    assert viewer.get("/messages", params={"account": "*"}).status_code == 404
    theirs = made[HELP_KEY]["message"]
    assert viewer.get(f"/api/v1/messages/{theirs}", params={"account": BOB}).status_code == 404
    assert viewer.get(f"/messages/{theirs}/html", params={"account": BOB}).status_code == 404
    assert viewer.get(f"/quarantine/rules/{theirs}/raw", params={"account": BOB}).status_code == 404


def _audit(console: Console, action: str) -> list[tuple[str, str | None]]:
    with reading(console.engine) as conn:
        return [(e.actor, e.target) for e in list_entries(conn, actions=[action])]


def test_an_action_acts_on_its_row_s_account_never_the_shown_one_and_is_audited(console: Console) -> None:
    made = both(console.engine)
    bob, theirs = made[BOB_KEY], made[HELP_KEY]
    operator, csrf = console.session("otto")
    origin = {"Origin": BASE}
    shown = f"?account={BOB}"  # the page shows bob's outbox; help's row is acted on

    # A form that names the shown account for help's row finds no such row, and changes nothing.
    wrong = operator.post(
        f"/outbox/{theirs['reply']}/resolve{shown}",
        data={"csrf_token": csrf, "as": "sent", "account": BOB},
        headers=origin,
    )
    assert wrong.status_code == 404 and f"no such reply of {BOB_KEY}" in wrong.text
    unknown = operator.post(
        f"/outbox/{theirs['reply']}/resolve",
        data={"csrf_token": csrf, "as": "sent", "account": "x"},
        headers=origin,
    )
    assert unknown.status_code == 404 and "There is no mail account named" in unknown.text
    with reading(console.engine) as conn:
        assert [outbox.get_reply(conn, made[k]["reply"]).state for k in made] == ["unknown", "unknown"]  # type: ignore[union-attr]
    assert _audit(console, "outbox.resolve") == []

    # The row's own account, as its form names it: help's reply resolved, bob's left; the page
    # shown again is still bob's.
    done = operator.post(
        f"/outbox/{theirs['reply']}/resolve{shown}",
        data={"csrf_token": csrf, "as": "sent", "account": "help"},
        headers=origin,
    )
    assert done.status_code == 200, done.text
    assert f"Reply {theirs['reply']} of help resolved as sent: now sent." in done.text
    assert f'<option value="{BOB}" selected>' in done.text and f'id="reply-{bob["reply"]}"' in done.text
    # The chooser goes to the page, not to the action's address.
    assert '<form method="get" action="/outbox" class="filters account-choice">' in done.text
    with reading(console.engine) as conn:
        assert [outbox.get_reply(conn, made[k]["reply"]).state for k in made] == ["unknown", "sent"]  # type: ignore[union-attr]
    assert _audit(console, "outbox.resolve") == [("otto", f"{HELP_KEY}/outbox:{theirs['reply']}")]

    released = operator.post(
        f"/quarantine/rules/{theirs['message']}/release{shown}",
        data={"csrf_token": csrf, "account": "help"},
        headers=origin,
    )
    assert released.status_code == 200 and f"rules-{theirs['message']} of help: released" in released.text
    assert _states(console.engine) == {bob["message"]: "quarantined", theirs["message"]: "done"}
    assert _audit(console, "quarantine.release") == [
        ("otto", f"{HELP_KEY}/quarantine.rules:{theirs['message']}")
    ]

    retried = operator.post(
        f"/drafts/{theirs['job']}/retry{shown}", data={"csrf_token": csrf, "account": "help"}, headers=origin
    )
    assert retried.status_code == 200 and f"Model job {theirs['job']} of help: retry done" in retried.text
    with reading(console.engine) as conn:
        assert [jobs.get_job(conn, made[k]["job"]).state for k in made] == ["failed", "pending"]  # type: ignore[union-attr]
    assert _audit(console, "drafts.retry") == [("otto", f"{HELP_KEY}/llm_job:{theirs['job']}")]

    rerun = operator.post(
        f"/messages/{theirs['message']}/rerun-rules{shown}",
        data={"csrf_token": csrf, "account": "help"},
        headers=origin,
    )
    assert rerun.status_code == 200 and f"Rules of message {theirs['message']} of help: pending" in rerun.text
    assert _states(console.engine) == {bob["message"]: "quarantined", theirs["message"]: "pending"}
    assert _audit(console, "messages.rerun_rules") == [("otto", f"{HELP_KEY}/message:{theirs['message']}")]

    fetched = operator.post(
        "/folders/fetch", data={"csrf_token": csrf, "account": "help", "folder": "INBOX"}, headers=origin
    )
    assert fetched.status_code == 200 and "Fetch of INBOX of help asked" in fetched.text
    with reading(console.engine) as conn:
        asked = dict(conn.execute(select(folders.c.account, folders.c.fetch_requested_at)).all())
    assert asked[BOB_KEY] is None and asked[HELP_KEY] is not None
    assert _audit(console, "accounts.fetch_now") == [("otto", f"{HELP_KEY}/INBOX")]

    # The JSON API takes the account in its body or its query, the same way.
    with console.engine.begin() as conn:
        conn.execute(update(messages).values(rules_state="quarantined"))
    headers = origin | {"X-CSRF-Token": csrf}
    by_body = operator.post(
        f"/api/v1/quarantine/rules/{theirs['message']}/retry", json={"account": "help"}, headers=headers
    )
    assert by_body.status_code == 200, by_body.text
    by_query = operator.post(
        f"/api/v1/outbox/{bob['reply']}/resolve?account={BOB}", json={"as": "cancel"}, headers=headers
    )
    assert by_query.status_code == 200 and by_query.json()["done"].endswith("now cancelled.")
    assert _states(console.engine) == {bob["message"]: "quarantined", theirs["message"]: "pending"}


def _states(engine: Engine) -> dict[int, str]:
    return dict(rows(engine, "SELECT id, rules_state FROM messages"))  # type: ignore[arg-type]


def test_the_overview_lists_every_account_of_the_deployment(tmp_path: Path, db_url: str) -> None:
    engine = index_engine(db_url)
    add_users(engine)
    key = new_key()
    add_accounts(
        engine,
        key,
        mailbox("help", "carol@example.test"),
        mailbox("new", "dave@example.test"),  # nothing synced yet
        mailbox("old", "erin@example.test", enabled=False),
    )
    both(engine)
    console = Console(console_settings(tmp_path, db_url, secrets_key=key), engine, MovingClock())
    viewer, _ = console.session("vic")
    page = viewer.get("/").text
    listed = re.findall(r'<tr id="account-([^"]+)"><td>[^<]+</td><td>([^<]+)</td><td>([^<]+)</td>', page)
    assert listed == [
        (BOB, BOB, "ok"),
        ("help", "carol@example.test", "ok"),
        ("new", "dave@example.test", "ok"),
        ("old", "erin@example.test", "disabled"),
    ]
    assert '<a href="/messages?account=new">Search new</a>' in page
    assert f'id="folder-{HELP_KEY}/INBOX"><td>help</td>' in page
    # The counts are of every account: their links show every account.
    assert 'href="/outbox?account=%2A&amp;state=unknown"' in page
    assert re.search(r'id="count-outbox-unknown">2<', page)
    accounts = viewer.get("/api/v1/accounts").json()["accounts"]
    assert [(a["id"], a["key"], a["enabled"], [f["folder"] for f in a["folders"]]) for a in accounts] == [
        (BOB, BOB_KEY, True, ["INBOX"]),
        ("help", HELP_KEY, True, ["INBOX"]),
        ("new", "dave@example.test@127.0.0.1", True, []),
        ("old", "erin@example.test@127.0.0.1", False, []),
    ]
