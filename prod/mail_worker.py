"""The production work unit of a ``prod.run`` worker: the mail pipeline, built from the settings.

A worker serves every account of the deployment: the default one (``EMAIL_*``), when set, and
every enabled account of the index. The index's accounts are read again every
``ACCOUNTS_REFRESH_SECONDS``: an account added, enabled, changed, disabled or removed is watched,
rebuilt or let go of (its folder leases released) without a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from emailops.accounts.config import AccountConfig, Deployment
from emailops.accounts.store import list_accounts, secrets_key_missing
from emailops.auth.crypto import SecretCipher
from emailops.config import ServerConfig, SignInLimits, SyncConfig
from emailops.imap.account_gate import AccountGate
from emailops.imap.connection_budget import AccountConnections
from emailops.lease_round import LEASE_TTL
from emailops.llm.client import ChatClient
from emailops.pipeline import AfterIndexStage, MailPipeline
from emailops.processes import ProcessIdentity, new_run_id
from emailops.replies.due_work import DueWork
from emailops.replies.history import HistoryPurgeStage
from emailops.replies.llm_stage import LlmStage
from emailops.replies.mailbox import MailboxSession
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from emailops.store.database import create_index_engine, reading
from emailops.store.migrations import migrate
from prod.oauth2_tokens import account_token_source
from prod.redaction import REDACTOR
from prod.runtime_settings import ConfigError, RuntimeSettings
from prod.worker import PREVIOUS_RUN_ID_ENV, RUN_ID_ENV

# How often a worker reads the accounts table again (an account change is served within this).
ACCOUNTS_REFRESH_SECONDS = 30.0


def served_accounts(settings: RuntimeSettings, engine: Engine) -> list[AccountConfig]:
    """The accounts a worker serves: the default one (EMAIL_*) first, then the index's enabled
    ones by name, with their secrets (SECRETS_KEY). An account of the index that is the default
    one's mailbox (or name) is left out: the default one serves it."""
    keys = settings.secret_keys()
    cipher = SecretCipher(keys) if keys else None
    default = settings.default_account() if settings.has_default_account else None
    with reading(engine) as conn:
        stored = [account for account in list_accounts(conn, cipher) if account.enabled]
    if default is not None:
        stored = [a for a in stored if default.name != a.name and default.index_key != a.index_key]
    if stored and cipher is None:
        raise ConfigError(str(secrets_key_missing(stored[0].name)))
    for account in stored:
        # Masked in this process's logs and Sentry events, as EMAIL_PASSWORD is.
        options = account.oauth2
        oauth2 = (options.client_secret, options.refresh_token) if options else ()
        for secret in filter(None, (account.password, *oauth2)):
            REDACTOR.register(secret, username=account.username)
    return [default, *stored] if default is not None else stored


def no_account_error() -> ConfigError:
    return ConfigError(
        "invalid configuration: no account to serve: set EMAIL_USERNAME (with EMAIL_IMAP_HOST, "
        "EMAIL_IMAP_PORT, EMAIL_SMTP_HOST, EMAIL_SMTP_PORT and EMAIL_PASSWORD), or add an enabled "
        "account to the index with `emailops accounts add` (or `emailops accounts import`)"
    )


@dataclass(frozen=True)
class AccountParts:
    """What a worker runs for one account: its IMAP server and sync configuration (its watch
    entry), its state's gate, its stages after indexing, its SMTP sender, and its IMAP
    connections in this worker with the stages' mailbox session on them."""

    server: ServerConfig
    sync: SyncConfig
    gate: AccountGate
    stages: list[AfterIndexStage]
    smtp: SmtpSender
    connections: AccountConnections
    mailbox: MailboxSession


@dataclass(frozen=True)
class AccountBuilder:
    engine: Engine
    deployment: Deployment
    owner: str
    dead_runs: tuple[str, ...]
    worker_id: int
    sign_ins: SignInLimits
    # Which accounts have work due, asked once per iteration for all (shared by their stages).
    due: DueWork

    def build(self, account: AccountConfig) -> AccountParts:
        """The account's configurations, read once from its ``AccountConfig``: the rules (new mail
        only), the model's replies (when LLM_BASE_URL is set), then the outbox (SMTP delivery,
        drafts)."""
        sync_config = account.sync_config(self.deployment)
        reply_config = account.reply_config(self.deployment)
        # With OAuth2, one token source per account and worker; the workers share the token row.
        tokens = account_token_source(account, self.deployment, self.engine)
        imap = account.imap_config(self.deployment, tokens)
        # One IMAP session for what the rules change in the mailbox and for the outbox's drafts
        # and Sent copies (the stages run in turn, never at once); the watchers have their own
        # connections, all of them within the account's budget (IMAP_MAX_CONNECTIONS).
        connections = AccountConnections(
            self.engine,
            sync_config.account,
            holder=self.owner,
            max_connections=sync_config.max_connections,
            limits=self.sign_ins,
            ttl=LEASE_TTL,
        )
        mailbox = MailboxSession(imap, connector=connections.connect)
        stages: list[AfterIndexStage] = [
            RulesStage(
                self.engine,
                account=sync_config.account,
                config=reply_config,
                mailbox=mailbox,
                claimer=self.owner,
                dead_runs=self.dead_runs,
                check_move_folders=self.worker_id == 1,
                due=self.due,
            ),
        ]
        if reply_config.llm is not None:
            stages.append(
                LlmStage(
                    self.engine,
                    account=sync_config.account,
                    claimer=self.owner,
                    config=reply_config,
                    client=ChatClient.for_config(reply_config.llm),
                    dead_runs=self.dead_runs,
                    due=self.due,
                )
            )
        sender = SmtpSender(account.smtp_config(self.deployment, tokens))
        stages.append(
            OutboxStage(
                self.engine,
                account=sync_config.account,
                claimer=self.owner,
                config=reply_config,
                sender=sender,
                mailbox=mailbox,
                dead_runs=self.dead_runs,
                due=self.due,
            )
        )
        # The account's state, shared with every worker; a start tries an account whose sign-in
        # was refused at once, since its password (or sign-in settings) may have been changed.
        gate = AccountGate(self.engine, sync_config.account, mask=REDACTOR.redact_text)
        gate.credentials_changed()
        return AccountParts(imap, sync_config, gate, stages, sender, connections, mailbox)


