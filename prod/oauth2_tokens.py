"""An account's OAuth2 token source, with the tokens it holds masked in this process's logs and
Sentry events."""

from __future__ import annotations

from sqlalchemy import Engine

from emailops.accounts.config import AccountConfig, Deployment
from emailops.auth.token_source import TokenSource
from prod.redaction import REDACTOR
from prod.runtime_settings import RuntimeSettings


def account_token_source(
    account: AccountConfig, deployment: Deployment, engine: Engine
) -> TokenSource | None:
    """None for an account that signs in with a password."""
    if account.oauth2 is None:
        return None
    return TokenSource(engine, account.oauth2_config(deployment), on_secret=REDACTOR.replace_secrets)


def token_source(settings: RuntimeSettings, engine: Engine) -> TokenSource | None:
    """The default account's (EMAIL_*); None with EMAIL_AUTH=password."""
    return account_token_source(settings.default_account(), settings.deployment(), engine)
