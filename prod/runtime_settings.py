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

from emailops.accounts.config import AccountConfig, Deployment, Endpoint, OAuth2Options
from emailops.accounts.fields import (
    LOOPBACK_HOSTS,
    AccountDefaults,
    endpoint_url_problem,
    implicit_tls,
    oauth2_problem,
)
from emailops.auth.crypto import check_key
from emailops.auth.providers import PROVIDERS
from emailops.config import (
    AccessTokens,
    LlmConfig,
    OAuth2Config,
    OAuth2Flow,
    ReplyConfig,
    ServerConfig,
    SignInLimits,
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
        "SECRETS_KEY",
        "WEB_OIDC_CLIENT_SECRET",
    }
)
# The default account's settings: given one, all are required (EMAIL_AUTH=oauth2 counts as one).
_MAILBOX_VARIABLES = (
    "email_imap_host",
    "email_imap_port",
    "email_smtp_host",
    "email_smtp_port",
    "email_username",
    "email_password",
)
TOKEN_REQUEST_TIMEOUT_SECONDS = 10.0


class ConfigError(Exception):
    """The configuration is invalid; the message names every variable at fault."""


def _given(value: object) -> bool:
    return bool(value.get_secret_value() if isinstance(value, SecretStr) else value)


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

    # Email (runbook: "Email Configuration"): the default account. All required once one is set;
    # optional when the accounts are in the index (`emailops accounts import`).
    email_imap_host: str = ""
    email_imap_port: Port | None = None
    email_smtp_host: str = ""
    email_smtp_port: Port | None = None
    email_username: str = ""
    email_password: SecretStr = SecretStr("")
    # The default account's name (`--account`, `accounts list`); unset: EMAIL_USERNAME.
    email_account_name: str = ""
    # Fernet key(s) that encrypt the secrets stored in the index (account passwords, OAuth2
    # tokens): NEW,OLD while rotating. EMAIL_OAUTH2_TOKEN_KEY is its old name.
    secrets_key: SecretStr | None = None

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
    email_oauth2_authorize_url: str = ""
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
    # Fairness between mailboxes (README "Fairness between mailboxes").
    imap_max_connections: int = Field(default=5, ge=1, le=1000)
    imap_logins_per_second: float = Field(default=5.0, ge=0)
    imap_startup_jitter_seconds: float = Field(default=3.0, ge=0, le=600)
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

    @field_validator("email_oauth2_token_url", "email_oauth2_device_url", "email_oauth2_authorize_url")
    @classmethod
    def _endpoint_url(cls, value: str) -> str:
        problem = endpoint_url_problem(value) if value else None
        if problem:
            raise ValueError(problem)
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

    @field_validator("email_oauth2_token_key", "secrets_key")
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
        if value and urlsplit(value).scheme != "https" and urlsplit(value).hostname not in LOOPBACK_HOSTS:
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
        if not self.email_folders:
            raise ValueError("EMAIL_FOLDERS names no folder")
        keys = (self.secrets_key, self.email_oauth2_token_key)
        if None not in keys and len({key.get_secret_value() for key in keys if key is not None}) > 1:
            raise ValueError(
                "SECRETS_KEY: EMAIL_OAUTH2_TOKEN_KEY, its old name, is set to another value; "
                "keep SECRETS_KEY only"
            )
        _check_oidc(self)
        if not self.has_default_account:
            return self
        missing = [
            f"{name.upper()}: missing (required)"
            for name in _MAILBOX_VARIABLES
            if name != "email_password" or self.email_auth == "password"
            if not _given(getattr(self, name))
        ]
        if missing:
            raise ValueError("; ".join(missing))
        assert self.email_imap_port is not None and self.email_smtp_port is not None
        if self.email_imap_security is None:
            self.email_imap_security = implicit_tls(self.email_imap_port, 993)
        if self.email_smtp_security is None:
            self.email_smtp_security = implicit_tls(self.email_smtp_port, 465)
        if self.email_auth == "oauth2":
            _check_oauth2(self)
        return self

    @property
    def has_default_account(self) -> bool:
        """Whether the EMAIL_* settings define an account (any of them is set)."""
        return self.email_auth == "oauth2" or any(_given(getattr(self, name)) for name in _MAILBOX_VARIABLES)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Read and validate the environment (and ``.env``), or raise one readable ``ConfigError``."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    # Plain values for the domain library.
    def default_account(self) -> AccountConfig:
        """The account the EMAIL_* settings define, named EMAIL_ACCOUNT_NAME (default: the username);
        ``ConfigError`` naming the variables when they define none."""
        if not self.has_default_account:
            raise ConfigError(
                "invalid configuration: "
                + "; ".join(f"{name.upper()}: missing (required)" for name in _MAILBOX_VARIABLES)
            )
        assert self.email_imap_port is not None and self.email_imap_security is not None
        assert self.email_smtp_port is not None and self.email_smtp_security is not None
        oauth2 = None
        if self.email_auth == "oauth2":
            assert self.email_oauth2_provider is not None
            oauth2 = OAuth2Options(
                provider=self.email_oauth2_provider,
                client_id=self.email_oauth2_client_id,
                flow=self.email_oauth2_flow,
                client_secret=_secret(self.email_oauth2_client_secret),
                tenant=self.email_oauth2_tenant,
                refresh_token=_secret(self.email_oauth2_refresh_token),
                token_url=self.email_oauth2_token_url,
                device_url=self.email_oauth2_device_url,
                authorize_url=self.email_oauth2_authorize_url,
                scopes=self.email_oauth2_scopes,
            )
        return AccountConfig(
            name=self.email_account_name or self.email_username,
            username=self.email_username,
            password=self.email_password.get_secret_value(),
            imap=Endpoint(self.email_imap_host, self.email_imap_port, self.email_imap_security),
            smtp=Endpoint(self.email_smtp_host, self.email_smtp_port, self.email_smtp_security),
            oauth2=oauth2,
            folders=self.email_folders,
            idle_folders=self.imap_idle_folders,
            from_address=self.email_from,
            drafts_folder=self.drafts_folder,
            sent_folder=self.sent_folder,
            never_reply_to=self.never_reply_to,
        )

    def account_defaults(self) -> AccountDefaults:
        """What an account in the index takes for a key it leaves out."""
        return AccountDefaults(
            folders=self.email_folders,
            idle_folders=self.imap_idle_folders,
            never_reply_to=self.never_reply_to,
            sent_folder=self.sent_folder,
            drafts_folder=self.drafts_folder,
        )

    def secret_keys(self) -> tuple[str, ...]:
        """The keys of SECRETS_KEY (or EMAIL_OAUTH2_TOKEN_KEY), the first one new; () when unset."""
        key = self.secrets_key or self.email_oauth2_token_key
        if key is None:
            return ()
        return tuple(part.strip() for part in key.get_secret_value().split(",") if part.strip())

    def deployment(self) -> Deployment:
        """What every account shares, from the settings."""
        return Deployment(
            sync=SyncConfig(
                account="",
                use_idle=self.imap_idle,
                max_connections=self.imap_max_connections,
                poll_interval_seconds=self.poll_interval_seconds,
                max_message_bytes=self.max_message_bytes,
                cache_dir=self.cache_dir,
                cache_max_bytes=self.cache_max_bytes,
            ),
            reply=ReplyConfig(
                from_address="",
                rules_file=self.rules_file,
                dry_run=self.replies_dry_run,
                max_replies_per_sender_per_day=self.reply_max_per_sender_per_day,
                max_replies_per_hour=self.reply_max_per_hour,
                send_max_attempts=self.reply_send_max_attempts,
                save_sent_copy=self.save_sent_copy,
                # A worker hung on a message is killed after the heartbeat timeout; its claim is
                # stalled well after that, so a live worker's claim is never taken from it.
                rules_claim_timeout_seconds=2 * self.heartbeat_timeout_seconds,
                llm=self.llm_config(),
            ),
            ca_file=self.email_tls_ca_file,
            timeout_seconds=self.email_timeout_seconds,
            secret_keys=self.secret_keys(),
            # A refresh holds the token row (SQLite: the database's write lock) while it waits for
            # the endpoint: well under the 30 s other writers wait for a lock.
            token_timeout_seconds=TOKEN_REQUEST_TIMEOUT_SECONDS,
        )

    # The default account's configurations (AccountConfig's, with this deployment).
    def imap_config(self, tokens: AccessTokens | None = None) -> ServerConfig:
        """IMAP server and credentials; with EMAIL_AUTH=oauth2, ``tokens`` is the account's
        token source (``prod.oauth2_tokens.token_source``)."""
        return self.default_account().imap_config(self.deployment(), tokens)

    def smtp_config(self, tokens: AccessTokens | None = None) -> ServerConfig:
        return self.default_account().smtp_config(self.deployment(), tokens)

    def oauth2_config(self) -> OAuth2Config:
        """How to get access tokens (EMAIL_AUTH=oauth2 only): presets completed by the settings."""
        return self.default_account().oauth2_config(self.deployment())

    def sign_in_limits(self) -> SignInLimits:
        return SignInLimits(
            logins_per_second=self.imap_logins_per_second,
            startup_jitter_seconds=self.imap_startup_jitter_seconds,
        )

    def sync_config(self) -> SyncConfig:
        return self.default_account().sync_config(self.deployment())

    def reply_config(self) -> ReplyConfig:
        return self.default_account().reply_config(self.deployment())

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
        values += self.secret_keys()
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
    options = settings.default_account().oauth2
    assert options is not None
    problem = oauth2_problem(options, lambda key: f"EMAIL_{key.upper()}")
    if problem:
        raise ValueError(problem)
    if not settings.secret_keys():
        raise ValueError(
            "EMAIL_OAUTH2_TOKEN_KEY: required with EMAIL_AUTH=oauth2; set it as SECRETS_KEY, its new name "
            "(the key that encrypts stored tokens; `emailops auth new-key` prints one)"
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
