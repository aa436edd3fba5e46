"""Search and Message (viewer and up): the index searched in the language of ``emailops search``,
and one message with its headers, text, sanitized HTML (in a sandboxed frame), attachments and
processing story (``emailops.story``); operators run its rules again (``rerun_rules``).

The index keeps no message whole: the HTML body and the attachments are read from the raw
message, from the raw message cache or else fetched from IMAP (BODY.PEEK, read-only) when the
page, its frame or a download asks. Each searches or shows the account ``account=`` names
(``prod.console.mailbox``); a message of another account is not found.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from zoneinfo import ZoneInfo

from starlette.responses import Response

from emailops.actions.messages import rerun_rules
from emailops.mime.display import DisplayParts, display_parts
from emailops.mime.safe_html import FRAME_CSP, IFRAME_SANDBOX, SafeHtml, sanitize_html
from emailops.rules import RulesError, load_rules
from emailops.rules.model import RuleSet
from emailops.search.query import HELP, Account, Node, QueryError, parse
from emailops.search.results import Hit, Snippet
from emailops.search.service import SearchOptions, Sort, search
from emailops.store.database import reading
from emailops.store.messages import StoredMessage, load_message
from emailops.story import MessageStory, message_story
from emailops.users.permissions import Action
from prod.console.calls import Call, ConsoleRoute
from prod.console.mailbox import AccountChoice, acting_choice, page_choice
from prod.console.pages.actor import actor_of
from prod.console.pages.raw_mail import stored_raw

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


# --- Search ---------------------------------------------------------------------------------


def _marked(snippet: Snippet) -> list[tuple[str, bool]]:
    """The snippet as (text, marked) pieces: only the offsets the search gave are marked."""
    pieces, at = [], 0
    for start, end in snippet.marks:
        pieces += [(snippet.text[at:start], False), (snippet.text[start:end], True)]
        at = end
    pieces.append((snippet.text[at:], False))
    return [piece for piece in pieces if piece[0]]


def _number(call: Call, name: str, default: int, most: int) -> int:
    text = call.request.query_params.get(name, "")
    if not text:
        return default
    if not text.isdigit() or int(text) > most:
        raise QueryError(0, f"{name}: a whole number from 0 to {most}, not {text!r}")
    return int(text)


def _search(call: Call, choice: AccountChoice) -> tuple[dict[str, Any], str | None]:
    """The search the query string asks for in the chosen account, and its error (one line, with
    its position)."""
    params = call.request.query_params
    q = params.get("q", "").strip()
    sort_text = params.get("sort") or Sort.NEWEST.value
    asked: dict[str, Any] = {"q": q, "sort": sort_text, "limit": PAGE_SIZE, "offset": 0, "hits": []}
    try:
        if sort_text not in {s.value for s in Sort}:
            raise QueryError(0, f"sort: newest, oldest or relevance, not {sort_text!r}")
        asked["limit"] = _number(call, "limit", PAGE_SIZE, MAX_PAGE_SIZE) or PAGE_SIZE
        asked["offset"] = _number(call, "offset", 0, 10**9)
        # No query: every message of the account, newest first.
        node: Node = parse(q) if q else Account(choice.key)
    except QueryError as error:
        message = str(error) if error.position else str(error).split(": ", 1)[1]
        return asked, message
    settings = call.context.settings
    options = SearchOptions(
        sort=Sort(sort_text),
        limit=asked["limit"] + 1,  # one more: is there a next page?
        offset=asked["offset"],
        timezone=ZoneInfo(settings.search_timezone),
        account_names=_account_names(choice),
    )
    with reading(call.context.engine) as conn:
        hits = search(conn, choice.key, node, options)
    asked["more"] = len(hits) > asked["limit"]
    asked["hits"] = hits[: asked["limit"]]
    return asked, None


def _hit(call: Call, choice: AccountChoice, hit: Hit) -> dict[str, object]:
    return {
        "id": hit.message_pk,
        "url": call.url(f"/messages/{hit.message_pk}?{choice.query()}"),
        "folder": hit.folder,
        "uid": hit.uid,
        "message_id": hit.message_id,
        "sender": hit.sender,
        "subject": hit.subject,
        "date": hit.date,
        "snippet": hit.snippet.text,
        "marks": [list(mark) for mark in hit.snippet.marks],
    }


def search_page(call: Call) -> Response:
    choice = page_choice(call)
    if isinstance(choice, Response):
        return choice
    asked, error = _search(call, choice)
    return call.render(
        "messages.html",
        400 if error else 200,
        choice=choice,
        asked=asked,
        error=error,
        help=HELP,
        sorts=[s.value for s in Sort],
        hits=[(hit, _marked(hit.snippet)) for hit in asked["hits"]],
    )


def search_api(call: Call) -> Response:
    choice = page_choice(call)
    if isinstance(choice, Response):
        return choice
    asked, error = _search(call, choice)
    answer: dict[str, object] = {"id": "messages", "url": call.url(f"/messages?{choice.query()}")}
    answer |= {key: asked[key] for key in ("q", "sort", "limit", "offset")} | {"account": choice.value}
    if error:
        return call.json(answer | {"error": error}, 400)
    hits = [_hit(call, choice, hit) for hit in asked["hits"]]
    return call.json(answer | {"more": asked["more"], "messages": hits})


# --- One message ----------------------------------------------------------------------------


def _rules(call: Call) -> tuple[RuleSet, str | None]:
    try:
        return load_rules(call.context.settings.rules_file), None
    except RulesError as error:
        return RuleSet(), f"the rules did not load, so no match is shown: {error}"


# A message found: the chosen account, the message, its story, why its rule matches are missing.
Found = tuple[AccountChoice, StoredMessage, MessageStory, str | None]


def _stored(call: Call, chosen: AccountChoice | None = None) -> Found | Response:
    """The indexed message of the account ``chosen`` (default: the query's), its story, and why
    its rule matches are missing (None: shown); 404 for a message of no account or of another."""
    choice = page_choice(call) if chosen is None else chosen
    if isinstance(choice, Response):
        return choice
    pk = int(call.request.path_params["id"])
    rules, rules_problem = _rules(call)
    with reading(call.context.engine) as conn:
        story = message_story(conn, pk, account=choice.key, rules=rules)
        stored = load_message(conn, pk) if story is not None else None
    if story is None or stored is None:
        return Response(f"no indexed message {pk} of {choice.value}", 404, media_type="text/plain")
    return choice, stored, story, rules_problem


def _parts(call: Call, choice: AccountChoice, stored: StoredMessage) -> DisplayParts | Response:
    raw = stored_raw(call, choice.account, stored)
    return raw if isinstance(raw, Response) else display_parts(raw)


def _safe_html(choice: AccountChoice, pk: int, parts: DisplayParts) -> SafeHtml | None:
    if parts.html is None:
        return None
    by_cid = {part.content_id: n for n, part in enumerate(parts.attachments) if part.content_id}

    def cid_url(content_id: str) -> str | None:
        n = by_cid.get(content_id)
        return None if n is None else f"/messages/{pk}/attachments/{n}?{choice.query()}"

    return sanitize_html(parts.html, cid_url=cid_url)


def _headers(stored: StoredMessage) -> dict[str, str]:
    parsed = stored.parsed
    return {
        "From": ", ".join(str(a) for a in parsed.from_),
        "To": ", ".join(str(a) for a in parsed.to),
        "Cc": ", ".join(str(a) for a in parsed.cc),
        "Subject": parsed.subject,
        "Date": parsed.date.isoformat() if parsed.date else "",
        "Message-ID": parsed.message_id or "",
        "Folder": stored.folder,
    }


def _message(call: Call, chosen: AccountChoice | None = None) -> dict[str, Any] | Response:
    found = _stored(call, chosen)
    if isinstance(found, Response):
        return found
    choice, stored, story, rules_problem = found
    parts = _parts(call, choice, stored)
    safe = _safe_html(choice, stored.pk, parts) if isinstance(parts, DisplayParts) else None
    base = f"/messages/{stored.pk}"
    query = f"?{choice.query()}"
    attachments = [
        {
            "id": n,
            "url": call.url(f"{base}/attachments/{n}{query}"),
            "filename": part.filename,
            "content_type": part.content_type,
            "size": len(part.data),
        }
        for n, part in enumerate(parts.attachments if isinstance(parts, DisplayParts) else ())
    ]
    return {
        "id": stored.pk,
        "url": call.url(base + query),
        "account": choice.value,
        "headers": _headers(stored),
        "text": stored.parsed.body_text,
        "html_url": call.url(f"{base}/html{query}") if safe is not None else None,
        "remote_images_blocked": safe.remote_blocked if safe is not None else 0,
        "raw_problem": bytes(parts.body).decode() if isinstance(parts, Response) else None,
        "attachments": attachments,
        "story": asdict(story),
        "rules_problem": rules_problem,
        "choice": choice,  # for the page, not the JSON
    }


def message_page(
    call: Call, status_code: int = 200, notice: str | None = None, chosen: AccountChoice | None = None
) -> Response:
    found = _message(call, chosen)
    if isinstance(found, Response):
        return found
    return call.render(
        "message.html", status_code, message=found, sandbox=IFRAME_SANDBOX, notice=notice,
        error=notice if status_code >= 400 else None, choice=found["choice"],
    )  # fmt: skip


def message_api(call: Call) -> Response:
    found = _message(call)
    if isinstance(found, Response):
        return found
    return call.json({key: value for key, value in found.items() if key != "choice"})


def message_html(call: Call) -> Response:
    """The sanitized HTML body, for the page's sandboxed frame, under FRAME_CSP."""
    found = _stored(call)
    if isinstance(found, Response):
        return found
    choice, stored = found[0], found[1]
    parts = _parts(call, choice, stored)
    if isinstance(parts, Response):
        return parts
    safe = _safe_html(choice, stored.pk, parts)
    if safe is None:
        return Response("the message has no HTML body", 404, media_type="text/plain")
    page = f'<!doctype html><meta charset="utf-8">{safe.html}'
    headers = {"Content-Security-Policy": FRAME_CSP, "X-Frame-Options": "SAMEORIGIN"}
    return Response(page, media_type="text/html", headers=headers)


def attachment_download(call: Call) -> Response:
    """One attachment as the message holds it: always a download, never shown by the browser."""
    found = _stored(call)
    if isinstance(found, Response):
        return found
    parts = _parts(call, found[0], found[1])
    if isinstance(parts, Response):
        return parts
    n = int(call.request.path_params["n"])
    if n >= len(parts.attachments):
        return Response(f"no attachment {n}", 404, media_type="text/plain")
    part = parts.attachments[n]
    headers = {"Content-Disposition": f'attachment; filename="{part.safe_filename}"'}
    return Response(part.data, media_type="application/octet-stream", headers=headers)


# --- Re-run rules ---------------------------------------------------------------------------


def _rerun(call: Call) -> tuple[int, str, int, AccountChoice] | Response:
    """Run again the rules of the message of the path, of the account the form (or JSON body)
    names: (id, what, status, that account), or the 404 answer for an unknown account."""
    pk = int(call.request.path_params["id"])
    acting = acting_choice(call)
    if isinstance(acting, Response):
        return acting
    change = rerun_rules(call.context.engine, pk, account=acting.key, actor=actor_of(call))
    if not change.done:
        status = 409 if change.before else 404
        return pk, f"Rules of message {pk} not run again: {change.refusal}.", status, acting
    return pk, f"Rules of message {pk} of {acting.value}: pending, they run again shortly.", 200, acting


def rerun_form(call: Call) -> Response:
    rerun = _rerun(call)
    if isinstance(rerun, Response):
        return rerun
    _, notice, status, acting = rerun
    if status == 404:
        return Response(notice, 404, media_type="text/plain")
    return message_page(call, status, notice, acting)  # the message's page, of its own account


def rerun_api(call: Call) -> Response:
    rerun = _rerun(call)
    if isinstance(rerun, Response):
        return rerun
    pk, notice, status, _ = rerun
    answer = "done" if status == 200 else "error"
    return call.json({"id": pk, "url": call.url(f"/messages/{pk}"), answer: notice}, status)


_ONE = "/messages/{id:int}"
ROUTES = [
    ConsoleRoute("/messages", search_page, Action.VIEW_MESSAGES, nav="Search"),
    ConsoleRoute("/api/v1/messages", search_api, Action.VIEW_MESSAGES),
    ConsoleRoute(_ONE, message_page, Action.VIEW_MESSAGES),
    ConsoleRoute(f"/api/v1{_ONE}", message_api, Action.VIEW_MESSAGES),
    ConsoleRoute(f"{_ONE}/html", message_html, Action.VIEW_MESSAGES),
    ConsoleRoute(f"{_ONE}/attachments/{{n:int}}", attachment_download, Action.VIEW_MESSAGES),
    ConsoleRoute(f"{_ONE}/rerun-rules", rerun_form, Action.RERUN_RULES, methods=("POST",)),
    ConsoleRoute(f"/api/v1{_ONE}/rerun-rules", rerun_api, Action.RERUN_RULES, methods=("POST",)),
]


def _account_names(choice: AccountChoice) -> frozenset[str]:
    """What ``account:`` may name: the chosen account's name or its key."""
    account = choice.account
    return frozenset() if account is None else frozenset({account.name, account.index_key})
