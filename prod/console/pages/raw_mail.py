"""A message as the IMAP server holds it, for a console page (the index keeps none whole): from
the raw message cache when the sync left it there, else fetched from the server."""

from __future__ import annotations

from starlette.responses import Response

from emailops.accounts.config import AccountConfig
from emailops.cache import RawMessageCache
from emailops.imap.raw_message import download_raw
from emailops.store.messages import StoredMessage
from prod.console.calls import Call


def stored_raw(call: Call, account: AccountConfig | None, stored: StoredMessage) -> bytes | Response:
    """The raw message of an indexed message of ``account``: the cached copy (a folder,
    UIDVALIDITY and UID name one message for ever, so a copy never goes stale) or else
    ``fetch_raw``'s answer. A new IMAP session per page took 0.3-0.8 s in a folder of 94,000
    messages (bench/README.md "Console")."""
    settings = call.context.settings
    cache = RawMessageCache(settings.cache_dir, settings.cache_max_bytes)
    if account is not None:
        cached = cache.get_one(
            account.index_key, stored.folder, stored.uidvalidity, stored.uid, stored.parsed.size
        )
        if cached is not None:
            return cached
    return fetch_raw(call, account, stored.folder, stored.uidvalidity, stored.uid)


def fetch_raw(
    call: Call, account: AccountConfig | None, folder: str, uidvalidity: int, uid: int
) -> bytes | Response:
    """The raw message of ``account`` (read-only, BODY.PEEK), or the answer to give instead: 410
    when it is gone from the server, 502 when the server failed."""
    from emailops.imap.connection import connect, logout_quietly
    from emailops.imap.errors import CONNECTION_ERRORS, ImapError
    from prod.cli_common import CommandError
    from prod.console.mailbox import account_imap

    try:
        server = account_imap(call, account)
    except CommandError as exc:
        return Response(f"the mail account cannot be reached: {exc}", 503, media_type="text/plain")
    try:
        client = connect(server)
        try:
            raw = download_raw(client, folder, uidvalidity, uid)
        finally:
            logout_quietly(client)
    except (ImapError, *CONNECTION_ERRORS) as exc:
        return Response(f"the IMAP server did not give the message: {exc}", 502, media_type="text/plain")
    if raw is None:
        return Response("the message is no longer on the server", 410, media_type="text/plain")
    return raw
