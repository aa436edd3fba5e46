"""The production work unit of a ``prod.run`` worker: the mail pipeline, built from the settings."""

from __future__ import annotations

import os

from emailops.imap.account_gate import AccountGate
from emailops.llm.client import ChatClient
from emailops.pipeline import AfterIndexStage, MailPipeline
from emailops.processes import ProcessIdentity, new_run_id
from emailops.replies.history import HistoryPurgeStage
from emailops.replies.llm_stage import LlmStage
from emailops.replies.mailbox import MailboxSession
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from prod.oauth2_tokens import account_token_source
from prod.redaction import REDACTOR
from prod.runtime_settings import ConfigError, RuntimeSettings
from prod.worker import PREVIOUS_RUN_ID_ENV, RUN_ID_ENV


def create_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    """Open the index (migrating it if needed) and build this worker's pipeline.

    Stages after indexing: the rules (new mail only), the model's replies (when LLM_BASE_URL is
    set), then the outbox (SMTP delivery, drafts), and the daily purge of the reply history.
    """
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
    # The worker's account (the default one, EMAIL_*), read once: every stage config comes from it.
    account = settings.default_account()
    deployment = settings.deployment()
    sync_config = account.sync_config(deployment)
    reply_config = account.reply_config(deployment)
    # With OAuth2, one token source per worker; the workers share the token row in the index.
    tokens = account_token_source(account, deployment, engine)
    imap = account.imap_config(deployment, tokens)
    # One IMAP session for what the rules change in the mailbox and for the outbox's drafts and
    # Sent copies (the stages run in turn, never at once); the watchers have their own.
    mailbox = MailboxSession(imap)
    stages: list[AfterIndexStage] = [
        RulesStage(
            engine,
            account=sync_config.account,
            config=reply_config,
            mailbox=mailbox,
            claimer=owner,
            dead_runs=dead_runs,
            check_move_folders=worker_id == 1,
        ),
    ]
    if reply_config.llm is not None:
        client = ChatClient.for_config(reply_config.llm)
        stages.append(
            LlmStage(
                engine,
                account=sync_config.account,
                claimer=owner,
                config=reply_config,
                client=client,
                dead_runs=dead_runs,
            )
        )
    sender = SmtpSender(account.smtp_config(deployment, tokens))
    stages.append(
        OutboxStage(
            engine,
            account=sync_config.account,
            claimer=owner,
            config=reply_config,
            sender=sender,
            mailbox=mailbox,
            dead_runs=dead_runs,
        )
    )
    stages.append(HistoryPurgeStage(engine, history_days=settings.reply_history_days))
    # The account's state, shared with every worker; a start tries an account whose sign-in was
    # refused at once, since its password (or sign-in settings) may have been changed for it.
    gate = AccountGate(engine, sync_config.account, mask=REDACTOR.redact_text)
    gate.credentials_changed()
    return MailPipeline(
        engine,
        imap,
        sync_config,
        owner=owner,
        dead_runs=dead_runs,
        workers=settings.workers,
        stages=stages,
        smtp=sender,
        gate=gate,
        sign_ins=settings.sign_in_limits(),
    )
