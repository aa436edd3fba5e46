"""The keys an operator gives for an account (an ``[[accounts]]`` table, ``accounts add`` flags),
checked and completed into an ``AccountConfig``.

Keys as the ``EMAIL_*`` settings without the prefix (``imap_host``, ``oauth2_client_id``, ...),
plus ``name``, ``from``, ``folders``, ``idle_folders``, ``never_reply_to``, ``enabled`` and
``password_env`` (the name of an environment variable holding the password). A key the
deployment has a default for (``AccountDefaults``) takes it when absent; a provider preset fills
the servers of an OAuth2 account. Errors name the account and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from emailops.accounts.config import AccountConfig, Endpoint, OAuth2Options
from emailops.auth.providers import PROVIDERS
from emailops.config import OAuth2Flow, TlsSecurity

# Letters, digits and . _ @ + - (an e-mail address fits), as console user names.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
KEYS = frozenset(
    {
        "name",
        "username",
        "password",
        "password_env",
        "auth",
        "imap_host",
        "imap_port",
        "imap_security",
        "smtp_host",
        "smtp_port",
        "smtp_security",
        "folders",
        "idle_folders",
        "from",
        "drafts_folder",
        "sent_folder",
        "never_reply_to",
        "enabled",
        "oauth2_provider",
        "oauth2_flow",
        "oauth2_client_id",
        "oauth2_client_secret",
        "oauth2_tenant",
        "oauth2_refresh_token",
        "oauth2_token_url",
        "oauth2_device_url",
        "oauth2_authorize_url",
        "oauth2_scopes",
    }
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Tenants that name no organisation: app-only access needs the organisation's own tenant.
_MULTI_TENANTS = ("", "common", "organizations", "consumers")


class AccountError(ValueError):
    """An account's keys are wrong; the message names the account and the key."""


@dataclass(frozen=True)
class AccountDefaults:
    """The deployment's defaults for the keys an account may leave out (EMAIL_FOLDERS,
    IMAP_IDLE_FOLDERS, NEVER_REPLY_TO, SENT_FOLDER, DRAFTS_FOLDER)."""

    folders: tuple[str, ...] = ("INBOX",)
    idle_folders: int = 4
    never_reply_to: tuple[str, ...] = ()
    sent_folder: str = "Sent"
    drafts_folder: str = "Drafts"


def implicit_tls(port: int, implicit_port: int) -> TlsSecurity:
    """Security chosen from the port: implicit TLS on 993 (IMAP) / 465 (SMTP), else STARTTLS."""
    return TlsSecurity.SSL if port == implicit_port else TlsSecurity.STARTTLS


