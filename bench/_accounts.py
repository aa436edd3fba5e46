"""Accounts of the index for the benchmarks: private Dovecot users that ``prod.run`` serves from
the index (no ``EMAIL_*``), added with ``emailops accounts import`` as an operator would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from emailops.auth.crypto import new_key
from localmail.dovecot import LocalDovecot


def user(n: int) -> str:
    return f"box{n:04d}@example.test"


def index_users(count: int) -> dict[str, str]:
    """Username -> password of ``count`` Dovecot users, the accounts of ``accounts_file``."""
    return {user(n): f"pw-{n:04d}" for n in range(count)}


def accounts_file(
    path: Path, dovecot: LocalDovecot, count: int, folders: list[str], smtp_port: int = 2525
) -> Path:
    """An ``[[accounts]]`` file of ``count`` accounts ``box0000``..., each signing in to the
    Dovecot and to SMTP on loopback ``smtp_port`` with its own username and password."""
    folder_list = ", ".join(f'"{folder}"' for folder in folders)
    tables = [
        f'[[accounts]]\nname = "{name.partition("@")[0]}"\nusername = "{name}"\npassword = "{password}"\n'
        f'imap_host = "{dovecot.host}"\nimap_port = {dovecot.imap_port}\nimap_security = "none"\n'
        f'smtp_host = "127.0.0.1"\nsmtp_port = {smtp_port}\nsmtp_security = "none"\n'
        f"folders = [{folder_list}]\n"
        for name, password in index_users(count).items()
    ]
    path.write_text("\n".join(tables), encoding="utf-8")
    return path


def index_accounts_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the ``EMAIL_*`` account, with a fresh ``SECRETS_KEY`` for the stored passwords."""
    return {key: value for key, value in env.items() if not key.startswith("EMAIL_")} | {
        "SECRETS_KEY": new_key()
    }


def import_accounts(env: Mapping[str, str], cwd: Path, path: Path) -> None:
    """``emailops accounts import PATH`` into the index of ``env``; stops the bench if it fails."""
    imported = subprocess.run(
        [sys.executable, "-m", "emailops", "accounts", "import", str(path)],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if imported.returncode != 0:
        raise SystemExit(f"accounts import failed: {imported.stderr}")
