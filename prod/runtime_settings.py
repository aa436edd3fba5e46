"""Runtime settings: every variable of the runbook's tables, read from the environment and ``.env``.

``RuntimeSettings.from_env()`` validates once and raises ``ConfigError`` with one message that
names each bad variable and what is wrong with it; the supervisor turns that into exit code 78.
Passwords are ``SecretStr``: they print as ``**********`` and reach the domain code only through
``imap_config()`` / ``smtp_config()``. With ``EMAIL_AUTH=oauth2`` the account signs in with OAuth2
(``oauth2_config()``); a provider preset fills in unset IMAP/SMTP hosts and ports before the
fields are validated, so a missing one is still reported by its own name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from emailops.auth.crypto import check_key
from emailops.auth.providers import PROVIDERS
from emailops.config import (
    AccessTokens,
    LlmConfig,
    OAuth2Config,
    OAuth2Flow,
    ReplyConfig,
    ServerConfig,
    SyncConfig,
    TlsSecurity,
)
from emailops.users.oidc import OidcConfig, RoleMapError, parse_role_map
from prod.database_url import parse_database_url

MASK = "**********"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Port = Annotated[int, Field(ge=1, le=65535)]
CommaList = Annotated[tuple[str, ...], NoDecode]
# Variables whose value is never shown, not even in an error about it.
SECRET_VARIABLES = frozenset(
    {
        "EMAIL_PASSWORD",
        "EMAIL_OAUTH2_CLIENT_SECRET",
        "EMAIL_OAUTH2_REFRESH_TOKEN",
        "EMAIL_OAUTH2_TOKEN_KEY",
        "WEB_OIDC_CLIENT_SECRET",
    }
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_REQUEST_TIMEOUT_SECONDS = 10.0
# Tenants that name no organisation: app-only access needs the organisation's own tenant.
_MULTI_TENANTS = ("", "common", "organizations", "consumers")


class ConfigError(Exception):
    """The configuration is invalid; the message names every variable at fault."""


def _implicit_tls(port: int, implicit_port: int) -> TlsSecurity:
    return TlsSecurity.SSL if port == implicit_port else TlsSecurity.STARTTLS


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Runtime (runbook: "Environment Variables")
    env: str = "production"
    log_level: str = "INFO"
    log_file_enabled: bool = True
    log_file_path: Path = Path("/data/logs/app.log")
    state_dir: Path = Path("/data/state")
    cache_dir: Path = Path("/data/cache")
    workers: int = Field(default=1, ge=1, le=64)
    sentry_dsn: str = ""
    sentry_send_pii: bool = False

    # Email (runbook: "Email Configuration"; all required)
    email_imap_host: str = Field(min_length=1)
    email_imap_port: Port
    email_smtp_host: str = Field(min_length=1)
    email_smtp_port: Port
    email_username: str = Field(min_length=1)
    email_password: SecretStr

    # Sign-in: password, or OAuth2 (XOAUTH2 / OAUTHBEARER) with the token store in the index.
    email_auth: Literal["password", "oauth2"] = "password"
    email_oauth2_provider: Literal["microsoft", "google", "custom"] | None = None
    email_oauth2_flow: OAuth2Flow = OAuth2Flow.REFRESH_TOKEN
    email_oauth2_client_id: str = ""
    email_oauth2_client_secret: SecretStr | None = None
    email_oauth2_tenant: str = ""
    email_oauth2_refresh_token: SecretStr | None = None
    email_oauth2_token_url: str = ""
    email_oauth2_device_url: str = ""
    email_oauth2_scopes: CommaList = ()
    email_oauth2_token_key: SecretStr | None = None

    # Storage (runbook: "Storage Configuration")
    index_db_url: str = "sqlite:////data/emailops.db"
    # The time zone of the search's dates (date:, after:, before:), an IANA name.
    search_timezone: str = "UTC"

    # Connection security. Unset means: chosen from the port (993 / 465 are implicit TLS).
    email_imap_security: TlsSecurity | None = None
    email_smtp_security: TlsSecurity | None = None
    email_tls_ca_file: Path | None = None
    email_timeout_seconds: float = Field(default=30.0, gt=0)

    # Indexing
    email_folders: CommaList = ("INBOX",)
    imap_idle: bool = True
    imap_idle_folders: int = Field(default=4, ge=0)
    poll_interval_seconds: float = Field(default=60.0, gt=0)
    max_message_bytes: int = Field(default=25 * 1024 * 1024, ge=64 * 1024)
    cache_max_bytes: int = Field(default=2 * 1024**3, ge=0)

    # Replies
    email_from: str = ""
    rules_file: Path = Path("/data/rules.toml")
    replies_dry_run: bool = False
    never_reply_to: CommaList = ()
    reply_max_per_sender_per_day: int = Field(default=3, ge=1)
    reply_max_per_hour: int = Field(default=100, ge=1)
    reply_send_max_attempts: int = Field(default=5, ge=1)
    reply_history_days: int = Field(default=90, ge=1)
    save_sent_copy: bool = False
    sent_folder: str = "Sent"
    drafts_folder: str = "Drafts"

    # Replies written by a language model (rules with llm_prompt); unset base URL: none.
    llm_base_url: str = ""
    llm_api_key: SecretStr = SecretStr("")
    llm_model: str = ""
    llm_timeout_seconds: float = Field(default=60.0, gt=0, le=600)
    llm_max_input_chars: int = Field(default=8000, ge=100, le=1_000_000)
    llm_max_requests_per_hour: int = Field(default=60, ge=1)
    llm_stream: bool = False

    # Supervision
    shutdown_timeout_seconds: float = Field(default=15.0, gt=0)
    heartbeat_timeout_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _oauth2_presets(cls, data: Any) -> Any:
        """With OAuth2, no password is needed, and a provider preset fills unset hosts and ports."""
        if not isinstance(data, dict) or str(data.get("email_auth", "")).strip().lower() != "oauth2":
            return data
        data = dict(data)
        data.setdefault("email_password", "")
        provider = str(data.get("email_oauth2_provider") or "").strip().lower()
        if not provider:
            # Said first: the preset it names would have filled in the servers.
            raise ValueError(
                "EMAIL_OAUTH2_PROVIDER: required with EMAIL_AUTH=oauth2 (microsoft, google or custom)"
            )
        preset = PROVIDERS.get(provider)
        if preset is not None:
            for name, value in (
                ("email_imap_host", preset.imap_host),
                ("email_imap_port", preset.imap_port),
                ("email_smtp_host", preset.smtp_host),
                ("email_smtp_port", preset.smtp_port),
            ):
                if data.get(name) in (None, ""):
                    data[name] = value
        return data

    @field_validator("email_auth", "email_oauth2_provider", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("email_oauth2_scopes", mode="before")
    @classmethod
    def _scopes(cls, value: Any) -> tuple[str, ...]:
        items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
        return tuple(dict.fromkeys(items))

    @field_validator("email_oauth2_token_url", "email_oauth2_device_url")
    @classmethod
    def _endpoint_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
                raise ValueError("must be an https:// URL (http:// only on loopback)")
        return value

    @field_validator("search_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (ValueError, KeyError):
            raise ValueError(
                f"expected an IANA time zone such as UTC or Europe/Berlin, got {value!r}"
            ) from None
        return value

    @field_validator("email_oauth2_token_key")
    @classmethod
    def _token_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            keys = [key.strip() for key in value.get_secret_value().split(",") if key.strip()]
            if not keys:
                raise ValueError("names no key")
            for key in keys:
                check_key(key)
        return value

    # Monitoring: the supervisor serves Prometheus' /metrics on METRICS_ADDR:METRICS_PORT (unset: off);
    # the healthcheck is unhealthy once no watched folder has synced for this long (at least two
    # poll intervals: see health_max_sync_age).
    metrics_port: Port | None = None
    metrics_addr: str = Field(default="127.0.0.1", min_length=1)
    health_max_sync_age_seconds: float = Field(default=300.0, gt=0)

    # Operator console (prod.console): served on WEB_ADDR:WEB_PORT by the supervisor (unset: off);
    # WEB_BASE_URL is its address behind a reverse proxy (https: cookies marked Secure).
    web_port: Port | None = None
    web_addr: str = Field(default="127.0.0.1", min_length=1)
    web_base_url: str = ""
    web_session_idle_minutes: int = Field(default=30, ge=1, le=24 * 60)
    web_session_max_hours: int = Field(default=12, ge=1, le=24 * 30)
    # Single sign-on with an OpenID Connect provider (unset issuer: none); the role comes from
    # the groups in WEB_OIDC_ROLES_CLAIM through WEB_OIDC_ROLE_MAP ("group=role,...").
    web_oidc_issuer: str = ""
    web_oidc_client_id: str = ""
    web_oidc_client_secret: SecretStr | None = None
    web_oidc_roles_claim: str = Field(default="groups", min_length=1)
    web_oidc_role_map: str = ""
    web_password_login: bool = True

    @field_validator("web_oidc_issuer")
    @classmethod
    def _web_oidc_issuer(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and urlsplit(value).scheme != "https" and urlsplit(value).hostname not in _LOOPBACK_HOSTS:
            raise ValueError("must be the provider's https:// address, e.g. https://accounts.google.com")
        return value

    @field_validator("web_oidc_role_map")
    @classmethod
    def _web_oidc_role_map(cls, value: str) -> str:
        try:
            parse_role_map(value)
        except RoleMapError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("web_base_url")
    @classmethod
    def _web_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if value and (
            parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query
        ):
            raise ValueError(
                "must be the console's address without a path, e.g. https://emailops.example.org"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> str:
        level = str(value).strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("email_folders", "never_reply_to", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        # Blanks dropped, and a name given twice kept once (a folder listed twice would be synced
        # twice by `sync --once`), in the order given.
        return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))

    @field_validator("index_db_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        parse_database_url(value)
        return value

    @field_validator("llm_base_url")
    @classmethod
    def _llm_base_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.lower().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. https://api.openai.com/v1")
        return value

    @field_validator("email_tls_ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _tls_defaults(self) -> Self:
        if self.email_imap_security is None:
            self.email_imap_security = _implicit_tls(self.email_imap_port, 993)
        if self.email_smtp_security is None:
            self.email_smtp_security = _implicit_tls(self.email_smtp_port, 465)
        if not self.email_folders:
            raise ValueError("EMAIL_FOLDERS names no folder")
        if self.email_auth == "oauth2":
            _check_oauth2(self)
        _check_oidc(self)
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Read and validate the environment (and ``.env``), or raise one readable ``ConfigError``."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    # Plain values for the domain library.
    def imap_config(self, tokens: AccessTokens | None = None) -> ServerConfig:
        """IMAP server and credentials; with EMAIL_AUTH=oauth2, ``tokens`` is the account's
        token source (``prod.oauth2_tokens.token_source``)."""
        assert self.email_imap_security is not None
        return ServerConfig(
            host=self.email_imap_host,
            port=self.email_imap_port,
            username=self.email_username,
            password=self.email_password.get_secret_value(),
            security=self.email_imap_security,
            ca_file=self.email_tls_ca_file,
            timeout_seconds=self.email_timeout_seconds,
            tokens=self._tokens(tokens),
        )

    def smtp_config(self, tokens: AccessTokens | None = None) -> ServerConfig:
        assert self.email_smtp_security is not None
        return ServerConfig(
            host=self.email_smtp_host,
            port=self.email_smtp_port,
            username=self.email_username,
            password=self.email_password.get_secret_value(),
            security=self.email_smtp_security,
            ca_file=self.email_tls_ca_file,
            timeout_seconds=self.email_timeout_seconds,
            tokens=self._tokens(tokens),
        )

    def _tokens(self, tokens: AccessTokens | None) -> AccessTokens | None:
        if self.email_auth == "oauth2" and tokens is None:
            raise ValueError("EMAIL_AUTH=oauth2: the server configuration needs the account's token source")
        return tokens if self.email_auth == "oauth2" else None

    def oauth2_config(self) -> OAuth2Config:
        """How to get access tokens (EMAIL_AUTH=oauth2 only): presets completed by the settings."""
        assert self.email_auth == "oauth2" and self.email_oauth2_provider is not None
        assert self.email_oauth2_token_key is not None
        preset = PROVIDERS.get(self.email_oauth2_provider)
        flow = self.email_oauth2_flow
        tenant = self.email_oauth2_tenant or None
        token_url = self.email_oauth2_token_url or (
            preset.endpoint(preset.token_url, tenant) if preset else ""
        )
        device_url = self.email_oauth2_device_url or (
            preset.endpoint(preset.device_url, tenant) if preset and preset.device_url else ""
        )
        scopes = self.email_oauth2_scopes or ((preset.scopes_for(flow) or ()) if preset else ())
        keys = self.email_oauth2_token_key.get_secret_value().split(",")
        return OAuth2Config(
            account=self.sync_config().account,
            username=self.email_username,
            provider=self.email_oauth2_provider,
            flow=flow,
            token_url=token_url,
            device_url=device_url or None,
            scopes=tuple(scopes),
            client_id=self.email_oauth2_client_id,
            client_secret=_secret(self.email_oauth2_client_secret),
            initial_refresh_token=_secret(self.email_oauth2_refresh_token),
            token_keys=tuple(key.strip() for key in keys if key.strip()),
            # A refresh holds the token row (SQLite: the database's write lock) while it waits for
            # the endpoint: well under the 30 s other writers wait for a lock.
            timeout_seconds=min(self.email_timeout_seconds, TOKEN_REQUEST_TIMEOUT_SECONDS),
        )

    def sync_config(self) -> SyncConfig:
        return SyncConfig(
            account=f"{self.email_username}@{self.email_imap_host}",
            folders=self.email_folders,
            use_idle=self.imap_idle,
            idle_folders=self.imap_idle_folders,
            poll_interval_seconds=self.poll_interval_seconds,
            max_message_bytes=self.max_message_bytes,
            cache_dir=self.cache_dir,
            cache_max_bytes=self.cache_max_bytes,
        )

    def reply_config(self) -> ReplyConfig:
        from_address = self.email_from or self.email_username
        own = {from_address.lower(), self.email_username.lower()}
        return ReplyConfig(
            from_address=from_address,
            own_addresses=tuple(sorted(a for a in own if "@" in a)),
            rules_file=self.rules_file,
            dry_run=self.replies_dry_run,
            never_reply_to=self.never_reply_to,
            max_replies_per_sender_per_day=self.reply_max_per_sender_per_day,
            max_replies_per_hour=self.reply_max_per_hour,
            send_max_attempts=self.reply_send_max_attempts,
            save_sent_copy=self.save_sent_copy,
            sent_folder=self.sent_folder,
            drafts_folder=self.drafts_folder,
            # A worker hung on a message is killed after the heartbeat timeout; its claim is
            # stalled well after that, so a live worker's claim is never taken from it.
            rules_claim_timeout_seconds=2 * self.heartbeat_timeout_seconds,
            llm=self.llm_config(),
        )

    def llm_config(self) -> LlmConfig | None:
        if not self.llm_base_url:
            return None
        return LlmConfig(
            base_url=self.llm_base_url,
            api_key=self.llm_api_key.get_secret_value(),
            model=self.llm_model,
            timeout_seconds=self.llm_timeout_seconds,
            max_input_chars=self.llm_max_input_chars,
            max_requests_per_hour=self.llm_max_requests_per_hour,
            stream=self.llm_stream,
            # The call runs beside the worker's loop and ends within the timeout; a claim older
            # than twice that (and than a hung worker's kill) is from a worker that died.
            claim_timeout_seconds=max(2 * self.llm_timeout_seconds + 30, 2 * self.heartbeat_timeout_seconds),
        )

    def llm_rules_problem(self) -> str | None:
        """A configuration error when the rules file asks a model and none is configured, else None.
        (A rules file that does not load is reported by the rules themselves, not here.)"""
        if self.llm_base_url or not self.rules_file.is_file():
            return None
        from emailops.rules import RulesError, load_rules

        try:
            ruleset = load_rules(self.rules_file)
        except RulesError:
            return None
        names = [rule.name for rule in ruleset.rules if rule.reply is not None and rule.reply.llm is not None]
        if not names:
            return None
        quoted = ", ".join(f'"{name}"' for name in names)
        return (
            f"invalid configuration: LLM_BASE_URL: missing; rule(s) {quoted} of {self.rules_file} "
            "use llm_prompt, which needs a chat-completions endpoint"
        )

    def oidc_config(self) -> OidcConfig | None:
        """The console's single sign-on, None without WEB_OIDC_ISSUER."""
        if not self.web_oidc_issuer:
            return None
        return OidcConfig(
            issuer=self.web_oidc_issuer,
            client_id=self.web_oidc_client_id,
            client_secret=_secret(self.web_oidc_client_secret),
            roles_claim=self.web_oidc_roles_claim,
            role_map=tuple(parse_role_map(self.web_oidc_role_map).items()),
        )

    def masked(self) -> dict[str, Any]:
        """Every setting by its variable name, secrets masked (for ``check-config``)."""
        values = self.model_dump(mode="json")
        for name in SECRET_VARIABLES:
            if values.get(name.lower()):
                values[name.lower()] = MASK
        values["email_password"] = MASK
        values["llm_api_key"] = MASK if self.llm_api_key.get_secret_value() else ""
        values["llm_base_url"] = _mask_dsn(self.llm_base_url)
        if self.sentry_dsn:
            values["sentry_dsn"] = _mask_dsn(self.sentry_dsn)
        values["index_db_url"] = _mask_db_url(self.index_db_url)
        return {name.upper(): value for name, value in values.items()}

    def oauth2_secrets(self) -> list[str]:
        """The OAuth2 secrets among the settings (client secret, refresh token, token keys), for
        masking; the tokens obtained later are registered by the token source."""
        values = [_secret(self.email_oauth2_client_secret), _secret(self.email_oauth2_refresh_token)]
        if self.email_oauth2_token_key is not None:
            values += self.email_oauth2_token_key.get_secret_value().split(",")
        return [value.strip() for value in values if value and value.strip()]

    @property
    def health_max_sync_age(self) -> float:
        """Seconds without a sync of any watched folder before the healthcheck fails: the setting,
        but never less than two poll intervals (a quiet folder is looked at once per interval)."""
        return max(self.health_max_sync_age_seconds, 2 * self.poll_interval_seconds)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() or None if value is not None else None


