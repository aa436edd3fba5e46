"""OAuth2 settings: presets, combinations that cannot work (exit 78 naming the variable), masking."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from emailops.config import OAuth2Flow
from prod.runtime_settings import ConfigError, RuntimeSettings
from tests.oauth2_helpers import CLIENT_SECRET, TOKEN_KEY

REPO = Path(__file__).resolve().parents[1]
REFRESH = "eo-rt-settings-0123456789abcdef"


def oauth2(**values: str) -> dict[str, str]:
    base = {
        "EMAIL_USERNAME": "ops@contoso.example",
        "EMAIL_AUTH": "oauth2",
        "EMAIL_OAUTH2_PROVIDER": "microsoft",
        "EMAIL_OAUTH2_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
        "EMAIL_OAUTH2_TOKEN_KEY": TOKEN_KEY,
        "INDEX_DB_URL": "sqlite:////tmp/unused.db",
    }
    base.update(values)
    return {key: value for key, value in base.items() if value != "<unset>"}


def settings(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> RuntimeSettings:
    monkeypatch.chdir(REPO / "tests")  # no .env here
    for key in list(__import__("os").environ):
        if key.startswith(("EMAIL_", "INDEX_DB_URL")):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return RuntimeSettings.from_env()


def test_microsoft_preset_fills_servers_and_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = settings(monkeypatch, oauth2(EMAIL_OAUTH2_TENANT="contoso.example"))
    assert (loaded.email_imap_host, loaded.email_imap_port) == ("outlook.office365.com", 993)
    assert (loaded.email_smtp_host, loaded.email_smtp_port) == ("smtp.office365.com", 587)
    config = loaded.oauth2_config()
    assert config.token_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert config.device_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/devicecode"
    assert "offline_access" in config.scopes and config.flow is OAuth2Flow.REFRESH_TOKEN
    with pytest.raises(ValueError, match="token source"):
        loaded.imap_config()  # OAuth2 never falls back to an empty password

    app = settings(
        monkeypatch,
        oauth2(
            EMAIL_OAUTH2_FLOW="client_credentials",
            EMAIL_OAUTH2_TENANT="contoso.example",
            EMAIL_OAUTH2_CLIENT_SECRET=CLIENT_SECRET,
            EMAIL_IMAP_HOST="imap.contoso.example",
        ),
    )
    assert app.email_imap_host == "imap.contoso.example"
    assert app.oauth2_config().scopes == ("https://outlook.office365.com/.default",)

    google = settings(monkeypatch, oauth2(EMAIL_OAUTH2_PROVIDER="google"))
    assert google.email_imap_host == "imap.gmail.com"
    assert google.oauth2_config().scopes == ("https://mail.google.com/",)


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"EMAIL_OAUTH2_PROVIDER": "<unset>"}, "EMAIL_OAUTH2_PROVIDER: required"),
        ({"EMAIL_OAUTH2_PROVIDER": "yahoo"}, "EMAIL_OAUTH2_PROVIDER: "),
        ({"EMAIL_OAUTH2_CLIENT_ID": "<unset>"}, "EMAIL_OAUTH2_CLIENT_ID: required"),
        ({"EMAIL_OAUTH2_TOKEN_KEY": "<unset>"}, "EMAIL_OAUTH2_TOKEN_KEY: required"),
        ({"EMAIL_OAUTH2_TOKEN_KEY": "not-a-key-but-secret"}, "EMAIL_OAUTH2_TOKEN_KEY: not a Fernet key"),
        (
            {
                "EMAIL_OAUTH2_PROVIDER": "custom",
                "EMAIL_IMAP_HOST": "imap.example.org",
                "EMAIL_IMAP_PORT": "993",
                "EMAIL_SMTP_HOST": "smtp.example.org",
                "EMAIL_SMTP_PORT": "587",
            },
            "EMAIL_OAUTH2_TOKEN_URL: required",
        ),
        ({"EMAIL_OAUTH2_PROVIDER": "custom"}, "EMAIL_IMAP_HOST: missing"),
        (
            {"EMAIL_OAUTH2_PROVIDER": "custom", "EMAIL_OAUTH2_TOKEN_URL": "http://idp.example/token"},
            "EMAIL_OAUTH2_TOKEN_URL: must be an https:// URL",
        ),
        ({"EMAIL_OAUTH2_FLOW": "client_credentials"}, "EMAIL_OAUTH2_CLIENT_SECRET: required"),
        (
            {"EMAIL_OAUTH2_FLOW": "client_credentials", "EMAIL_OAUTH2_CLIENT_SECRET": CLIENT_SECRET},
            "EMAIL_OAUTH2_TENANT: app-only access needs your directory",
        ),
        (
            {"EMAIL_OAUTH2_PROVIDER": "google", "EMAIL_OAUTH2_FLOW": "client_credentials"},
            "EMAIL_OAUTH2_FLOW: google has no client_credentials",
        ),
        (
            {
                "EMAIL_OAUTH2_FLOW": "client_credentials",
                "EMAIL_OAUTH2_CLIENT_SECRET": CLIENT_SECRET,
                "EMAIL_OAUTH2_TENANT": "contoso.example",
                "EMAIL_OAUTH2_REFRESH_TOKEN": REFRESH,
            },
            "EMAIL_OAUTH2_REFRESH_TOKEN: not used",
        ),
        ({"EMAIL_OAUTH2_FLOW": "implicit"}, "EMAIL_OAUTH2_FLOW: "),
        ({"EMAIL_AUTH": "kerberos"}, "EMAIL_AUTH: "),
        ({"EMAIL_AUTH": "password"}, "EMAIL_PASSWORD: missing"),
    ],
)
def test_wrong_combinations_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        settings(monkeypatch, oauth2(**values))
    message = str(refused.value)
    assert variable in message
    assert "\n" not in message and "not-a-key-but-secret" not in message and CLIENT_SECRET not in message


def test_bad_combination_stops_the_daemon_with_exit_78(tmp_path: Path) -> None:
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("EMAIL_")}
    env.update(oauth2(EMAIL_OAUTH2_CLIENT_ID="<unset>", STATE_DIR=str(tmp_path), LOG_FILE_ENABLED="false"))
    env = {key: value for key, value in env.items() if value != "<unset>"}
    result = subprocess.run(
        [sys.executable, "-m", "prod.run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    assert "EMAIL_OAUTH2_CLIENT_ID: required with EMAIL_AUTH=oauth2" in result.stdout + result.stderr


def test_check_config_masks_the_oauth2_secrets(tmp_path: Path) -> None:
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("EMAIL_")}
    env.update(oauth2(EMAIL_OAUTH2_CLIENT_SECRET=CLIENT_SECRET, EMAIL_OAUTH2_REFRESH_TOKEN=REFRESH))
    result = subprocess.run(
        [sys.executable, "-m", "emailops", "check-config", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    for name in ("EMAIL_OAUTH2_CLIENT_SECRET", "EMAIL_OAUTH2_REFRESH_TOKEN", "EMAIL_OAUTH2_TOKEN_KEY"):
        assert shown[name] == "**********"
    assert shown["EMAIL_AUTH"] == "oauth2" and shown["EMAIL_IMAP_HOST"] == "outlook.office365.com"
    for secret in (CLIENT_SECRET, REFRESH, TOKEN_KEY):
        assert secret not in result.stdout + result.stderr


def test_new_key_prints_a_usable_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emailops", "auth", "new-key"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    Fernet(result.stdout.strip().encode())


def test_every_sign_in_setting_is_documented_with_its_default() -> None:
    """README's settings table and .env.example list each EMAIL_AUTH / EMAIL_OAUTH2_* setting, and
    both show the default of those that have one."""
    fields = {
        name: field
        for name, field in RuntimeSettings.model_fields.items()
        if name == "email_auth" or name.startswith("email_oauth2_")
    }
    assert len(fields) == 12
    readme = (REPO / "README.md").read_text()
    example = (REPO / ".env.example").read_text()
    for name, field in fields.items():
        variable = name.upper()
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{variable}` |")]
        assert len(rows) == 1, variable
        assert re.search(rf"^(# )?{variable}=", example, re.MULTILINE), variable
        default = getattr(field.default, "value", field.default)
        if default not in (None, "", ()):
            assert rows[0].split("|")[2].strip() == f"`{default}`", variable
            assert re.search(rf"^{variable}={default}$", example, re.MULTILINE), variable
