"""The console's Search and Message pages on both index backends, on mail delivered to Dovecot:
hostile subjects and names escaped, a query's parse error shown as one line, an attachment
downloaded as is (never shown by the browser), the story and the audited re-run of the rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from emailops.audit import list_entries
from emailops.cache import RawMessageCache
from emailops.imap.connection import connect
from emailops.imap.sync import FolderSync
from emailops.mime.safe_html import FRAME_CSP
from emailops.store.database import reading
from emailops.store.schema import messages
from localmail.dovecot import LocalDovecot
from tests.console_helpers import BASE, alice_console
from tests.index_helpers import ACCOUNT, ALICE, imap_config, message, rows, sync_config

pytestmark = pytest.mark.timeout(240)

HOSTILE_SUBJECT = "Invoice <script>alert(3)</script> due"
HOSTILE_NAME = "<img src=x onerror=alert(4)>"
ATTACHMENT = b"<html><script>alert(5)</script></html>"


def hostile_message(pixel_url: str) -> bytes:
    """Multipart mail whose HTML runs scripts and fetches a remote image, with an HTML attachment."""
    html = (
        "<p>Hello <b>operator</b>, sanitized text here.</p><script>alert(1)</script>"
        f'<img src=x onerror=alert(2)><img src="{pixel_url}" width="1" height="1">'
    )
    return (
        f'From: "{HOSTILE_NAME}" <mallory@example.org>\r\n'
        f"To: {ALICE}\r\nCc: carol@example.org\r\n"
        f"Subject: {HOSTILE_SUBJECT}\r\n"
        "Message-ID: <hostile-1@example.org>\r\nDate: Wed, 3 Jan 2024 10:00:00 +0000\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        '--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
        "--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello operator, plain text here.\r\n"
        f"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--inner--\r\n"
        "--outer\r\nContent-Type: text/html\r\n"
        'Content-Disposition: attachment; filename="../evil\\"name.html"\r\n\r\n'
        f"{ATTACHMENT.decode()}\r\n--outer--\r\n"
    ).encode()


def deliver_and_index(engine: Engine, dovecot: LocalDovecot, raw: bytes) -> int:
    """``raw`` delivered to alice's INBOX after a first sync (so it is new mail), indexed: its row id."""
    dovecot.deliver(ALICE, message(0))
    sync = FolderSync(engine, sync_config(), "INBOX")
    sync.sync(connect(imap_config(dovecot)))  # the first sync: message 0 is there before
    dovecot.deliver(ALICE, raw)
    sync.sync(connect(imap_config(dovecot)))
    ((pk,),) = rows(engine, "SELECT id FROM messages WHERE uid = 2")
    return int(str(pk))


