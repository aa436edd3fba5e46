"""What ``accounts list`` shows of each account, from what the index holds about it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, func, select

from emailops.accounts.config import AccountConfig
from emailops.store.schema import account_state as account_state_table
from emailops.store.schema import folders, messages, oauth2_tokens


@dataclass(frozen=True)
class AccountStatus:
    name: str
    username: str
    enabled: bool
    state: str
    folders: tuple[str, ...]
    messages: int
    last_sync: datetime | None
    last_error: str | None


def account_state(conn: Connection, account: AccountConfig) -> tuple[str, str | None]:
    """The account's state as the operator sees it (``ok``, ``backoff``, ``auth_failed`` or
    ``disabled``) and the last error its watchers reported (emailops.store.account_state)."""
    row = conn.execute(
        select(account_state_table.c.state, account_state_table.c.last_error).where(
            account_state_table.c.account == account.index_key
        )
    ).one_or_none()
    if not account.enabled:
        return "disabled", None if row is None else row.last_error
    if row is None:
        return "ok", None
    return row.state, row.last_error if row.state != "ok" else None


def account_status(conn: Connection, account: AccountConfig) -> AccountStatus:
    """Messages indexed (not expunged), the newest successful folder sync, and the last error the
    index recorded (the watchers' sign-in or connection, else the OAuth2 token requests), in full."""
    key = account.index_key
    messages_count, last_sync = conn.execute(
        select(func.count(messages.c.id), func.max(folders.c.last_sync_at))
        .select_from(folders)
        .outerjoin(
            messages,
            and_(
                messages.c.folder_id == folders.c.id,
                messages.c.uidvalidity == folders.c.uidvalidity,
                messages.c.expunged_at.is_(None),
            ),
        )
        .where(folders.c.account == key)
    ).one()
    state, sync_error = account_state(conn, account)
    last_error = (
        sync_error
        or conn.execute(
            select(oauth2_tokens.c.last_error).where(oauth2_tokens.c.account == key)
        ).scalar_one_or_none()
    )
    return AccountStatus(
        name=account.name,
        username=account.username,
        enabled=account.enabled,
        state=state,
        folders=account.folders,
        messages=int(messages_count or 0),
        last_sync=last_sync,
        last_error=last_error,
    )
