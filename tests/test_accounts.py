"""Accounts in the index: ``emailops accounts`` as an operator runs it, on SQLite and PostgreSQL,
with secrets encrypted at rest, and the commands that act on one account's data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from emailops.accounts.store import get_account, import_accounts, rotate_secrets
from emailops.audit import Actor
from emailops.auth.crypto import SecretCipher, WrongKeyError, new_key
from emailops.store.schema import accounts, audit_log
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay
from prod.runtime_settings import ConfigError, RuntimeSettings
from tests.index_helpers import ALICE, daemon_env, index_engine, message

REPO = Path(__file__).resolve().parents[1]
SUPPORT_PASSWORD = "support-imap-pass-0xC0FFEE"
ACTOR = Actor(name="cli:test", role="admin")

THREE_MAILBOXES = f"""
[[accounts]]
name = "support"
username = "support@example.org"
password_env = "SUPPORT_PASSWORD"
imap_host = "imap.example.org"
imap_port = 993
smtp_host = "smtp.example.org"
smtp_port = 587
folders = ["INBOX", "Escalations"]

[[accounts]]
name = "sales"
username = "sales@contoso.example"
auth = "oauth2"
oauth2_provider = "microsoft"
oauth2_client_id = "00000000-0000-0000-0000-000000000001"
oauth2_tenant = "contoso.example"

[[accounts]]
name = "gmail"
username = "team@gmail.example"
password = "{SUPPORT_PASSWORD}-gmail"
imap_host = "imap.gmail.com"
imap_port = 993
smtp_host = "smtp.gmail.com"
smtp_port = 465
never_reply_to = ["*@noreply.example"]
"""


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def index_only_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """No EMAIL_* at all: the accounts live in the index."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "SENTRY_"))}
    env.pop("SECRETS_KEY", None)
    env.update(
        {
            "INDEX_DB_URL": db_url,
            "SECRETS_KEY": new_key(),
            "SUPPORT_PASSWORD": SUPPORT_PASSWORD,
            "STATE_DIR": str(tmp_path / "state"),
            "CACHE_DIR": str(tmp_path / "cache"),
            "LOG_FILE_ENABLED": "false",
            "RULES_FILE": str(tmp_path / "rules.toml"),
            "ENV": "test",
        }
    )
    return env


def write(tmp_path: Path, text: str, name: str = "accounts.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_import_twice_changes_nothing_the_second_time_and_stores_no_plaintext(
    index_only_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path, THREE_MAILBOXES)
    first = run(index_only_env, "accounts", "import", str(path), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changes"] == 3
    second = run(index_only_env, "accounts", "import", str(path), "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {
        "added": [],
        "changed": [],
        "unchanged": ["support", "sales", "gmail"],
        "changes": 0,
    }
    engine = index_engine(db_url)
    with engine.connect() as conn:
        rows = {row.name: row for row in conn.execute(select(accounts))}
        actions = conn.execute(select(audit_log.c.action, audit_log.c.target)).all()
    assert sorted(actions) == [("account.add", "gmail"), ("account.add", "sales"), ("account.add", "support")]
    # A copy of the database holds the passwords only encrypted.
    raw = b"".join(bytes(row.password or b"") for row in rows.values())
    assert rows["support"].password and SUPPORT_PASSWORD.encode() not in raw
    assert rows["sales"].password is None and rows["sales"].imap_host == "outlook.office365.com"
    assert rows["gmail"].smtp_security == "ssl" and rows["gmail"].never_reply_to == ["*@noreply.example"]
    cipher = SecretCipher([index_only_env["SECRETS_KEY"]])
    with engine.connect() as conn:
        support = get_account(conn, "support", cipher)
    assert support is not None and support.password == SUPPORT_PASSWORD
    assert (
        support.folders == ("INBOX", "Escalations")
        and support.index_key == "support@example.org@imap.example.org"
    )

    # A changed value is one change, audited without the secret.
    path.write_text(THREE_MAILBOXES.replace('"Escalations"', '"Escalated"'), encoding="utf-8")
    third = run(index_only_env, "accounts", "import", str(path), "--json")
    assert json.loads(third.stdout)["changed"] == ["support"]
    listing = run(index_only_env, "accounts", "show", "support", "--json")
    shown = json.loads(listing.stdout)
    assert shown["password"] == "**********" and shown["folders"] == ["INBOX", "Escalated"]
    assert SUPPORT_PASSWORD not in listing.stdout + listing.stderr


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('colour = "blue"', "account 'broken': colour: unknown key"),
        ('imap_port = "imap"', "account 'broken': imap_port: must be a whole number"),
        ('imap_security = "tls"', "account 'broken': imap_security: must be one of ssl, starttls, none"),
        ('auth = "oauth2"\noauth2_provider = "custom"', "account 'broken': oauth2_client_id: required"),
        ('name = "support"', "account 'support': name: given twice"),
        ('username = "support@example.org"\nimap_host = "imap.example.org"', "is already account 'support'"),
    ],
)
def test_a_bad_account_names_account_and_key_and_nothing_is_applied(
    index_only_env: dict[str, str], db_url: str, tmp_path: Path, table: str, expected: str
) -> None:
    overridden = {line.split(" = ")[0] for line in table.splitlines()}
    base = {
        "name": '"broken"',
        "username": '"broken@example.org"',
        "password": '"pw"',
        "imap_host": '"imap.example.net"',
        "imap_port": "993",
        "smtp_host": '"smtp.example.net"',
        "smtp_port": "587",
    }
    lines = [f"{key} = {value}" for key, value in base.items() if key not in overridden]
    good = THREE_MAILBOXES.split("[[accounts]]")[1]
    path = write(tmp_path, f"[[accounts]]{good}\n[[accounts]]\n" + "\n".join([*lines, table]) + "\n")
    result = run(index_only_env, "accounts", "import", str(path))
    assert result.returncode == 1
    assert expected in result.stderr and "nothing was imported" in result.stderr
    with index_engine(db_url).connect() as conn:
        assert conn.execute(select(accounts.c.name)).all() == []


