"""Provider presets: endpoints, scopes and mail servers of Microsoft 365 and Google.

``custom`` has no preset: its endpoints and scopes come from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from emailops.config import OAuth2Flow


@dataclass(frozen=True)
class ProviderPreset:
    name: str
    token_url: str  # may contain {tenant}
    device_url: str | None
    authorize_url: str  # the authorization endpoint of the code flow (console's Reconnect)
    scopes: tuple[str, ...]  # for the refresh_token (delegated) flow
    app_scopes: tuple[str, ...] | None  # for client_credentials; None: the provider has none
    imap_host: str
    imap_port: int
    smtp_host: str
    smtp_port: int
    default_tenant: str | None = None

    def endpoint(self, url: str, tenant: str | None) -> str:
        return url.format(tenant=tenant or self.default_tenant or "")

    def scopes_for(self, flow: OAuth2Flow) -> tuple[str, ...] | None:
        return self.scopes if flow is OAuth2Flow.REFRESH_TOKEN else self.app_scopes


PROVIDERS: dict[str, ProviderPreset] = {
    # Microsoft identity platform v2.0; IMAP and SMTP AUTH of Exchange Online.
    "microsoft": ProviderPreset(
        name="microsoft",
        token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",  # noqa: S106
        device_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        authorize_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        scopes=(
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ),
        app_scopes=("https://outlook.office365.com/.default",),
        imap_host="outlook.office365.com",
        imap_port=993,
        smtp_host="smtp.office365.com",
        smtp_port=587,
        default_tenant="common",
    ),
    # Google: the full mail scope is the one IMAP and SMTP accept. Google has no client
    # credentials grant for Gmail (service accounts sign JWTs instead).
    "google": ProviderPreset(
        name="google",
        token_url="https://oauth2.googleapis.com/token",  # noqa: S106
        device_url="https://oauth2.googleapis.com/device/code",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        scopes=("https://mail.google.com/",),
        app_scopes=None,
        imap_host="imap.gmail.com",
        imap_port=993,
        smtp_host="smtp.gmail.com",
        smtp_port=587,
    ),
}
