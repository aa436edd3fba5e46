"""What ``accounts list`` shows of each account, from what the index holds about it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, func, select

from emailops.accounts.config import AccountConfig
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


def account_state(conn: Connection, account: AccountConfig) -> str:
    """The account's state as the operator sees it: ``ok`` or ``disabled``."""
    del conn  # the state kept in the index will be read here
    return "ok" if account.enabled else "disabled"


def account_status(conn: Connection, account: AccountConfig) -> AccountStatus:
    """Messages indexed (not expunged), the newest successful folder sync, and the last sign-in
    error the index recorded (OAuth2 token requests), in full."""
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
    last_error = conn.execute(
        select(oauth2_tokens.c.last_error).where(oauth2_tokens.c.account == key)
    ).scalar_one_or_none()
    return AccountStatus(
        name=account.name,
        username=account.username,
        enabled=account.enabled,
        state=account_state(conn, account),
        folders=account.folders,
        messages=int(messages_count or 0),
        last_sync=last_sync,
        last_error=last_error,
    )
