"""The mail account the console's pages show and act on: the EMAIL_* account, else the first
enabled account of the index (one account at a time; none: the pages show an empty index)."""

from __future__ import annotations

from emailops.accounts.config import AccountConfig
from emailops.accounts.store import list_accounts
from emailops.config import ServerConfig
from emailops.store.database import reading
from prod.console.calls import Call


def shown_account(call: Call) -> AccountConfig | None:
    """The account, its secrets left out."""
    settings = call.context.settings
    if settings.has_default_account:
        return settings.default_account()
    with reading(call.context.engine) as conn:
        enabled = [account for account in list_accounts(conn) if account.enabled]
    return enabled[0] if enabled else None


def shown_account_key(call: Call) -> str:
    """The account's key in the index tables ("" when there is none: nothing matches it)."""
    account = shown_account(call)
    return "" if account is None else account.index_key


def shown_account_imap(call: Call) -> ServerConfig:
    """How to sign in to the account's IMAP server (its secrets read with SECRETS_KEY);
    ``CommandError`` when there is no account or its secrets cannot be read."""
    from prod.cli_accounts import choose_account
    from prod.cli_common import CommandError
    from prod.oauth2_tokens import account_token_source

    settings, engine = call.context.settings, call.context.engine
    account = shown_account(call)
    if account is None:
        raise CommandError("no mail account: add one with `emailops accounts add`", code=78)
    account = choose_account(settings, engine, account.name, secrets=True)
    deployment = settings.deployment()
    return account.imap_config(deployment, account_token_source(account, deployment, engine))