def add_account(pipeline: MailPipeline, parts: AccountParts) -> None:
    pipeline.add_account(
        parts.server,
        parts.sync,
        gate=parts.gate,
        stages=parts.stages,
        smtp=parts.smtp,
        connections=parts.connections,
        sessions=[parts.mailbox],
    )


class AccountsRefresh:
    """A stage that reads the served accounts again every ``ACCOUNTS_REFRESH_SECONDS`` and adds
    to or removes from the pipeline what changed (a changed account is removed, then added)."""

    def __init__(
        self,
        pipeline: MailPipeline,
        served: dict[str, AccountConfig],
        read: Callable[[], list[AccountConfig]],
        build: Callable[[AccountConfig], AccountParts],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.served = served
        self.read = read
        self.build = build
        self.monotonic = monotonic
        self.next_read = monotonic() + ACCOUNTS_REFRESH_SECONDS

    def run_once(self) -> bool:
        if self.monotonic() < self.next_read:
            return False
        self.next_read = self.monotonic() + ACCOUNTS_REFRESH_SECONDS
        wanted = {account.name: account for account in self.read()}
        for name, account in list(self.served.items()):
            if wanted.get(name) != account:
                self.pipeline.log.info("no longer serving the account", account=account.index_key)
                self.pipeline.remove_account(account.index_key)
                del self.served[name]
        for name, account in wanted.items():
            if name not in self.served:
                self.pipeline.log.info("serving the account", account=account.index_key)
                parts = self.build(account)
                add_account(self.pipeline, parts)
                self.served[name] = account
        return False

    def close(self) -> None:
        """Nothing of its own: the pipeline closes the accounts."""


def create_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    """Open the index (migrating it if needed) and build this worker's pipeline: the look at which
    accounts have work due, every served account's watch entry and stages, the daily purge of the
    reply history, and the refresh of the accounts."""
    problem = settings.llm_rules_problem()
    if problem:
        raise ConfigError(problem)
    engine = create_index_engine(settings.index_db_url)
    migrate(engine)
    # One identity owns this process's folder leases and work claims. A worker that replaces a dead
    # one of the same run takes its folders back at once (see ProcessIdentity.names_dead_sibling).
    run = os.environ.get(RUN_ID_ENV) or new_run_id()
    owner = str(ProcessIdentity.of_this_process(worker_id, run=run))
    dead_runs = tuple(filter(None, os.environ.get(PREVIOUS_RUN_ID_ENV, "").split(",")))
    deployment = settings.deployment()
    due = DueWork(engine, config=deployment.reply, claimer=owner, dead_runs=dead_runs)
    builder = AccountBuilder(engine, deployment, owner, dead_runs, worker_id, settings.sign_in_limits(), due)

    def read() -> list[AccountConfig]:
        return served_accounts(settings, engine)

    accounts = read()
    if not accounts:
        raise no_account_error()
    first, *others = accounts
    parts = builder.build(first)
    pipeline = MailPipeline(
        engine,
        parts.server,
        parts.sync,
        owner=owner,
        dead_runs=dead_runs,
        # DueWork first: each iteration's stages ask it afresh.
        stages=[due, *parts.stages, HistoryPurgeStage(engine, history_days=settings.reply_history_days)],
        smtp=parts.smtp,
        gate=parts.gate,
        sign_ins=settings.sign_in_limits(),
        connections=parts.connections,
        sessions=[parts.mailbox],
    )
    # The first account's stages are the pipeline's own; it is removed like any other.
    pipeline.account_parts[parts.sync.account] = (parts.stages, parts.smtp)
    for account in others:
        add_account(pipeline, builder.build(account))
    served = {account.name: account for account in accounts}
    pipeline.stages.append(AccountsRefresh(pipeline, served, read, builder.build))
    return pipeline
