"""One message as the server holds it, byte for byte (the operator's download of a message the
index does not keep whole, such as a quarantined one)."""

from __future__ import annotations

from imapclient import IMAPClient


def download_raw(client: IMAPClient, folder: str, uidvalidity: int, uid: int) -> bytes | None:
    """The raw message ``uid`` of ``folder`` (read-only: no flag changes), or None when it is no
    longer there or the folder's UIDVALIDITY is not ``uidvalidity`` any more (another message)."""
    selected = client.select_folder(folder, readonly=True)
    if int(selected[b"UIDVALIDITY"]) != uidvalidity:
        return None
    data = client.fetch([uid], ["BODY.PEEK[]"]).get(uid)
    body = data.get(b"BODY[]") if data else None
    return bytes(body) if body is not None else None