def _check_oauth2(settings: RuntimeSettings) -> None:
    """Combinations that cannot work; each message starts with the variable to change."""
    provider = settings.email_oauth2_provider
    flow = settings.email_oauth2_flow
    if not settings.email_oauth2_client_id:
        raise ValueError("EMAIL_OAUTH2_CLIENT_ID: required with EMAIL_AUTH=oauth2")
    if settings.email_oauth2_token_key is None:
        raise ValueError(
            "EMAIL_OAUTH2_TOKEN_KEY: required with EMAIL_AUTH=oauth2 (the key that encrypts stored tokens; "
            "`emailops auth new-key` prints one)"
        )
    if provider == "custom" and not settings.email_oauth2_token_url:
        raise ValueError("EMAIL_OAUTH2_TOKEN_URL: required with EMAIL_OAUTH2_PROVIDER=custom")
    if flow is OAuth2Flow.CLIENT_CREDENTIALS:
        if provider == "google":
            raise ValueError(
                "EMAIL_OAUTH2_FLOW: google has no client_credentials grant for mail; use refresh_token"
            )
        if not _secret(settings.email_oauth2_client_secret):
            raise ValueError("EMAIL_OAUTH2_CLIENT_SECRET: required with EMAIL_OAUTH2_FLOW=client_credentials")
        if settings.email_oauth2_refresh_token is not None:
            raise ValueError(
                "EMAIL_OAUTH2_REFRESH_TOKEN: not used with EMAIL_OAUTH2_FLOW=client_credentials; remove it"
            )
        if provider == "microsoft" and settings.email_oauth2_tenant.lower() in _MULTI_TENANTS:
            raise ValueError(
                "EMAIL_OAUTH2_TENANT: app-only access needs your directory (tenant) id or domain, "
                "not common/organizations/consumers"
            )