def endpoint_url_problem(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return "must be an https:// URL (http:// only on loopback)"
    return None


def oauth2_problem(options: OAuth2Options, name: Callable[[str], str]) -> str | None:
    """Combinations of OAuth2 keys that cannot work, or None. ``name`` turns a key (``auth``,
    ``oauth2_flow``, ...) into what the operator wrote (a variable or a key); the message starts
    with the one to change."""
    if not options.client_id:
        return f"{name('oauth2_client_id')}: required with {name('auth')}=oauth2"
    if options.provider == "custom" and not options.token_url:
        return f"{name('oauth2_token_url')}: required with {name('oauth2_provider')}=custom"
    if options.flow is not OAuth2Flow.CLIENT_CREDENTIALS:
        return None
    if options.provider == "google":
        return f"{name('oauth2_flow')}: google has no client_credentials grant for mail; use refresh_token"
    if not options.client_secret:
        return f"{name('oauth2_client_secret')}: required with {name('oauth2_flow')}=client_credentials"
    if options.refresh_token is not None:
        return (
            f"{name('oauth2_refresh_token')}: not used with {name('oauth2_flow')}=client_credentials; "
            "remove it"
        )
    if options.provider == "microsoft" and options.tenant.lower() in _MULTI_TENANTS:
        return (
            f"{name('oauth2_tenant')}: app-only access needs your directory (tenant) id or domain, "
            "not common/organizations/consumers"
        )
    return None


def comma_list(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Blanks dropped, and a name given twice kept once, in the order given."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))


class _Keys:
    """The keys of one account, each read once; errors name the account and the key."""

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        self.name = name
        self.values = values

    def error(self, key: str, problem: str) -> AccountError:
        return AccountError(f"account {self.name!r}: {key}: {problem}")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.values.get(key, default)
        if value is None or (required and value == ""):
            raise self.error(key, "required")
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {type(value).__name__}")
        return value.strip()

    def optional_text(self, key: str) -> str | None:
        return self.text(key) if key in self.values else None

    def number(self, key: str, default: int | None, low: int, high: int) -> int:
        value = self.values.get(key, default)
        if value is None:
            raise self.error(key, "required")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be a whole number from {low} to {high}, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def names(self, key: str, default: tuple[str, ...], *, separators: str = ",") -> tuple[str, ...]:
        value = self.values.get(key, default)
        if isinstance(value, str):
            return comma_list(re.sub(f"[{separators}]", ",", value))
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return comma_list(value)
        raise self.error(key, f"must be a list of strings, got {value!r}")

    def choice(self, key: str, default: str | None, choices: tuple[str, ...]) -> str | None:
        value = self.values.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value.strip().lower()


def account_from_values(
    values: Mapping[str, Any], defaults: AccountDefaults, environ: Mapping[str, str]
) -> AccountConfig:
    """The account the keys describe, or ``AccountError``. ``environ`` is where ``password_env``
    names are looked up (the process's environment, given by the caller)."""
    raw_name = values.get("name")
    if not isinstance(raw_name, str) or not NAME.fullmatch(raw_name):
        shown = "(no name)" if raw_name is None else repr(raw_name)
        raise AccountError(
            f"account {shown}: name: required, 1 to 100 letters, digits or . _ @ + - "
            "(starting with a letter or digit)"
        )
    keys = _Keys(raw_name, values)
    unknown = sorted(set(values) - KEYS)
    if unknown:
        raise keys.error(unknown[0], f"unknown key (known: {', '.join(sorted(KEYS))})")
    username = keys.text("username", required=True)
    auth = keys.choice("auth", "password", ("password", "oauth2"))
    oauth2 = _oauth2_options(keys) if auth == "oauth2" else None
    preset = PROVIDERS.get(oauth2.provider) if oauth2 is not None else None
    password = "" if oauth2 is not None else _password(keys, environ)
    imap = _endpoint(keys, "imap", (preset.imap_host, preset.imap_port) if preset else (None, None), 993)
    smtp = _endpoint(keys, "smtp", (preset.smtp_host, preset.smtp_port) if preset else (None, None), 465)
    folders = keys.names("folders", defaults.folders)
    if not folders:
        raise keys.error("folders", "names no folder")
    return AccountConfig(
        name=raw_name,
        username=username,
        password=password,
        imap=imap,
        smtp=smtp,
        oauth2=oauth2,
        folders=folders,
        idle_folders=keys.number("idle_folders", defaults.idle_folders, 0, 1000),
        from_address=keys.text("from", ""),
        drafts_folder=keys.text("drafts_folder", defaults.drafts_folder, required=True),
        sent_folder=keys.text("sent_folder", defaults.sent_folder, required=True),
        never_reply_to=keys.names("never_reply_to", defaults.never_reply_to),
        enabled=keys.flag("enabled", True),
    )


def _password(keys: _Keys, environ: Mapping[str, str]) -> str:
    given = keys.optional_text("password")
    variable = keys.optional_text("password_env")
    if given is not None and variable is not None:
        raise keys.error("password_env", "give password or password_env, not both")
    if variable is not None:
        if variable not in environ:
            raise keys.error("password_env", f"the environment variable {variable} is not set")
        given = environ[variable]
    if not given:
        raise keys.error("password", "required with auth=password (or password_env)")
    return given


def _endpoint(keys: _Keys, kind: str, preset: tuple[str | None, int | None], implicit_port: int) -> Endpoint:
    host = keys.text(f"{kind}_host", preset[0], required=True)
    port = keys.number(f"{kind}_port", preset[1], 1, 65535)
    security = keys.choice(f"{kind}_security", None, tuple(TlsSecurity))
    return Endpoint(host, port, TlsSecurity(security) if security else implicit_tls(port, implicit_port))


def _oauth2_options(keys: _Keys) -> OAuth2Options:
    provider = keys.choice("oauth2_provider", None, ("microsoft", "google", "custom"))
    if provider is None:
        raise keys.error("oauth2_provider", "required with auth=oauth2 (microsoft, google or custom)")
    flow = keys.choice("oauth2_flow", OAuth2Flow.REFRESH_TOKEN.value, tuple(OAuth2Flow)) or ""
    for key in ("oauth2_token_url", "oauth2_device_url", "oauth2_authorize_url"):
        url = keys.text(key, "")
        problem = endpoint_url_problem(url) if url else None
        if problem:
            raise keys.error(key, problem)
    options = OAuth2Options(
        provider=provider,
        client_id=keys.text("oauth2_client_id", ""),
        flow=OAuth2Flow(flow),
        client_secret=keys.optional_text("oauth2_client_secret") or None,
        tenant=keys.text("oauth2_tenant", ""),
        refresh_token=keys.optional_text("oauth2_refresh_token") or None,
        token_url=keys.text("oauth2_token_url", ""),
        device_url=keys.text("oauth2_device_url", ""),
        authorize_url=keys.text("oauth2_authorize_url", ""),
        scopes=keys.names("oauth2_scopes", (), separators=", "),
    )
    problem = oauth2_problem(options, lambda key: key)
    if problem:
        raise AccountError(f"account {keys.name!r}: {problem}")
    return options


def accounts_from_file(
    data: Mapping[str, Any], defaults: AccountDefaults, environ: Mapping[str, str]
) -> list[AccountConfig]:
    """The accounts of a parsed TOML file: an ``[[accounts]]`` table per account, names unique."""
    unknown = sorted(set(data) - {"accounts"})
    if unknown:
        raise AccountError(f"{unknown[0]}: unknown table (the file holds [[accounts]] tables only)")
    tables = data.get("accounts", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise AccountError("accounts: must be [[accounts]] tables, one per account")
    found: list[AccountConfig] = []
    seen: set[str] = set()
    for table in tables:
        account = account_from_values(table, defaults, environ)
        if account.name in seen:
            raise AccountError(f"account {account.name!r}: name: given twice")
        seen.add(account.name)
        found.append(account)
    return found
