"""The account's OAuth2 token source, built from the settings, with the tokens it holds masked in
this process's logs and Sentry events."""

from __future__ import annotations

from sqlalchemy import Engine

from emailops.auth.token_source import TokenSource
from prod.redaction import REDACTOR
from prod.runtime_settings import RuntimeSettings


def token_source(settings: RuntimeSettings, engine: Engine) -> TokenSource | None:
    """None with EMAIL_AUTH=password."""
    if settings.email_auth != "oauth2":
        return None
    return TokenSource(engine, settings.oauth2_config(), on_secret=REDACTOR.replace_secrets)
