"""The ``accounts`` table: one function per action, called by the command line and the console.

Each change is made and recorded in the audit log in one transaction, with the ``Actor`` who made
it; ``before``/``after`` carry the account's keys, never a secret (only which secrets changed).
Secrets are encrypted with the ``SecretCipher`` of SECRETS_KEY; reading an account's
configuration without one leaves its secrets empty (enough for everything but signing in).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update

from emailops.accounts.config import AccountConfig, Endpoint, OAuth2Options
from emailops.accounts.fields import AccountError
from emailops.audit import Actor, Change, record, record_many
from emailops.auth.crypto import SecretCipher
from emailops.clock import Clock, utc_now
from emailops.config import OAuth2Flow, TlsSecurity
from emailops.store import fulltext
from emailops.store.dialect import locking
from emailops.store.folders import live_lease
from emailops.store.schema import accounts, folders, llm_calls, llm_jobs, messages, oauth2_tokens, outbox

MASK = "**********"
SECRET_COLUMNS = ("password", "oauth2_client_secret", "oauth2_refresh_token")
# Columns of the table that are neither secrets nor times: what a change is compared on.
_PLAIN_COLUMNS = tuple(
    column.name
    for column in accounts.columns
    if column.name not in (*SECRET_COLUMNS, "created_at", "updated_at")
)


class SecretsKeyMissingError(AccountError):
    """A secret must be stored or read and SECRETS_KEY is not set."""


@dataclass(frozen=True)
class ImportResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.added) + len(self.changed)


def secrets_key_missing(name: str) -> SecretsKeyMissingError:
    return SecretsKeyMissingError(
        f"account {name!r}: SECRETS_KEY: required to store or read the account's password or OAuth2 "
        "secrets (encrypted in the index; `emailops auth new-key` prints a key)"
    )


def _secrets(config: AccountConfig) -> dict[str, str | None]:
    oauth2 = config.oauth2
    return {
        "password": config.password or None,
        "oauth2_client_secret": oauth2.client_secret if oauth2 else None,
        "oauth2_refresh_token": oauth2.refresh_token if oauth2 else None,
    }


def masked_secrets(config: AccountConfig) -> dict[str, str | None]:
    """Each secret column: ``MASK`` when the configuration holds a value, else None."""
    return {column: MASK if value else None for column, value in _secrets(config).items()}


def plain_values(config: AccountConfig) -> dict[str, Any]:
    oauth2 = config.oauth2
    return {
        "name": config.name,
        "username": config.username,
        "auth": config.auth,
        "imap_host": config.imap.host,
        "imap_port": config.imap.port,
        "imap_security": config.imap.security.value,
        "smtp_host": config.smtp.host,
        "smtp_port": config.smtp.port,
        "smtp_security": config.smtp.security.value,
        "folders": list(config.folders),
        "idle_folders": config.idle_folders,
        "from_address": config.from_address,
        "drafts_folder": config.drafts_folder,
        "sent_folder": config.sent_folder,
        "never_reply_to": list(config.never_reply_to),
        "enabled": config.enabled,
        "oauth2_provider": oauth2.provider if oauth2 else None,
        "oauth2_flow": oauth2.flow.value if oauth2 else None,
        "oauth2_client_id": oauth2.client_id if oauth2 else None,
        "oauth2_tenant": oauth2.tenant if oauth2 else None,
        "oauth2_token_url": oauth2.token_url if oauth2 else None,
        "oauth2_device_url": oauth2.device_url if oauth2 else None,
        "oauth2_authorize_url": oauth2.authorize_url if oauth2 else None,
        "oauth2_scopes": list(oauth2.scopes) if oauth2 else None,
    }


def account_config(row: Any, cipher: SecretCipher | None) -> AccountConfig:
    """The configuration a row holds; without a cipher, its secrets are left empty."""

    def secret(column: str) -> str | None:
        stored = getattr(row, column)
        if stored is None or cipher is None:
            return None
        return cipher.decrypt(stored)

    oauth2 = None
    if row.auth == "oauth2":
        oauth2 = OAuth2Options(
            provider=row.oauth2_provider,
            client_id=row.oauth2_client_id or "",
            flow=OAuth2Flow(row.oauth2_flow),
            client_secret=secret("oauth2_client_secret"),
            tenant=row.oauth2_tenant or "",
            refresh_token=secret("oauth2_refresh_token"),
            token_url=row.oauth2_token_url or "",
            device_url=row.oauth2_device_url or "",
            authorize_url=row.oauth2_authorize_url or "",
            scopes=tuple(row.oauth2_scopes or ()),
        )
    return AccountConfig(
        name=row.name,
        username=row.username,
        password=secret("password") or "",
        imap=Endpoint(row.imap_host, row.imap_port, TlsSecurity(row.imap_security)),
        smtp=Endpoint(row.smtp_host, row.smtp_port, TlsSecurity(row.smtp_security)),
        oauth2=oauth2,
        folders=tuple(row.folders),
        idle_folders=row.idle_folders,
        from_address=row.from_address,
        drafts_folder=row.drafts_folder,
        sent_folder=row.sent_folder,
        never_reply_to=tuple(row.never_reply_to),
        enabled=bool(row.enabled),
    )


def list_accounts(conn: Connection, cipher: SecretCipher | None = None) -> list[AccountConfig]:
    return [account_config(row, cipher) for row in conn.execute(select(accounts).order_by(accounts.c.name))]


def get_account(conn: Connection, name: str, cipher: SecretCipher | None = None) -> AccountConfig | None:
    row = conn.execute(select(accounts).where(accounts.c.name == name)).one_or_none()
    return None if row is None else account_config(row, cipher)


def describe(conn: Connection, name: str) -> dict[str, Any] | None:
    """The stored keys of an account, secrets masked (``MASK`` when one is stored, else None)."""
    row = conn.execute(select(accounts).where(accounts.c.name == name)).one_or_none()
    if row is None:
        return None
    values = {column: getattr(row, column) for column in _PLAIN_COLUMNS}
    values |= {column: MASK if getattr(row, column) is not None else None for column in SECRET_COLUMNS}
    return values | {"created_at": row.created_at, "updated_at": row.updated_at}


def import_accounts(
    engine: Engine,
    configs: Sequence[AccountConfig],
    cipher: SecretCipher | None,
    *,
    actor: Actor,
    clock: Clock = utc_now,
) -> ImportResult:
    """Add or update each account by name, in one transaction: all of them, or nothing (an
    ``AccountError`` says which account and why). An account whose keys and secrets are what is
    stored is left alone, so importing the same file twice changes nothing."""
    result = ImportResult()
    changes: list[Change] = []
    with engine.begin() as conn:
        stored = {row.name: row for row in conn.execute(locking(conn, select(accounts)))}
        _check_mailboxes(configs, stored.values())
        now = clock()
        inserts: list[dict[str, Any]] = []
        for config in configs:
            row = stored.get(config.name)
            plain = plain_values(config)
            secrets = _stored_secrets(config, row, cipher)
            if row is None:
                inserts.append(plain | secrets | {"created_at": now, "updated_at": now})
                result.added.append(config.name)
                continue
            before = {column: getattr(row, column) for column in _PLAIN_COLUMNS}
            new_secrets = [column for column, value in secrets.items() if value != getattr(row, column)]
            if before == plain and not new_secrets:
                result.unchanged.append(config.name)
                continue
            conn.execute(
                update(accounts)
                .where(accounts.c.name == config.name)
                .values(plain | secrets | {"updated_at": now})
            )
            changes.append(
                Change(
                    "account.change",
                    config.name,
                    before={k: v for k, v in before.items() if v != plain[k]},
                    after={k: v for k, v in plain.items() if v != before[k]}
                    | {"secrets_changed": new_secrets},
                )
            )
            result.changed.append(config.name)
        if inserts:
            conn.execute(accounts.insert(), inserts)
        for values in inserts:
            after = {k: v for k, v in values.items() if k in _PLAIN_COLUMNS}
            changes.append(Change("account.add", values["name"], after=after))
        record_many(conn, actor, changes)
    return result


def _check_mailboxes(configs: Sequence[AccountConfig], stored: Iterable[Any]) -> None:
    """Two accounts for one mailbox (username and IMAP host) would share its index rows."""
    names = {config.name for config in configs}
    owner = {(row.username, row.imap_host): row.name for row in stored if row.name not in names}
    for config in configs:
        key = (config.username, config.imap.host)
        other = owner.setdefault(key, config.name)
        if other != config.name:
            raise AccountError(
                f"account {config.name!r}: username: {config.username} on {config.imap.host} is "
                f"already account {other!r}"
            )


def _stored_secrets(config: AccountConfig, row: Any, cipher: SecretCipher | None) -> dict[str, bytes | None]:
    """Each secret as it is to be stored: the stored ciphertext itself when it holds the same
    value (so that nothing changes), else the value encrypted with the first key."""
    values: dict[str, bytes | None] = {}
    for column, value in _secrets(config).items():
        stored = getattr(row, column) if row is not None else None
        if value is None:
            values[column] = None
            continue
        if cipher is None:
            raise secrets_key_missing(config.name)
        values[column] = (
            stored if stored is not None and cipher.decrypt(stored) == value else cipher.encrypt(value)
        )
    return values


def set_enabled(engine: Engine, name: str, enabled: bool, *, actor: Actor, clock: Clock = utc_now) -> bool:
    """Enable or disable an account; False when it already was (nothing recorded)."""
    with engine.begin() as conn:
        row = conn.execute(
            locking(conn, select(accounts.c.enabled).where(accounts.c.name == name))
        ).one_or_none()
        if row is None:
            raise AccountError(f"no account {name!r}")
        if bool(row.enabled) == enabled:
            return False
        conn.execute(
            update(accounts).where(accounts.c.name == name).values(enabled=enabled, updated_at=clock())
        )
        action = "account.enable" if enabled else "account.disable"
        record(conn, actor, action, name, before={"enabled": not enabled}, after={"enabled": enabled})
    return True


def account_data(conn: Connection, index_key: str) -> dict[str, int]:
    """How many rows of the index belong to the mailbox, by what they are."""
    folder_ids = select(folders.c.id).where(folders.c.account == index_key).scalar_subquery()

    def count(table: Any, where: Any) -> int:
        return int(conn.execute(select(func.count()).select_from(table).where(where)).scalar_one())

    return {
        "folders": count(folders, folders.c.account == index_key),
        "messages": count(messages, messages.c.folder_id.in_(folder_ids)),
        "outbox replies": count(outbox, outbox.c.account == index_key),
        "model jobs": count(llm_jobs, llm_jobs.c.account == index_key),
        "model calls": count(llm_calls, llm_calls.c.account == index_key),
        "OAuth2 tokens": count(oauth2_tokens, oauth2_tokens.c.account == index_key),
    }


def remove_account(engine: Engine, name: str, *, actor: Actor) -> dict[str, int]:
    """Delete the account and all its rows in the index (``account_data``); return what was
    deleted. Refused (``IndexInUseError``, nothing changed) while a daemon watches it."""
    from emailops.maintenance import IndexInUseError

    with engine.begin() as conn:
        row = conn.execute(locking(conn, select(accounts).where(accounts.c.name == name))).one_or_none()
        if row is None:
            raise AccountError(f"no account {name!r}")
        key = account_config(row, None).index_key
        lease = live_lease(conn, key)
        if lease is not None:
            raise IndexInUseError(lease)
        counts = account_data(conn, key)
        folder_ids = select(folders.c.id).where(folders.c.account == key).scalar_subquery()
        # Jobs before the outbox they point at; messages (their attachments and quarantine entries
        # by cascade) before their folders.
        conn.execute(delete(llm_jobs).where(llm_jobs.c.account == key))
        conn.execute(delete(llm_calls).where(llm_calls.c.account == key))
        conn.execute(delete(outbox).where(outbox.c.account == key))
        conn.execute(delete(messages).where(messages.c.folder_id.in_(folder_ids)))
        conn.execute(delete(folders).where(folders.c.account == key))
        conn.execute(delete(oauth2_tokens).where(oauth2_tokens.c.account == key))
        conn.execute(delete(accounts).where(accounts.c.name == name))
        if counts["messages"]:
            fulltext.rebuild(conn)
        record(conn, actor, "account.remove", name, before={"username": row.username} | counts)
    return counts


def rotate_secrets(engine: Engine, cipher: SecretCipher, *, actor: Actor) -> int:
    """Encrypt every stored secret (accounts' and OAuth2 tokens) again with the first key of
    ``cipher``; return how many values were rewritten. Afterwards the old key can be dropped."""
    rewritten = 0
    with engine.begin() as conn:
        for table, key_column, columns in (
            (accounts, accounts.c.name, SECRET_COLUMNS),
            (oauth2_tokens, oauth2_tokens.c.account, ("refresh_token", "access_token")),
        ):
            for row in conn.execute(locking(conn, select(table))):
                values = {c: cipher.rotate(getattr(row, c)) for c in columns if getattr(row, c) is not None}
                if values:
                    conn.execute(
                        update(table).where(key_column == getattr(row, key_column.name)).values(values)
                    )
                    rewritten += len(values)
        record(conn, actor, "secrets.rotate", None, after={"values": rewritten})
    return rewritten
