"""One account's configuration as one frozen value, and the stage configurations it yields.

An ``AccountConfig`` is built once, from a row of ``accounts`` or from the ``EMAIL_*`` settings of
the default account; everything a worker needs for that mailbox comes from it together with the
``Deployment`` (what every account of the deployment shares). Secrets have masked ``repr``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from emailops.auth.providers import PROVIDERS
from emailops.config import (
    AccessTokens,
    OAuth2Config,
    OAuth2Flow,
    ReplyConfig,
    ServerConfig,
    SyncConfig,
    TlsSecurity,
)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    security: TlsSecurity


@dataclass(frozen=True)
class OAuth2Options:
    """The ``oauth2_*`` keys of an account (as the ``EMAIL_OAUTH2_*`` settings); empty strings and
    empty scopes take the provider's preset."""

    provider: str
    client_id: str
    flow: OAuth2Flow = OAuth2Flow.REFRESH_TOKEN
    client_secret: str | None = field(default=None, repr=False)
    tenant: str = ""
    refresh_token: str | None = field(default=None, repr=False)
    token_url: str = ""
    device_url: str = ""
    scopes: tuple[str, ...] = ()
    authorize_url: str = ""


@dataclass(frozen=True)
class Deployment:
    """What every account shares. ``sync`` and ``reply`` are templates: each account replaces
    their per-account fields (``SyncConfig.account``, ``folders``, ``idle_folders``;
    ``ReplyConfig.from_address``, ``own_addresses``, ``never_reply_to``, ``sent_folder``,
    ``drafts_folder``)."""

    sync: SyncConfig
    reply: ReplyConfig
    ca_file: Path | None = None
    timeout_seconds: float = 30.0
    # Fernet keys of SECRETS_KEY: stored secrets are written with the first, read with any.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    # A token request holds the token row locked: bounded well below the lock waits of others.
    token_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class AccountConfig:
    name: str
    username: str
    password: str = field(repr=False)
    imap: Endpoint
    smtp: Endpoint
    oauth2: OAuth2Options | None = None
    folders: tuple[str, ...] = ("INBOX",)
    idle_folders: int = 4
    from_address: str = ""
    drafts_folder: str = "Drafts"
    sent_folder: str = "Sent"
    never_reply_to: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def auth(self) -> str:
        return "password" if self.oauth2 is None else "oauth2"

    @property
    def index_key(self) -> str:
        """The value of the ``account`` column of the index's tables for this mailbox."""
        return f"{self.username}@{self.imap.host}"

    def sync_config(self, deployment: Deployment) -> SyncConfig:
        return replace(
            deployment.sync, account=self.index_key, folders=self.folders, idle_folders=self.idle_folders
        )

    def reply_config(self, deployment: Deployment) -> ReplyConfig:
        from_address = self.from_address or self.username
        own = {from_address.lower(), self.username.lower()}
        return replace(
            deployment.reply,
            account_name=self.name,
            from_address=from_address,
            own_addresses=tuple(sorted(a for a in own if "@" in a)),
            never_reply_to=self.never_reply_to,
            sent_folder=self.sent_folder,
            drafts_folder=self.drafts_folder,
        )

    def imap_config(self, deployment: Deployment, tokens: AccessTokens | None = None) -> ServerConfig:
        """With OAuth2, ``tokens`` is the account's token source (one per process)."""
        return self._server(self.imap, deployment, tokens)

    def smtp_config(self, deployment: Deployment, tokens: AccessTokens | None = None) -> ServerConfig:
        return self._server(self.smtp, deployment, tokens)

    def _server(
        self, endpoint: Endpoint, deployment: Deployment, tokens: AccessTokens | None
    ) -> ServerConfig:
        if self.oauth2 is not None and tokens is None:
            raise ValueError(f"account {self.name}: OAuth2 sign-in needs the account's token source")
        return ServerConfig(
            host=endpoint.host,
            port=endpoint.port,
            username=self.username,
            password=self.password,
            security=endpoint.security,
            ca_file=deployment.ca_file,
            timeout_seconds=deployment.timeout_seconds,
            tokens=tokens if self.oauth2 is not None else None,
        )

    def oauth2_config(self, deployment: Deployment) -> OAuth2Config:
        """How to get access tokens (OAuth2 accounts only): the preset completed by the options."""
        options = self.oauth2
        assert options is not None
        preset = PROVIDERS.get(options.provider)
        tenant = options.tenant or None
        token_url = options.token_url or (preset.endpoint(preset.token_url, tenant) if preset else "")
        device_url = options.device_url or (
            preset.endpoint(preset.device_url, tenant) if preset and preset.device_url else ""
        )
        authorize_url = options.authorize_url or (
            preset.endpoint(preset.authorize_url, tenant) if preset else ""
        )
        scopes = options.scopes or ((preset.scopes_for(options.flow) or ()) if preset else ())
        return OAuth2Config(
            account=self.index_key,
            username=self.username,
            provider=options.provider,
            flow=options.flow,
            token_url=token_url,
            device_url=device_url or None,
            scopes=tuple(scopes),
            client_id=options.client_id,
            client_secret=options.client_secret,
            initial_refresh_token=options.refresh_token,
            token_keys=deployment.secret_keys,
            timeout_seconds=min(deployment.timeout_seconds, deployment.token_timeout_seconds),
            authorize_url=authorize_url or None,
        )
