"""The console's Overview (folders, counts, the 24-hour chart, Fetch now, the event stream) and
Drafts (model jobs retried and cancelled) in-process, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from emailops.audit import list_entries
from emailops.store.database import reading
from emailops.store.folders import ensure_folder, save_sync_state
from emailops.store.messages import insert_messages
from emailops.users.sessions import end_session, start_session
from tests.console_helpers import (
    BASE,
    Console,
    MovingClock,
    add_failed_model_job,
    add_unknown_reply_and_quarantined_message,
    add_users,
    console_settings,
)
from tests.index_helpers import index_engine
from tests.test_console_browser import served  # noqa: F401 (fixture)
from tests.test_store import fetched

pytestmark = pytest.mark.timeout(240)
ACCOUNT = "bob@example.test@127.0.0.1"


@pytest.fixture
def console(tmp_path: Path, db_url: str) -> Console:
    engine: Engine = index_engine(db_url)
    add_users(engine)
    return Console(console_settings(tmp_path, db_url), engine, MovingClock())


def test_the_overview_shows_folders_counts_and_the_last_day_and_an_operator_fetches_now(
    console: Console,
) -> None:
    add_unknown_reply_and_quarantined_message(console.engine)
    add_failed_model_job(console.engine)
    with console.engine.begin() as conn:
        archive = ensure_folder(conn, ACCOUNT, "Archive")
        save_sync_state(conn, archive.id, uidvalidity=1, uidnext=3, highestmodseq=None, now=console.clock())
        insert_messages(
            conn, archive.id, 1, [fetched(1), fetched(2)], baseline_uidnext=1, now=console.clock()
        )
    viewer, _ = console.session("vic")
    page = viewer.get("/").text
    assert re.search(r'id="count-outbox-unknown">1<', page) and re.search(r'id="count-quarantined">1<', page)
    assert re.search(r'id="count-drafts-failed">1<', page)
    assert "<svg" in page and 'aria-describedby="last-day-table"' in page and "<rect" in page
    # The hour under way (09:00) counts the two messages indexed now (not the INBOX one: days ago).
    assert re.search(r'<tr id="hour-09"><td>2026-05-01 09:00</td><td class="number">2</td>', page)
    assert "Fetch Archive of bob@example.test now" not in page  # a viewer may not
    api = viewer.get("/api/v1/overview").json()
    assert [(f["folder"], f["messages"]) for f in api["folders"]] == [("Archive", 2), ("INBOX", 0)]
    assert api["hours"][-1]["indexed"] == 2 and api["drafts_failed"] == 1
    accounts = viewer.get("/api/v1/accounts").json()["accounts"]
    assert [(a["id"], a["key"], a["state"], [f["folder"] for f in a["folders"]]) for a in accounts] == [
        ("bob@example.test", ACCOUNT, "ok", ["Archive", "INBOX"])
    ]

    operator, csrf = console.session("otto")
    assert "Fetch Archive of bob@example.test now" in operator.get("/").text
    done = operator.post(
        "/folders/fetch", data={"folder": "Archive", "csrf_token": csrf}, headers={"Origin": BASE}
    )
    assert done.status_code == 200 and "Fetch of Archive of bob@example.test asked" in done.text
    assert "asked at" in done.text
    missing = operator.post(
        "/folders/fetch", data={"folder": "Nope", "csrf_token": csrf}, headers={"Origin": BASE}
    )
    assert missing.status_code == 404
    with reading(console.engine) as conn:
        entries = [(e.actor, e.action, e.target) for e in list_entries(conn, actions=["accounts.fetch_now"])]
    assert entries == [("otto", "accounts.fetch_now", f"{ACCOUNT}/Archive")]


def test_the_event_stream_carries_the_live_part_and_refuses_an_ended_session(console: Console) -> None:
    client, _ = console.session("vic")
    first = client.get("/events")
    assert first.headers["content-type"].startswith("text/event-stream")
    assert first.text.startswith("event: overview\ndata: ") and first.text.endswith("\n\n")
    assert re.search(r'id="count-quarantined">0<', first.text)
    add_unknown_reply_and_quarantined_message(console.engine)
    assert re.search(r'id="count-quarantined">1<', client.get("/events").text)
    end_session(console.engine, client.cookies["emailops_session"])
    assert client.get("/events").status_code == 303  # to the sign-in page


def test_an_operator_retries_and_cancels_model_jobs_each_audited(console: Console) -> None:
    job_id = add_failed_model_job(console.engine)
    viewer, _ = console.session("vic")
    listed = viewer.get("/api/v1/drafts").json()["drafts"]
    assert [(d["id"], d["state"], d["rule"], d["model"], d["reason"], d["changes"]) for d in listed] == [
        (job_id, "failed", "ai-answer", "tiny-model", "HTTP 400: bad", ["retry", "cancel"])
    ]
    assert f"Retry job {job_id}" not in viewer.get("/drafts").text
    operator, csrf = console.session("otto")
    page = operator.get("/drafts").text
    assert f"Retry job {job_id}" in page and f'hx-confirm="Retry model job {job_id}' in page
    retried = operator.post(f"/drafts/{job_id}/retry", data={"csrf_token": csrf}, headers={"Origin": BASE})
    assert retried.status_code == 200
    assert f"Model job {job_id} of bob@example.test: retry done, now pending." in retried.text
    again = operator.post(f"/api/v1/drafts/{job_id}/retry", headers={"Origin": BASE, "X-CSRF-Token": csrf})
    assert again.status_code == 409 and "retry applies to failed jobs" in again.json()["error"]
    cancelled = operator.post(
        f"/api/v1/drafts/{job_id}/cancel", headers={"Origin": BASE, "X-CSRF-Token": csrf}
    )
    assert cancelled.json()["done"] == f"Model job {job_id} of bob@example.test: cancel done, now cancelled."
    with reading(console.engine) as conn:
        entries = [(e.actor, e.action) for e in list_entries(conn, actions=["drafts.retry", "drafts.cancel"])]
    assert sorted(entries) == [("otto", "drafts.cancel"), ("otto", "drafts.retry")]


def test_an_open_event_stream_sends_changes_and_ends_at_sign_out(served: tuple[str, Console]) -> None:  # noqa: F811
    base, console = served
    session_id, _ = start_session(console.engine, "vic", "127.0.0.1", console.clock())
    events: list[str] = []
    with httpx.stream(
        "GET",
        base + "/events",
        headers={"Accept": "text/event-stream"},
        cookies={"emailops_session": session_id},
        timeout=30,
    ) as stream:
        for line in stream.iter_lines():
            if 'id="count-quarantined"' in line:
                events.append(line)
                if len(events) == 1:
                    add_unknown_reply_and_quarantined_message(console.engine)
                else:
                    end_session(console.engine, session_id)  # the stream ends within a poll
    assert [re.findall(r'id="count-quarantined">(\d+)<', e) for e in events] == [["0"], ["1"]]
