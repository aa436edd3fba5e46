"""The production work unit of a ``prod.run`` worker: the mail pipeline, built from the settings."""

from __future__ import annotations

import socket

from emailops.pipeline import AfterIndexStage, MailPipeline
from emailops.replies.mailbox import MailboxSession
from emailops.replies.smtp_sender import SmtpSender
from emailops.replies.stages import OutboxStage, RulesStage, claimer_id
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate
from prod.oauth2_tokens import token_source
from prod.runtime_settings import RuntimeSettings


def create_unit(settings: RuntimeSettings, worker_id: int) -> MailPipeline:
    """Open the index (migrating it if needed) and build this worker's pipeline.

    Stages after indexing: the rules (new mail only), then the outbox (SMTP delivery, drafts).
    """
    engine = create_index_engine(settings.index_db_url)
    migrate(engine)
    claimer = claimer_id(worker_id)
    # The folder lease belongs to the worker slot, not the process: a worker that replaces a dead
    # one takes its folders back at once instead of waiting for the lease to expire.
    lease_owner = f"{socket.gethostname()}:w{worker_id}"
    sync_config = settings.sync_config()
    reply_config = settings.reply_config()
    # With OAuth2, one token source per worker; the workers share the token row in the index.
    tokens = token_source(settings, engine)
    imap = settings.imap_config(tokens)
    stages: list[AfterIndexStage] = [
        RulesStage(engine, account=sync_config.account, config=reply_config, mailbox=MailboxSession(imap)),
        OutboxStage(
            engine,
            account=sync_config.account,
            claimer=claimer,
            config=reply_config,
            sender=SmtpSender(settings.smtp_config(tokens)),
            mailbox=MailboxSession(imap),
        ),
    ]
    return MailPipeline(engine, imap, sync_config, owner=lease_owner, workers=settings.workers, stages=stages)
