"""Which mail account a console page shows, and which one an action acts on.

The deployment's accounts are the EMAIL_* one and the index's (``deployment_accounts``, as the
command line reads them). A page is asked for one with the query parameter ``account=NAME``, which
its links keep (bookmarkable); a list page may be asked for every account (``account=*``). Without
it a page shows the EMAIL_* account, else the first enabled one of the index. A name that is no
account is a 404, never another account's data. An action names the account of its row (form or
JSON field ``account``, else the query's), so it never acts on the shown account by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.responses import Response

from emailops.accounts.config import AccountConfig
from emailops.config import ServerConfig
from emailops.store.database import reading
from prod.console.calls import Call

ACCOUNT_PARAM = "account"
# Every account at once (no account is named so: names are letters, digits and . _ @ + -).
ALL = "*"
# The pages shown for one account: their links in the navigation keep the choice; those of
# EVERY_PAGES (lists) keep "every account" too.
ACCOUNT_PAGES = frozenset({"/messages", "/outbox", "/quarantine", "/drafts", "/rules"})
EVERY_PAGES = frozenset({"/outbox", "/quarantine", "/drafts"})


@dataclass(frozen=True)
class AccountChoice:
    """The deployment's accounts (for the chooser) and the one shown: ``account`` None with
    ``every`` for all of them, None without ``every`` when there is no account at all."""

    accounts: tuple[AccountConfig, ...]
    account: AccountConfig | None
    every: bool = False
    # Whether the page offers "All accounts" (a list), for the chooser.
    every_offered: bool = False

    @property
    def key(self) -> str:
        """The shown account's key in the index tables ("" for none: nothing matches it)."""
        return "" if self.account is None else self.account.index_key

    @property
    def keys(self) -> tuple[str, ...]:
        """The index keys of the accounts shown: every account's, or the chosen one's."""
        if self.every:
            return tuple(account.index_key for account in self.accounts)
        return () if self.account is None else (self.account.index_key,)

    @property
    def value(self) -> str:
        """What ``account=`` says for this choice ("" when there is no account)."""
        if self.every:
            return ALL
        return "" if self.account is None else self.account.name

    def name_of(self, index_key: str) -> str:
        """The name of the account whose rows carry ``index_key`` (the key itself if none)."""
        return next((a.name for a in self.accounts if a.index_key == index_key), index_key)

    def query(self, **more: str) -> str:
        """A query string that keeps the choice, with ``more`` parameters (empty ones left out)."""
        values = {ACCOUNT_PARAM: self.value, **more}
        return urlencode({key: value for key, value in values.items() if value})

    def link(self, path: str) -> str:
        """``path`` keeping the choice when it is a page shown per account (every account: when
        it is a list; other pages then show their default account)."""
        query = self.query()
        keeps = path in (EVERY_PAGES if self.every else ACCOUNT_PAGES)
        return f"{path}?{query}" if keeps and query else path


class UnknownAccountError(LookupError):
    """The request names an account the deployment does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def deployment_accounts_of(call: Call) -> tuple[AccountConfig, ...]:
    """Every account, the EMAIL_* one first, then the index's by name (secrets left out)."""
    from prod.cli_accounts import deployment_accounts

    with reading(call.context.engine) as conn:
        return tuple(deployment_accounts(call.context.settings, conn))


def default_account(call: Call, accounts: tuple[AccountConfig, ...]) -> AccountConfig | None:
    """The account a page shows when none is asked for: EMAIL_*'s, else the first enabled one."""
    if call.context.settings.has_default_account:
        return accounts[0]
    return next((account for account in accounts if account.enabled), None)


def choose(call: Call, name: str | None, *, every_offered: bool = False) -> AccountChoice:
    """The account ``name`` names (``ALL``: every one, where ``every_offered``), else the default;
    ``UnknownAccountError`` for a name that is no account."""
    accounts = deployment_accounts_of(call)
    if not name:
        return AccountChoice(accounts, default_account(call, accounts), every_offered=every_offered)
    if name == ALL and every_offered:
        return AccountChoice(accounts, None, every=True, every_offered=True)
    found = next((account for account in accounts if account.name == name), None)
    if found is None:
        raise UnknownAccountError(name)
    return AccountChoice(accounts, found, every_offered=every_offered)


def page_choice(call: Call, *, every_offered: bool = False) -> AccountChoice | Response:
    """The account the query's ``account=`` asks a page for, or the 404 answer to give."""
    try:
        return choose(call, call.request.query_params.get(ACCOUNT_PARAM), every_offered=every_offered)
    except UnknownAccountError as unknown:
        return unknown_account(call, unknown.name)


def acting_choice(call: Call) -> AccountChoice | Response:
    """The account an action acts on: the row's, as its form or JSON body names it, else the
    query's, else the default; the 404 answer for a name that is no account."""
    name = call.form.get(ACCOUNT_PARAM) or call.request.query_params.get(ACCOUNT_PARAM)
    try:
        return choose(call, name)
    except UnknownAccountError as unknown:
        return unknown_account(call, unknown.name)


def unknown_account(call: Call, name: str) -> Response:
    """404: the deployment has no account ``name`` (the accounts it has are listed)."""
    message = f"no mail account named {name!r}"
    if call.request.url.path.startswith("/api/"):
        return call.json({"error": message}, 404)
    # Links to the same page of each account, when it is a page (an action's address is no page).
    links = call.request.method == "GET"
    return call.render("no_account.html", 404, name=name, accounts=deployment_accounts_of(call), links=links)


def account_imap(call: Call, account: AccountConfig | None) -> ServerConfig:
    """How to sign in to ``account``'s IMAP server (its secrets read with SECRETS_KEY);
    ``CommandError`` when there is no account or its secrets cannot be read."""
    from prod.cli_accounts import choose_account
    from prod.cli_common import CommandError
    from prod.oauth2_tokens import account_token_source

    settings, engine = call.context.settings, call.context.engine
    if account is None:
        raise CommandError("no mail account: add one with `emailops accounts add`", code=78)
    account = choose_account(settings, engine, account.name, secrets=True)
    deployment = settings.deployment()
    return account.imap_config(deployment, account_token_source(account, deployment, engine))
