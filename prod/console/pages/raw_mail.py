"""A message as the IMAP server holds it, fetched for a console page (the index keeps none whole)."""

from __future__ import annotations

from starlette.responses import Response

from emailops.accounts.config import AccountConfig
from emailops.imap.raw_message import download_raw
from prod.console.calls import Call


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
