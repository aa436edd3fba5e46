"""The accounts whose sign-in the server refuses (``account_state`` auth_failed), for the banner
every console page shows: one query of the state table, and the accounts' names only when one is
refused."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select

from emailops.store.account_state import State
from emailops.store.database import reading
from emailops.store.schema import account_state
from prod.runtime_settings import RuntimeSettings


@dataclass(frozen=True)
class RefusedAccount:
    name: str  # the account's name (its Accounts page), or its index key when it is not configured
    last_error: str | None


def refused_accounts(settings: RuntimeSettings, engine: Engine) -> list[RefusedAccount]:
    from prod.cli_accounts import deployment_accounts
    from prod.cli_common import CommandError

    with reading(engine) as conn:
        rows = conn.execute(
            select(account_state.c.account, account_state.c.last_error)
            .where(account_state.c.state == State.AUTH_FAILED.value)
            .order_by(account_state.c.account)
        ).all()
        if not rows:
            return []
        try:
            configured = {account.index_key: account for account in deployment_accounts(settings, conn)}
        except CommandError:  # two definitions of one name: the accounts page says so
            configured = {}
    found = []
    for row in rows:
        account = configured.get(row.account)
        if account is not None and not account.enabled:
            continue  # nobody signs in to a disabled account
        found.append(RefusedAccount(account.name if account else row.account, row.last_error))
    return found
