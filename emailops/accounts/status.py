"""What ``accounts list`` shows of each account, from what the index holds about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from emailops.accounts.config import AccountConfig
from emailops.store.messages import folder_counts
from emailops.store.schema import account_state as account_state_table
from emailops.store.schema import folders, oauth2_tokens


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


def _state(account: AccountConfig, row: Any) -> tuple[str, str | None]:
    """The account's state as the operator sees it (``ok``, ``backoff``, ``auth_failed`` or
    ``disabled``) and the last error its watchers reported (emailops.store.account_state), from
    its row of ``account_state`` (None: no row)."""
    if not account.enabled:
        return "disabled", None if row is None else row.last_error
    if row is None:
        return "ok", None
    return row.state, row.last_error if row.state != "ok" else None


def account_statuses(conn: Connection, accounts: Sequence[AccountConfig]) -> list[AccountStatus]:
    """Each account's messages indexed (not expunged), newest successful folder sync, and the last
    error the index recorded (the watchers' sign-in or connection, else the OAuth2 token requests),
    in full; in three queries however many accounts there are (the overview reads them every few
    seconds)."""
    keys = [account.index_key for account in accounts]
    if not keys:
        return []
    total, expunged = folder_counts()
    counted: dict[str, tuple[int, datetime | None]] = {}
    for account, in_all, gone, last_sync in conn.execute(
        select(folders.c.account, total, expunged, folders.c.last_sync_at).where(folders.c.account.in_(keys))
    ):
        before, newest = counted.get(account, (0, None))
        if newest is None or (last_sync is not None and last_sync > newest):
            newest = last_sync
        counted[account] = (before + int(in_all) - int(gone), newest)
    states = {
        row.account: row
        for row in conn.execute(
            select(
                account_state_table.c.account, account_state_table.c.state, account_state_table.c.last_error
            ).where(account_state_table.c.account.in_(keys))
        )
    }
    tokens = oauth2_tokens.c
    token_errors = {
        account: error
        for account, error in conn.execute(
            select(tokens.account, tokens.last_error).where(tokens.account.in_(keys))
        )
    }
    found = []
    for account in accounts:
        key = account.index_key
        messages_count, last_sync = counted.get(key, (0, None))
        state, sync_error = _state(account, states.get(key))
        found.append(
            AccountStatus(
                name=account.name,
                username=account.username,
                enabled=account.enabled,
                state=state,
                folders=account.folders,
                messages=messages_count,
                last_sync=last_sync,
                last_error=sync_error or token_errors.get(key),
            )
        )
    return found