def test_a_password_to_store_without_secrets_key_is_an_error_naming_it(
    index_only_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    env = {key: value for key, value in index_only_env.items() if key != "SECRETS_KEY"}
    result = run(env, "accounts", "import", str(write(tmp_path, THREE_MAILBOXES)))
    assert result.returncode == 1
    assert "SECRETS_KEY: required" in result.stderr and "account 'support'" in result.stderr
    with index_engine(db_url).connect() as conn:
        assert conn.execute(select(accounts.c.name)).all() == []


def test_rotating_the_key_reencrypts_every_secret(index_only_env: dict[str, str], db_url: str) -> None:
    from emailops.accounts.fields import AccountDefaults, accounts_from_file

    old, new = SecretCipher([old_key := new_key()]), new_key()
    configs = accounts_from_file(
        __import__("tomllib").loads(THREE_MAILBOXES),
        AccountDefaults(),
        {"SUPPORT_PASSWORD": SUPPORT_PASSWORD},
    )
    engine = index_engine(db_url)
    import_accounts(engine, configs, old, actor=ACTOR)
    both = SecretCipher([new, old_key])
    with engine.connect() as conn:
        assert get_account(conn, "support", both).password == SUPPORT_PASSWORD  # type: ignore[union-attr]
        with pytest.raises(WrongKeyError):
            get_account(conn, "support", SecretCipher([new]))
    env = index_only_env | {"SECRETS_KEY": f"{new},{old_key}"}
    rotated = run(env, "accounts", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert "2 stored secret(s)" in rotated.stderr
    with engine.connect() as conn:
        assert get_account(conn, "gmail", SecretCipher([new])).password == f"{SUPPORT_PASSWORD}-gmail"  # type: ignore[union-attr]
        with pytest.raises(WrongKeyError):
            get_account(conn, "support", old)
    assert rotate_secrets(engine, SecretCipher([new]), actor=ACTOR) == 2


def test_commands_that_read_the_index_need_only_its_url(
    index_only_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        key: value for key, value in index_only_env.items() if key not in ("SECRETS_KEY", "SUPPORT_PASSWORD")
    }
    added = run(
        index_only_env,
        "accounts",
        "add",
        "support",
        "--username",
        "support@example.org",
        "--imap-host",
        "imap.example.org",
        "--imap-port",
        "993",
        "--smtp-host",
        "smtp.example.org",
        "--smtp-port",
        "587",
        "--password-stdin",
        stdin=SUPPORT_PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    for args in (
        ("search", "otter"),
        ("stats", "--json"),
        ("outbox", "list"),
        ("quarantine",),
        ("llm", "list"),
        ("audit",),
        ("accounts", "list", "--json"),
    ):
        result = run(env, *args)
        assert result.returncode == 0, (args, result.stderr)
    listed = json.loads(run(env, "accounts", "list", "--json").stdout)
    assert [(a["name"], a["state"], a["messages"]) for a in listed] == [("support", "ok", 0)]
    assert run(env, "accounts", "disable", "support").returncode == 0
    assert json.loads(run(env, "accounts", "list", "--json").stdout)[0]["state"] == "disabled"


def test_with_several_accounts_a_command_needs_account(
    dovecot: LocalDovecot, index_only_env: dict[str, str], tmp_path: Path
) -> None:
    env = daemon_env(dovecot, tmp_path) | {
        key: index_only_env[key] for key in ("INDEX_DB_URL", "SECRETS_KEY", "SUPPORT_PASSWORD")
    }
    assert run(env, "accounts", "import", str(write(tmp_path, THREE_MAILBOXES))).returncode == 0
    several = run(env, "stats")
    assert several.returncode == 2
    assert f"several accounts ({ALICE}, gmail, sales, support)" in several.stderr
    unknown = run(env, "search", "--account", "nobody", "otter")
    assert unknown.returncode == 2 and "no account 'nobody'" in unknown.stderr
    assert run(env, "stats", "--account", ALICE).returncode == 0


def test_test_signs_in_and_remove_deletes_the_accounts_rows(
    dovecot: LocalDovecot, smtp_relay: LocalSmtpRelay, index_only_env: dict[str, str], tmp_path: Path
) -> None:
    dovecot.append(ALICE, "INBOX", message(1, body="otter"))
    mailbox = f"""
[[accounts]]
name = "alice"
username = "{ALICE}"
password_env = "ALICE_PASSWORD"
imap_host = "{dovecot.host}"
imap_port = {dovecot.imap_port}
imap_security = "none"
smtp_host = "{smtp_relay.host}"
smtp_port = {smtp_relay.port}
smtp_security = "none"
"""
    env = index_only_env | {"ALICE_PASSWORD": dovecot.password(ALICE)}
    assert run(env, "accounts", "import", str(write(tmp_path, mailbox))).returncode == 0
    good = run(env, "accounts", "test", "alice")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "folders: " in good.stdout and "INBOX" in good.stdout and "SMTP" in good.stdout

    synced = run(env, "sync", "--once", "--account", "alice", "--json")
    assert synced.returncode == 0, synced.stderr
    assert json.loads(run(env, "accounts", "list", "--json").stdout)[0]["messages"] == 1
    assert "otter" in run(env, "search", "otter", "--output", "json").stdout

    wrong = env | {"ALICE_PASSWORD": "not-the-password"}
    assert run(wrong, "accounts", "import", str(write(tmp_path, mailbox))).returncode == 0
    refused = run(wrong, "accounts", "test", "alice")
    assert refused.returncode == 1
    assert "IMAP" in refused.stdout and "AUTHENTICATIONFAILED" in refused.stdout
    assert "SMTP" in refused.stdout and "535" in refused.stdout

    asked = run(env, "accounts", "remove", "alice")
    assert asked.returncode == 2
    assert "1 folders, 1 messages, 0 outbox replies" in asked.stderr
    removed = run(env, "accounts", "remove", "alice", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(run(env, "accounts", "list", "--json").stdout) == []
    assert run(env, "audit", "--action", "account.remove").stdout.count("account.remove") == 1


RULES_FOR_SUPPORT = """
[[rules]]
name = "support only"
[rules.match]
accounts = ["support"]
subject = "help"
[rules.actions]
flag = true

[[rules]]
name = "everyone"
[rules.match]
subject = "help"
[rules.actions]
flag = true
"""


def test_a_rule_naming_accounts_applies_to_those_only(tmp_path: Path) -> None:
    from emailops.mime.parse import parse_message
    from emailops.rules import load_rules
    from emailops.rules.matching import matching_rules

    rules = load_rules(write(tmp_path, RULES_FOR_SUPPORT, "rules.toml"))
    parsed = parse_message(b"From: a@example.org\r\nSubject: help\r\n\r\nplease\r\n")
    assert [r.name for r in matching_rules(rules, parsed, "INBOX", "support")] == ["support only", "everyone"]
    assert [r.name for r in matching_rules(rules, parsed, "INBOX", "sales")] == ["everyone"]


def test_rules_check_rejects_an_account_name_that_is_no_account(
    index_only_env: dict[str, str], tmp_path: Path
) -> None:
    assert run(index_only_env, "accounts", "import", str(write(tmp_path, THREE_MAILBOXES))).returncode == 0
    good = run(index_only_env, "rules", "check", str(write(tmp_path, RULES_FOR_SUPPORT, "rules.toml")))
    assert good.returncode == 0, good.stderr
    typo = write(tmp_path, RULES_FOR_SUPPORT.replace('["support"]', '["suport"]'), "typo.toml")
    refused = run(index_only_env, "rules", "check", str(typo))
    assert refused.returncode == 1
    assert "match.accounts: 'suport' is no account (accounts: gmail, sales, support)" in refused.stderr


def _settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> RuntimeSettings:
    monkeypatch.chdir(REPO / "tests")  # no .env here
    for key in list(os.environ):
        if key.startswith(("EMAIL_", "SECRETS_KEY")):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return RuntimeSettings.from_env()


MAILBOX = {
    "EMAIL_IMAP_HOST": "imap.example.org",
    "EMAIL_IMAP_PORT": "993",
    "EMAIL_SMTP_HOST": "smtp.example.org",
    "EMAIL_SMTP_PORT": "587",
    "EMAIL_USERNAME": "ops@example.org",
    "EMAIL_PASSWORD": "pw",
}


def test_the_email_settings_are_one_account_named_by_email_account_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(monkeypatch, **MAILBOX, EMAIL_FOLDERS="INBOX,Support", SENT_FOLDER="Gesendet")
    account = settings.default_account()
    assert account.name == "ops@example.org" and account.password == "pw"
    deployment = settings.deployment()
    # The index key is what the index's rows carry today: existing indexes stay the account's.
    assert account.sync_config(deployment).account == "ops@example.org@imap.example.org"
    assert account.sync_config(deployment).folders == ("INBOX", "Support")
    assert account.reply_config(deployment).sent_folder == "Gesendet"
    assert account.imap_config(deployment).port == 993 and account.smtp_config(deployment).port == 587
    assert settings.imap_config() == account.imap_config(deployment)
    named = _settings(monkeypatch, **MAILBOX, EMAIL_ACCOUNT_NAME="ops")
    assert named.default_account().name == "ops"
    assert named.default_account().index_key == account.index_key


def test_email_settings_are_optional_but_required_together(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _settings(monkeypatch).has_default_account
    with pytest.raises(ConfigError) as partial:
        _settings(monkeypatch, EMAIL_USERNAME="ops@example.org")
    assert "EMAIL_IMAP_HOST: missing (required)" in str(partial.value)
    assert "EMAIL_PASSWORD: missing (required)" in str(partial.value)
    with pytest.raises(ConfigError) as differ:
        _settings(monkeypatch, SECRETS_KEY=new_key(), EMAIL_OAUTH2_TOKEN_KEY=new_key())
    assert "SECRETS_KEY: EMAIL_OAUTH2_TOKEN_KEY, its old name, is set to another value" in str(differ.value)
    key = new_key()
    assert _settings(monkeypatch, EMAIL_OAUTH2_TOKEN_KEY=key).secret_keys() == (key,)
    assert _settings(monkeypatch, SECRETS_KEY=f"{key}, {new_key()}").secret_keys()[0] == key


def test_each_account_syncs_and_finds_its_own_mail_only(
    dovecot: LocalDovecot, index_only_env: dict[str, str], tmp_path: Path
) -> None:
    bob = "bob@example.test"
    dovecot.append(ALICE, "INBOX", message(1, body="otter"))
    dovecot.append(bob, "INBOX", message(1, body="badger"))
    tables = "".join(
        f"""
[[accounts]]
name = "{name}"
username = "{user}"
password_env = "{name.upper()}_PASSWORD"
imap_host = "{dovecot.host}"
imap_port = {dovecot.imap_port}
imap_security = "none"
smtp_host = "127.0.0.1"
smtp_port = 2525
smtp_security = "none"
"""
        for name, user in (("alice", ALICE), ("bob", bob))
    )
    env = index_only_env | {"ALICE_PASSWORD": dovecot.password(ALICE), "BOB_PASSWORD": dovecot.password(bob)}
    assert run(env, "accounts", "import", str(write(tmp_path, tables))).returncode == 0
    for name in ("alice", "bob"):
        synced = run(env, "sync", "--once", "--account", name)
        assert synced.returncode == 0, synced.stderr

    def found(name: str, query: str) -> int:
        return len(json.loads(run(env, "search", query, "--account", name, "--json").stdout))

    assert (found("alice", "otter"), found("alice", "badger")) == (1, 0)
    assert (found("bob", "otter"), found("bob", "badger")) == (0, 1)
    assert run(env, "accounts", "remove", "bob", "--yes").returncode == 0
    listed = json.loads(run(env, "accounts", "list", "--json").stdout)
    assert [(a["name"], a["messages"]) for a in listed] == [("alice", 1)]
    assert found("alice", "otter") == 1