def test_search_escapes_hostile_fields_marks_words_and_explains_a_parse_error(
    tmp_path: Path, db_url: str, dovecot: LocalDovecot
) -> None:
    console = alice_console(tmp_path, db_url, dovecot)
    pk = deliver_and_index(console.engine, dovecot, hostile_message("http://127.0.0.1:9/pixel.gif"))
    viewer, _ = console.session("vic")

    page = viewer.get("/messages", params={"q": "subject:invoice"})
    assert page.status_code == 200, page.text
    link = f'<a href="/messages/{pk}?account=alice%40example.test">'
    assert link + "Invoice &lt;script&gt;alert(3)&lt;/script&gt; due</a>" in page.text
    assert "&lt;img src=x onerror=alert(4)&gt;" in page.text
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert "note 0" not in page.text  # only the match

    page = viewer.get("/messages", params={"q": "plain"})
    assert "<mark>plain</mark>" in page.text and page.text.count("<mark>") == 1

    answer = viewer.get("/api/v1/messages", params={"q": "subject:invoice"}).json()
    assert [(m["id"], m["subject"], m["url"]) for m in answer["messages"]] == [
        (pk, HOSTILE_SUBJECT, f"{BASE}/messages/{pk}?account=alice%40example.test")
    ]
    everything = viewer.get("/api/v1/messages", params={"limit": "1"}).json()
    assert [m["id"] for m in everything["messages"]] == [pk] and everything["more"] is True
    older = viewer.get("/api/v1/messages", params={"limit": "1", "offset": "1"}).json()
    assert [m["subject"] for m in older["messages"]] == ["note 0"] and older["more"] is False

    page = viewer.get("/messages", params={"q": 'subject:"unclosed'})
    assert page.status_code == 400
    (error,) = [line for line in page.text.splitlines() if 'role="alert"' in line]
    assert "at character 9" in error and "Traceback" not in page.text
    answer = viewer.get("/api/v1/messages", params={"q": "invoice (", "sort": "relevance"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("at character ")
    assert viewer.get("/api/v1/messages", params={"sort": "oldest-first"}).status_code == 400


def test_a_message_shows_its_parts_safely_its_story_and_its_rules_run_again_audited(
    tmp_path: Path, db_url: str, dovecot: LocalDovecot
) -> None:
    console = alice_console(tmp_path, db_url, dovecot)
    pk = deliver_and_index(console.engine, dovecot, hostile_message("http://127.0.0.1:9/pixel.gif"))
    viewer, _ = console.session("vic")

    page = viewer.get(f"/messages/{pk}")
    assert page.status_code == 200, page.text
    text = page.text
    assert "Invoice &lt;script&gt;alert(3)&lt;/script&gt; due" in text and "<script>alert" not in text
    assert "carol@example.org" in text and "&lt;hostile-1@example.org&gt;" in text
    assert "Hello operator, plain text here." in text
    assert "2 remote images blocked" in text  # src=x and the pixel
    frame_src = f'src="/messages/{pk}/html?account=alice%40example.test"'
    assert f'{frame_src} sandbox="allow-popups allow-popups-to-escape-sandbox"' in text
    assert "Re-run rules" not in text  # a viewer does not act on mail

    frame = viewer.get(f"/messages/{pk}/html")
    assert frame.headers["content-security-policy"] == FRAME_CSP
    assert frame.headers["x-frame-options"] == "SAMEORIGIN"
    assert "sanitized text here" in frame.text
    assert "<script" not in frame.text and "onerror" not in frame.text and "127.0.0.1:9" not in frame.text

    download = viewer.get(f"/messages/{pk}/attachments/0")
    assert download.status_code == 200 and download.content.rstrip() == ATTACHMENT
    assert download.headers["content-disposition"] == 'attachment; filename="_evil_name.html"'
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["x-content-type-options"] == "nosniff"
    assert viewer.get(f"/messages/{pk}/attachments/1").status_code == 404

    data = viewer.get(f"/api/v1/messages/{pk}").json()
    assert (
        data["url"] == f"{BASE}/messages/{pk}?account=alice%40example.test"
        and data["remote_images_blocked"] == 2
    )
    assert [a["filename"] for a in data["attachments"]] == ['../evil"name.html']
    story = data["story"]
    assert story["rules_state"] == "pending" and len(story["request_id"]) == 16
    assert story["request_id"] in text

    operator, csrf = console.session("otto")
    form = {"data": {"csrf_token": csrf}, "headers": {"Origin": BASE}}
    refused = operator.post(f"/messages/{pk}/rerun-rules", **form)
    assert refused.status_code == 409 and "its rules are pending" in refused.text
    with console.engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == pk).values(rules_state="done"))
    done = operator.post(f"/messages/{pk}/rerun-rules", **form)
    assert done.status_code == 200 and f"Rules of message {pk} of alice@example.test: pending" in done.text
    assert "Re-run rules" in done.text
    with reading(console.engine) as conn:
        entries = list_entries(conn, actions=["messages.rerun_rules"])
    assert [(e.actor, e.target) for e in entries] == [("otto", f"{ACCOUNT}/message:{pk}")]
    assert viewer.get("/messages/999999").status_code == 404


def test_a_message_the_sync_cached_is_read_from_the_cache_and_one_it_did_not_from_the_server(
    tmp_path: Path, db_url: str, dovecot: LocalDovecot
) -> None:
    console = alice_console(tmp_path, db_url, dovecot)
    dovecot.deliver(ALICE, message(0))
    FolderSync(console.engine, sync_config(), "INBOX").sync(connect(imap_config(dovecot)))  # no cache
    dovecot.deliver(ALICE, hostile_message("http://127.0.0.1:9/pixel.gif"))
    # As the daemon's sync does, into the console's CACHE_DIR.
    cache = RawMessageCache(console.settings.cache_dir, console.settings.cache_max_bytes)
    FolderSync(console.engine, sync_config(), "INBOX", cache=cache).sync(connect(imap_config(dovecot)))
    (first,), (second,) = rows(console.engine, "SELECT id FROM messages ORDER BY uid")
    client = connect(imap_config(dovecot))
    client.select_folder("INBOX")
    client.delete_messages([1, 2])
    client.expunge()
    client.logout()
    viewer, _ = console.session("vic")

    frame = viewer.get(f"/messages/{second}/html")  # gone from the server, still in the cache
    assert frame.status_code == 200 and "sanitized text here" in frame.text
    assert viewer.get(f"/messages/{second}/attachments/0").content.rstrip() == ATTACHMENT
    gone = viewer.get(f"/api/v1/messages/{first}").json()  # not cached: the server's answer
    assert gone["raw_problem"] == "the message is no longer on the server"