def _check_oidc(settings: RuntimeSettings) -> None:
    if settings.web_oidc_issuer:
        if not settings.web_oidc_client_id:
            raise ValueError("WEB_OIDC_CLIENT_ID: required with WEB_OIDC_ISSUER")
        if not parse_role_map(settings.web_oidc_role_map):
            raise ValueError(
                "WEB_OIDC_ROLE_MAP: required with WEB_OIDC_ISSUER (e.g. admins=admin,staff=viewer)"
            )
    elif not settings.web_password_login:
        raise ValueError("WEB_PASSWORD_LOGIN: false needs WEB_OIDC_ISSUER (nobody could sign in)")


def _mask_dsn(dsn: str) -> str:
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _mask_db_url(value: str) -> str:
    return parse_database_url(value).masked(value)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each variable at fault and what is wrong, e.g.
    ``invalid configuration: EMAIL_PASSWORD: missing; WORKERS: must be >= 1 (got 0)``."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
        if not loc:  # a rule over several settings: its message starts with the variable's name
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        name = loc[0].upper()
        if error["type"] == "missing":
            what = "missing (required)"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            given = error.get("input")
            shown = "" if name in SECRET_VARIABLES or isinstance(given, dict) else f" (got {given!r})"
            what = f"{message}{shown}"
        problems.append(f"{name}: {what}")
    return "invalid configuration: " + "; ".join(problems)
