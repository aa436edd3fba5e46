"""The index's tables (SQLAlchemy Core). Column meanings are contracts; migrations create them.

Identity of an indexed message is (folder_id, uidvalidity, uid): a folder row is one (account, name),
so every write is idempotent on (account, folder, UIDVALIDITY, UID): a write repeated after a crash,
or made by a second worker, leaves one row per message.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

metadata = MetaData()


def sqlite_datetime(moment: datetime) -> str:
    """How a moment is stored on SQLite, which keeps no time zone: its UTC time as ISO text with
    microseconds (``2024-05-06 09:00:00.000000``), the text SQLAlchemy's SQLite ``DATETIME`` reads
    back. A naive datetime is taken to be in UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.isoformat(" ", "microseconds")[:26]  # without the "+00:00" of an aware moment


def _sqlite_bind(value: datetime | None) -> str | None:
    return None if value is None else sqlite_datetime(value)


class Timestamp(TypeDecorator[datetime]):
    """A moment: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, ``DATETIME`` text on SQLite; read back
    as an aware UTC datetime on both.

    SQLite keeps no time zone, so a value is written there as its UTC time (``sqlite_datetime``):
    SQLAlchemy's own SQLite ``DATETIME`` drops the offset and keeps the wall time, which reads a
    +0200 Date back two hours late. PostgreSQL answers in the session's time zone; both are turned
    into UTC when read. A naive value is taken to be UTC on both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        # Replaces, not precedes, the SQLite DATETIME's own conversion, which takes only datetimes.
        if dialect.name == "sqlite":
            return _sqlite_bind
        return super().bind_processor(dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        # PostgreSQL would take a naive value in the session's time zone; SQLite takes it as UTC.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSON text on SQLite, jsonb on PostgreSQL.
AddressLists = JSON().with_variant(JSONB(), "postgresql")

# SQLite only treats "INTEGER PRIMARY KEY" as the rowid alias; BigInteger elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")

folders = Table(
    "folders",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("name", String(1000), nullable=False),
    Column("uidvalidity", BigInteger),
    Column("uidnext", BigInteger),
    Column("highestmodseq", BigInteger),
    # EXISTS as of the last complete pass: with an unchanged UIDNEXT, an unchanged count proves that
    # nothing was expunged, without counting rows.
    Column("server_count", BigInteger),
    # UIDNEXT when this UIDVALIDITY was first synced: messages below it were there before the
    # daemon and are never answered (issue 4, "mail that was there before").
    Column("baseline_uidnext", BigInteger),
    Column("first_synced_at", Timestamp),
    Column("last_sync_at", Timestamp),
    Column("last_reconcile_at", Timestamp),
    # Which worker watches the folder; a lease that expired may be taken over.
    Column("lease_owner", String(200)),
    Column("lease_expires_at", Timestamp),
    # The fencing token: raised at each change of the lease's holder (see store.folders).
    Column("lease_epoch", BigInteger, nullable=False, default=0, server_default="0"),
    # Attempts to index the folder's next new message (see store.index_work).
    Column("index_attempt_uid", BigInteger),
    Column("index_attempts", Integer, nullable=False, default=0, server_default="0"),
    # When the operator asked for the folder to be synced now ("fetch now"); the worker that
    # watches it syncs it and clears this (see store.folders).
    Column("fetch_requested_at", Timestamp),
    UniqueConstraint("account", "name", name="uq_folders_account_name"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("folder_id", Id, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("message_id", String(1000)),
    Column("subject", Text, nullable=False, default=""),
    Column("from_addr", String(1000), nullable=False, default=""),
    Column("from_name", Text, nullable=False, default=""),
    # Every address of From, To, Cc and Reply-To, as "Name <addr>" joined by ", " (searched only:
    # the addresses themselves are read from address_lists).
    Column("addresses", Text, nullable=False, default=""),
    # The addresses as parsed, name and address apart: {"from": [[name, addr], ...], "to": ...,
    # "cc": ..., "reply-to": ...}, fields without an address left out (see store.content).
    Column("address_lists", AddressLists, nullable=False),
    Column("date", Timestamp),
    Column("internal_date", Timestamp),
    Column("in_reply_to", String(1000)),
    Column("references", Text, nullable=False, default=""),
    Column("list_id", Text),
    Column("auto_submitted", Text),
    Column("thread_key", String(1000), nullable=False, default=""),
    Column("size", BigInteger, nullable=False, default=0),
    # Space-separated IMAP flags as the server reports them.
    Column("flags", Text, nullable=False, default=""),
    Column("modseq", BigInteger),
    # The raw header block (bounded by the parser), decoded when a rule needs it (HeaderBlock).
    Column("header_block", LargeBinary, nullable=False, default=b""),
    Column("body_text", Text, nullable=False, default=""),
    Column("has_attachments", Boolean, nullable=False, default=False),
    Column("truncated", Boolean, nullable=False, default=False),
    # Space-separated parser problems (see emailops.mime.parse).
    Column("problems", Text, nullable=False, default=""),
    Column("indexed_at", Timestamp, nullable=False),
    Column("expunged_at", Timestamp),
    # history: there before the first sync, never answered; pending: rules not yet applied;
    # working: claimed by a worker; done: rules applied (decisions and outbox rows committed in the
    # same transaction); quarantined: the rules kept failing on it (see store.rules_work).
    Column("rules_state", String(16), nullable=False, default="history"),
    # Claims of the rules stage so far (committed before each), and when the last was made.
    Column("rules_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("rules_claimed_at", Timestamp),
    Column("rules_claimed_by", String(200)),
    Column("quarantine_reason", Text),
    UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_messages_folder_uidvalidity_uid"),
)
Index("ix_messages_message_id", messages.c.message_id)
Index("ix_messages_rules_pending", messages.c.rules_state, messages.c.id)
Index("ix_messages_from_addr", messages.c.from_addr)

attachments = Table(
    "attachments",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_pk", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("filename", Text),
    Column("content_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
)
Index("ix_attachments_message_pk", attachments.c.message_pk)

# One automatic reply per (account, inbound message, rule). inbound_key is the inbound Message-ID,
# or "<folder>/<uidvalidity>/<uid>" when it has none.
# Messages indexing kept failing on (it raised, or hung or killed the worker): never indexed, listed
# by `emailops quarantine`.
index_quarantine = Table(
    "index_quarantine",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("folder_id", Id, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("message_id", String(1000)),
    Column("attempts", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("quarantined_at", Timestamp, nullable=False),
    UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_index_quarantine_folder_uid"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("inbound_key", String(1000), nullable=False),
    Column("message_pk", Id, ForeignKey("messages.id", ondelete="SET NULL")),
    Column("rule_name", String(200), nullable=False),
    # send: deliver by SMTP; draft: append to the Drafts folder instead.
    Column("action", String(16), nullable=False, default="send"),
    # pending -> sending -> sent | failed | unknown (a crash while sending); cancelled by the operator.
    Column("state", String(16), nullable=False),
    Column("recipient", String(1000), nullable=False),
    Column("reply_message_id", String(1000), nullable=False),
    Column("subject", Text, nullable=False, default=""),
    Column("raw", LargeBinary, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("next_attempt_at", Timestamp),
    Column("claimed_by", String(200)),
    # When the claim was made, by the database's clock (see store.work_queue).
    Column("claimed_at", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("sent_at", Timestamp),
    # When raw was emptied, REPLY_HISTORY_DAYS after created_at (see store.history); the row stays.
    Column("purged_at", Timestamp),
    UniqueConstraint("account", "inbound_key", "rule_name", name="uq_outbox_inbound_rule"),
)
Index("ix_outbox_state_next", outbox.c.state, outbox.c.next_attempt_at)
# The indexes of the reply limits (replies.limits): per sender (account and recipient both equal,
# so SQLite's planner prefers it to the next one), and the hourly cap of the account.
Index("ix_outbox_account_recipient_created", outbox.c.account, outbox.c.recipient, outbox.c.created_at)
Index("ix_outbox_account_created", outbox.c.account, outbox.c.created_at)
# Rows the history purge has still to look at: only the last REPLY_HISTORY_DAYS, whatever the total.
Index(
    "ix_outbox_unpurged_created",
    outbox.c.created_at,
    sqlite_where=outbox.c.purged_at.is_(None),
    postgresql_where=outbox.c.purged_at.is_(None),
)

# The OAuth2 sign-in of an account, shared by every worker and container (issue 11). Tokens are
# Fernet-encrypted (emailops.auth.crypto); a refresh holds this row locked (FOR UPDATE / BEGIN
# IMMEDIATE), so only one process refreshes at a time and the others use its result.
oauth2_tokens = Table(
    "oauth2_tokens",
    metadata,
    Column("account", String(320), primary_key=True),
    Column("flow", String(32), nullable=False),
    Column("refresh_token", LargeBinary),
    # SHA-256 of the EMAIL_OAUTH2_REFRESH_TOKEN that seeded refresh_token: a new value replaces it once.
    Column("seed_fingerprint", String(64)),
    Column("access_token", LargeBinary),
    Column("access_expires_at", Timestamp),
    Column("refreshed_at", Timestamp),
    # Consecutive failed token requests; none is made before next_attempt_at (no storm when revoked).
    Column("failures", Integer, nullable=False, default=0),
    Column("next_attempt_at", Timestamp),
    # refused (needs the operator) or unavailable (network, 5xx), with the reason (never a token).
    Column("last_error_kind", String(16)),
    Column("last_error", Text),
    Column("last_error_at", Timestamp),
    Column("updated_at", Timestamp, nullable=False),
)

# A reply a language model is asked to write (rules with llm_prompt), one per (account, inbound
# message, rule) like the outbox. The decision records it with everything the call needs; the
# model stage claims it, calls the model and, in the transaction that marks it done, records the
# composed reply in the outbox (outbox_id). See emailops.llm.jobs.
llm_jobs = Table(
    "llm_jobs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("inbound_key", String(1000), nullable=False),
    Column("message_pk", Id, ForeignKey("messages.id", ondelete="SET NULL")),
    Column("rule_name", String(200), nullable=False),
    # send or draft: the outbox action of the reply once written.
    Column("action", String(16), nullable=False),
    # Chosen by the decision from the inbound headers, never by the model.
    Column("recipient", String(1000), nullable=False),
    # The rendered subject of the rule, or NULL for "Re: " plus the inbound subject.
    Column("subject", Text),
    # The rendered prompt (the message text in it already cut to LLM_MAX_INPUT_CHARS).
    Column("prompt", Text, nullable=False),
    Column("model", String(200), nullable=False),
    Column("max_tokens", Integer, nullable=False),
    Column("temperature", Float),
    # pending -> working -> done | failed (reason in last_error); cancelled by the operator.
    Column("state", String(16), nullable=False),
    # Claims so far, counted when claimed (the claim's fencing token).
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("claimed_by", String(200)),
    Column("claimed_at", Timestamp),
    Column("outbox_id", Id, ForeignKey("outbox.id", ondelete="SET NULL")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # When prompt was emptied, REPLY_HISTORY_DAYS after created_at (see store.history).
    Column("purged_at", Timestamp),
    UniqueConstraint("account", "inbound_key", "rule_name", name="uq_llm_jobs_inbound_rule"),
)
Index("ix_llm_jobs_state_next", llm_jobs.c.state, llm_jobs.c.next_attempt_at)
Index(
    "ix_llm_jobs_account_recipient_created", llm_jobs.c.account, llm_jobs.c.recipient, llm_jobs.c.created_at
)
Index("ix_llm_jobs_account_created", llm_jobs.c.account, llm_jobs.c.created_at)
Index(
    "ix_llm_jobs_unpurged_created",
    llm_jobs.c.created_at,
    sqlite_where=llm_jobs.c.purged_at.is_(None),
    postgresql_where=llm_jobs.c.purged_at.is_(None),
)

# One row per model call started, by the database's clock: the hourly budget shared by all workers.
llm_calls = Table(
    "llm_calls",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("started_at", Timestamp, nullable=False),
)
Index("ix_llm_calls_account_started", llm_calls.c.account, llm_calls.c.started_at)

# People who sign in to the operator console (issue 23), managed with `emailops users`. A password
# is stored as an Argon2id hash; an API token as the SHA-256 of the token (never the token itself:
# it is shown once). Roles and what each may do: emailops.users.permissions.
users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False, unique=True),
    # viewer, operator or admin.
    Column("role", String(16), nullable=False),
    Column("password_hash", String(200), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    # Hex SHA-256 of the user's one API token, NULL when none was issued; a new token replaces it.
    Column("token_hash", String(64), unique=True),
    Column("token_created_at", Timestamp),
    Column("password_changed_at", Timestamp, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

# Who changed what (issue 23): append-only, kept when the user it names is removed (so no foreign
# key). Triggers refuse UPDATE and DELETE (migration 17). before/after are JSON, never a secret.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # The database's clock, like leases: the same on every host.
    Column("at", Timestamp, nullable=False),
    # A user's name, or cli:<OS user> for the command line.
    Column("actor", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    # The client's address (the console), NULL for the command line.
    Column("source", String(100)),
    Column("action", String(100), nullable=False),
    Column("target", String(1000)),
    Column("before_json", Text),
    Column("after_json", Text),
)
Index("ix_audit_log_at", audit_log.c.at)

# Versions of the rules file saved from the console (emailops.rules.versions), newest last: the
# file holds the running version, these rows what it was, restorable.
rules_versions = Table(
    "rules_versions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("text", Text, nullable=False),
    # Hex SHA-256 of the text's UTF-8 bytes.
    Column("sha256", String(64), nullable=False),
    Column("author", String(200), nullable=False),
    Column("saved_at", Timestamp, nullable=False),
)

# What each matching rule decided for a message, written with the decision (emailops.replies
# .decision_log): the rules' statistics and a message's story. Deleted REPLY_HISTORY_DAYS after.
rule_decisions = Table(
    "rule_decisions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("message_pk", Id, ForeignKey("messages.id", ondelete="CASCADE")),
    Column("rule_name", String(200), nullable=False),
    # replied, drafted, model (a model writes it), recorded_before, suppressed, matched (no reply).
    Column("outcome", String(32), nullable=False),
    # Why there is no reply (suppressed), else NULL.
    Column("reason", Text),
    Column("outbox_id", Id, ForeignKey("outbox.id", ondelete="SET NULL")),
    Column("llm_job_id", Id, ForeignKey("llm_jobs.id", ondelete="SET NULL")),
    Column("decided_at", Timestamp, nullable=False),
)
Index("ix_rule_decisions_account_decided", rule_decisions.c.account, rule_decisions.c.decided_at)
Index("ix_rule_decisions_message_pk", rule_decisions.c.message_pk)
# The history purge deletes the oldest decisions of every account.
Index("ix_rule_decisions_decided", rule_decisions.c.decided_at)

# Signed-in browser sessions of the operator console (migration 21). The cookie holds a random
# id; only its SHA-256 is stored, so a copy of the database signs nobody in. A row outlives neither
# its idle nor its absolute limit (checked at each request), nor a change of its user's password,
# a disable or a removal (emailops.users.sessions).
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("user_name", String(100), nullable=False),
    # The synchronizer token every form and htmx request of the session carries.
    Column("csrf_token", String(64), nullable=False),
    Column("source", String(100)),
    Column("created_at", Timestamp, nullable=False),
    Column("last_seen_at", Timestamp, nullable=False),
)
Index("ix_console_sessions_user", console_sessions.c.user_name)

# Failed console sign-ins counted per user name and per client address (migration 21), for
# emailops.users.sign_in_throttle. A user name's row may be locked: only an admin lifts that.
sign_in_failures = Table(
    "sign_in_failures",
    metadata,
    # "user" or "source".
    Column("scope", String(8), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("first_failure_at", Timestamp, nullable=False),
    Column("locked", Boolean, nullable=False, default=False),
)

# How each mail account fares (emailops.store.account_state): ok, backoff, auth_failed or disabled,
# the last error (secrets masked), and when it is tried next, read by every worker and the
# healthcheck. Keyed by the account's name alone, no foreign key: the accounts may be configured
# elsewhere. Times come from the database's clock.
account_state = Table(
    "account_state",
    metadata,
    Column("account", String(320), primary_key=True),
    Column("state", String(16), nullable=False),
    # Consecutive failures since the last successful sync: the backoff grows with it.
    Column("failures", Integer, nullable=False, default=0),
    # ImapError.kind of the last failure (connection, auth, tls, too_many_connections), and its text.
    Column("last_error_kind", String(32)),
    Column("last_error", Text),
    Column("last_error_at", Timestamp),
    Column("last_synced_at", Timestamp),
    # No sign-in is tried before it (NULL: at once).
    Column("next_attempt_at", Timestamp),
    Column("updated_at", Timestamp, nullable=False),
)

# The IMAP connections an account may have open, counted across every worker and container
# (IMAP_MAX_CONNECTIONS; emailops.store.connection_slots): a connection is opened only by the
# holder of one of the account's slots 0..N-1. Times are the database's clock; a holder renews
# its slots with its folder leases, so a dead holder's slots are free once they expire.
imap_connection_slots = Table(
    "imap_connection_slots",
    metadata,
    Column("account", String(320), primary_key=True),
    Column("slot", Integer, primary_key=True, autoincrement=False),
    # The worker holding it (its lease owner name); NULL: free.
    Column("holder", String(200)),
    Column("expires_at", Timestamp),
)

# The workers that share the folders' leases, each announcing itself with its lease round
# (emailops.store.lease_workers): a worker's share of the folders is counted from the live rows,
# so a worker that holds no folder yet is counted, and others give folders up to it.
lease_workers = Table(
    "lease_workers",
    metadata,
    # The worker's lease owner name (emailops.processes.ProcessIdentity).
    Column("owner", String(200), primary_key=True),
    # The database's clock; a worker that stopped announcing itself is gone once it passed.
    Column("expires_at", Timestamp, nullable=False),
)

# When the next login to an IMAP host may start, shared by every worker and container
# (IMAP_LOGINS_PER_SECOND; emailops.store.login_pacing). The database's clock.
imap_login_pacing = Table(
    "imap_login_pacing",
    metadata,
    Column("host", String(255), primary_key=True),
    Column("next_login_at", Timestamp, nullable=False),
)

# Mailbox changes put off because the account had no IMAP connection slot free (emailops.store.
# mailbox_changes): a rule's flags and move of an indexed message (``message_pk``, ``actions``:
# JSON [[kind, folder], ...], ``replied``: the $AutoReplied keyword first), or the Sent copy of a
# sent reply (``outbox_id``). Due at ``due_at`` (the database's clock), then held as long by the
# worker making it.
mailbox_changes = Table(
    "mailbox_changes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(320), nullable=False),
    Column("message_pk", Id, ForeignKey("messages.id", ondelete="CASCADE")),
    Column("outbox_id", Id, ForeignKey("outbox.id", ondelete="CASCADE")),
    Column("actions", JSON, nullable=False),
    Column("replied", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", Timestamp, nullable=False),
)
Index("ix_mailbox_changes_due", mailbox_changes.c.account, mailbox_changes.c.due_at)
# The accounts with a change due, asked by every worker once per loop iteration (``DueWork``).
Index("ix_mailbox_changes_due_at", mailbox_changes.c.due_at, mailbox_changes.c.account)

# The mailboxes of the deployment (emailops.accounts), keyed by the operator's name for each. An
# account's rows in the other tables carry its index key, username@imap_host (so the pair is
# unique). Secrets are Fernet-encrypted with SECRETS_KEY (emailops.auth.crypto); lists are JSON.
accounts = Table(
    "accounts",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("username", String(320), nullable=False),
    # NULL with auth=oauth2.
    Column("password", LargeBinary),
    # password or oauth2.
    Column("auth", String(16), nullable=False),
    Column("imap_host", String(255), nullable=False),
    Column("imap_port", Integer, nullable=False),
    Column("imap_security", String(16), nullable=False),
    Column("smtp_host", String(255), nullable=False),
    Column("smtp_port", Integer, nullable=False),
    Column("smtp_security", String(16), nullable=False),
    Column("folders", JSON, nullable=False),
    Column("idle_folders", Integer, nullable=False),
    Column("from_address", String(320), nullable=False),
    Column("drafts_folder", String(1000), nullable=False),
    Column("sent_folder", String(1000), nullable=False),
    Column("never_reply_to", JSON, nullable=False),
    Column("enabled", Boolean, nullable=False),
    # The OAuth2 options (auth=oauth2), as the EMAIL_OAUTH2_* settings; NULL otherwise.
    Column("oauth2_provider", String(16)),
    Column("oauth2_flow", String(32)),
    Column("oauth2_client_id", String(200)),
    Column("oauth2_client_secret", LargeBinary),
    Column("oauth2_tenant", String(200)),
    Column("oauth2_refresh_token", LargeBinary),
    Column("oauth2_token_url", String(1000)),
    Column("oauth2_device_url", String(1000)),
    Column("oauth2_authorize_url", String(1000)),
    Column("oauth2_scopes", JSON),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("username", "imap_host", name="uq_accounts_mailbox"),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("applied_at", Timestamp, nullable=False),
)
