"""The two after-index stages of a worker: applying rules to new mail, and delivering the outbox.

Both are bounded per call and safe with N workers: a message's rules run once because the worker
that claims it wins a conditional UPDATE (``store.rules_work``: a message that keeps failing is
quarantined after a few attempts), and outbox rows are claimed atomically.
"""

from __future__ import annotations

import time

import structlog
from sqlalchemy import Connection, Engine

from emailops import metrics
from emailops.clock import Clock, utc_now
from emailops.config import ReplyConfig
from emailops.imap.errors import CONNECTION_ERRORS, ImapError, ImapNoConnectionSlotError
from emailops.replies import appends, decision_log, decisions, imap_actions, outbox, recovery
from emailops.replies.appends import AppendOutcome
from emailops.replies.delivery import deliver_next, inbound_origin, request_context
from emailops.replies.due_work import DueWork
from emailops.replies.mailbox import FolderRecreated, MailboxSession
from emailops.replies.move_folders import MoveFolderCheck
from emailops.replies.outbox import OutboxState
from emailops.replies.put_off import PutOffChanges, first_delay
from emailops.replies.smtp_sender import SmtpSender
from emailops.request_ids import request_id
from emailops.rules import RuleSetCache
from emailops.rules.model import RuleSet
from emailops.store import messages as message_store
from emailops.store import rules_work
from emailops.store.database import reading
from emailops.store.mailbox_changes import PutOff

log = structlog.get_logger(component="rules")

# Set on an inbound message once a reply to it is recorded. The mailbox outlives the database: after
# a restore from an older backup, or a new index, a message carrying it is never answered again.
AUTO_REPLIED_KEYWORD = "$AutoReplied"


class RulesStage:
    """Apply the rules to messages indexed after the folder's first sync (``rules_state='pending'``)."""

    def __init__(
        self,
        engine: Engine,
        *,
        account: str,
        config: ReplyConfig,
        mailbox: MailboxSession,
        claimer: str | None = None,
        dead_runs: tuple[str, ...] = (),
        rules: RuleSetCache | None = None,
        clock: Clock = utc_now,
        batch: int = 50,
        budget_seconds: float = 1.0,
        check_move_folders: bool = True,
        due: DueWork | None = None,
    ) -> None:
        """``due``: the worker's look at which accounts have work (None: this stage looks for its
        account's work at every call, and takes back its stalled claims itself)."""
        self.engine = engine
        self.account = account
        # Who claims messages (a ProcessIdentity), and runs of this host known to be over: claims of
        # a dead process of this run or of those are taken back at once, not after the timeout.
        self.claimer = claimer
        self.dead_runs = dead_runs
        self.config = config
        self.mailbox = mailbox
        self.rules = rules or RuleSetCache(config.rules_file)
        # Read now, so that a broken rules file is in the log at start-up rather than at the first
        # new mail (which, with no good rules in force, is then indexed and never answered).
        self.rules.get()
        # Each load's move folders are checked on the server once (one worker of a daemon is enough).
        self.move_folders = (
            MoveFolderCheck(mailbox, create=not config.dry_run) if check_move_folders else None
        )
        self.clock = clock
        self.batch = batch
        self.budget_seconds = budget_seconds
        self.due = due
        self.next_stall_check = 0.0
        # Mailbox changes that found no IMAP connection slot free (this or another worker's).
        self.put_off = PutOffChanges(engine, account, "message", due=due)

    def run_once(self) -> bool:
        started = time.monotonic()
        if self.move_folders is not None:
            self.move_folders(self.rules.get())
        self._make_put_off_changes()
        if self.due is None:
            self._recover_stalled(started)
        elif not self.due.rules_due(self.account):
            return False
        worked = False
        while time.monotonic() - started < self.budget_seconds:
            with reading(self.engine) as conn:
                pending = message_store.pending_for_rules(conn, self.account, limit=self.batch)
            if not pending:
                break
            worked = True
            for pk in pending:
                self._decide(pk)
        if worked and self.due is not None:
            self.due.changed()  # replies and model jobs it queued are due for the stages after it
        return worked

    def close(self) -> None:
        self.mailbox.close()

    def _recover_stalled(self, now: float) -> None:
        if now >= self.next_stall_check:
            recovery.recover_stalled_rules(
                self.engine, self.config, claimer=self.claimer, dead_runs=self.dead_runs, account=self.account
            )
            self.next_stall_check = now + recovery.stall_check_seconds(self.config)

    def _decide(self, pk: int) -> None:
        ruleset = self.rules.get()
        # The attempt is committed before the work: a message that hangs or kills the worker counts.
        with self.engine.begin() as conn:
            attempt = rules_work.claim(conn, pk, self.claimer)
        if attempt is None:
            return  # another worker took it
        rid: str | None = None
        try:
            with self.engine.begin() as conn:
                if not rules_work.finish(conn, pk, attempt, claimer=self.claimer):
                    return  # the claim stalled and was given to another worker meanwhile
                stored = message_store.load_message(conn, pk)
                if stored is None:
                    return
                rid = request_id(self.account, stored.folder, stored.uidvalidity, stored.uid)
                made = self._apply(conn, pk, stored, ruleset, rid)
                if made is None:
                    return
        except Exception as exc:
            # One bad message must not stop the others: tried again a few times, then set aside.
            self._failed(pk, attempt, exc, rid)
            return
        _count_decisions(made)
        actions = decisions.mailbox_actions(made)
        replied = any(d.outbox_id is not None or d.llm_job_id is not None for d in made)
        if (actions or replied) and not self.config.dry_run:
            with structlog.contextvars.bound_contextvars(request_id=rid):
                self._change_mailbox(stored, actions, replied=replied)

    def _apply(
        self, conn: Connection, pk: int, stored: message_store.StoredMessage, ruleset: RuleSet, rid: str
    ) -> list[decisions.Decision] | None:
        """The rules' decisions for one message (None: already answered), its lines told under
        its ``request_id``."""
        with structlog.contextvars.bound_contextvars(request_id=rid):
            if AUTO_REPLIED_KEYWORD in stored.flags:
                log.info(
                    "already answered (mailbox keyword); rules not applied again",
                    folder=stored.folder,
                    uid=stored.uid,
                    keyword=AUTO_REPLIED_KEYWORD,
                )
                return None
            now = self.clock()
            made = decisions.apply_rules(
                conn,
                account=self.account,
                message_pk=pk,
                folder=stored.folder,
                uidvalidity=stored.uidvalidity,
                uid=stored.uid,
                parsed=stored.parsed,
                rules=ruleset,
                config=self.config,
                now=now,
            )
            decision_log.record(conn, account=self.account, message_pk=pk, made=made, now=now)
            return made

    def _failed(self, pk: int, attempt: int, exc: Exception, rid: str | None) -> None:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        with self.engine.begin() as conn:
            quarantined = rules_work.release_failed(
                conn,
                pk,
                attempt,
                claimer=self.claimer,
                reason=reason,
                max_attempts=self.config.rules_max_attempts,
            )
        if quarantined is not None:
            recovery.report_quarantined(quarantined)
        else:
            log.warning(
                "rules failed for a message; it will be tried again",
                message_pk=pk,
                request_id=rid,
                attempt=attempt,
                max_attempts=self.config.rules_max_attempts,
                exc_info=True,
            )

    def _change_mailbox(
        self, stored: message_store.StoredMessage, actions: list[decisions.MailboxAction], *, replied: bool
    ) -> None:
        if self._make_change(stored, actions, replied=replied):
            return
        self.put_off.put_off(
            message_pk=stored.pk,
            actions=[(action.kind.value, action.folder) for action in actions],
            replied=replied,
        )
        log.info(
            "no IMAP connection slot of the account free (IMAP_MAX_CONNECTIONS): the mailbox change "
            "asked by a rule is made later",
            folder=stored.folder,
            uid=stored.uid,
            actions=[a.kind.value for a in actions],
        )

    def _make_put_off_changes(self) -> None:
        for change in self.put_off.take_due():
            with reading(self.engine) as conn:
                stored = message_store.load_message(conn, change.message_pk) if change.message_pk else None
            if stored is None:  # the message is gone from the index (its folder removed)
                self.put_off.done(change)
                continue
            actions = [
                decisions.MailboxAction(decisions.MailboxActionKind(kind), folder)
                for kind, folder in change.actions
            ]
            rid = request_id(self.account, stored.folder, stored.uidvalidity, stored.uid)
            with structlog.contextvars.bound_contextvars(request_id=rid):
                if not self._make_change(stored, actions, replied=change.replied):
                    self.put_off.again(change)
                    continue
                self.put_off.done(change)
                log.info(
                    "mailbox change asked by a rule, put off for want of an IMAP connection slot, "
                    "tried again",
                    folder=stored.folder,
                    uid=stored.uid,
                    attempts=change.attempts + 1,
                )

    def _make_change(
        self, stored: message_store.StoredMessage, actions: list[decisions.MailboxAction], *, replied: bool
    ) -> bool:
        """Make the change, or log why it was not made; False (nothing sent to the server) when
        the account has no IMAP connection slot free, to be made later."""
        folder, uid = stored.folder, stored.uid
        try:
            client = self.mailbox.client_for_uids(folder, stored.uidvalidity)
            if replied:  # first: a move must carry the keyword along
                imap_actions.add_flags(client, uid, [AUTO_REPLIED_KEYWORD])
            imap_actions.perform(client, uid, actions)
        except ImapNoConnectionSlotError:
            return False
        except FolderRecreated as exc:
            log.warning(
                "mailbox change asked by a rule not made: the folder was recreated since the message "
                "was indexed, and its UID now names another message",
                folder=folder,
                uid=uid,
                uidvalidity=exc.expected,
                folder_uidvalidity=exc.current,
                actions=[a.kind.value for a in actions],
                replied_keyword=replied,
            )
        except (ImapError, *CONNECTION_ERRORS) as exc:
            self.mailbox.drop()
            log.error(
                "mailbox change asked by a rule failed",
                folder=folder,
                uid=uid,
                actions=[a.kind.value for a in actions],
                error=str(exc),
            )
        return True


def _count_decisions(made: list[decisions.Decision]) -> None:
    """Metrics of committed decisions: a reply queued, suppressed (and why), or only logged (dry run)."""
    for decision in made:
        if decision.reply_action is None:
            continue
        if decision.suppressed is not None:
            metrics.reply_suppressed(decision.rule, decision.suppressed)
        elif decision.dry_run:
            metrics.reply_outcome(decision.rule, "dry_run")
        elif decision.created:
            metrics.reply_outcome(decision.rule, "queued")


class OutboxStage:
    """Deliver due replies by SMTP (and drafts into the Drafts folder), for about ``budget`` seconds."""

    def __init__(
        self,
        engine: Engine,
        *,
        account: str,
        claimer: str,
        config: ReplyConfig,
        sender: SmtpSender,
        mailbox: MailboxSession,
        dead_runs: tuple[str, ...] = (),
        clock: Clock = utc_now,
        budget_seconds: float = 1.0,
        due: DueWork | None = None,
    ) -> None:
        """``due``: the worker's look at which accounts have work (None: this stage looks for its
        account's work at every call, and recovers interrupted sends and counts the outbox)."""
        self.engine = engine
        self.account = account
        self.claimer = claimer
        # Runs of this host known to be over: their claims are recovered at once.
        self.dead_runs = dead_runs
        self.config = config
        self.sender = sender
        self.mailbox = mailbox
        self.clock = clock
        self.budget_seconds = budget_seconds
        self.due = due
        self.next_recovery = 0.0
        self.next_count = 0.0
        # Sent copies that found no IMAP connection slot free (this or another worker's).
        self.put_off = PutOffChanges(engine, account, "sent_copy", due=due)

    def run_once(self) -> bool:
        started = time.monotonic()
        self.sender.close_if_unused()
        for change in self.put_off.take_due():
            if change.outbox_id is not None:
                self._copy_to_sent(change.outbox_id, change)
        if self.due is None:
            self._upkeep(started)
        elif not self.due.outbox_due(self.account):
            return False
        with reading(self.engine) as conn:
            due = outbox.due_actions(conn, now=self.clock(), account=self.account)
        worked = False
        while due and time.monotonic() - started < self.budget_seconds:
            if not (("draft" in due and self._save_next_draft()) or ("send" in due and self._send_next())):
                break
            worked = True
        return worked

    def close(self) -> None:
        self.sender.close()
        self.mailbox.close()

    def _upkeep(self, now: float) -> None:
        if now >= self.next_recovery:
            recovery.recover_interrupted_sends(
                self.engine, claimer=self.claimer, dead_runs=self.dead_runs, now=self.clock()
            )
            self.next_recovery = now + recovery.SENDS_CHECK_SECONDS
        if metrics.enabled() and now >= self.next_count:
            recovery.count_outbox(self.engine, account=self.account)
            self.next_count = now + recovery.OUTBOX_COUNT_SECONDS

    def _send_next(self) -> bool:
        result = deliver_next(
            self.engine,
            self.sender,
            claimer=self.claimer,
            envelope_from=self.config.from_address,
            max_attempts=self.config.send_max_attempts,
            account=self.account,
            clock=self.clock,
        )
        if result is None:
            return False
        if result.state is OutboxState.SENT and self.config.save_sent_copy:
            self._copy_to_sent(result.outbox_id)
        return True

    def _copy_to_sent(self, outbox_id: int, put_off: PutOff | None = None) -> None:
        """Save the copy of a sent reply, or put it off (``put_off``: again) when no IMAP
        connection slot is free."""
        with self.engine.connect() as conn:
            row = outbox.get_reply(conn, outbox_id)
        if row is None or not row.raw:  # gone, or purged while put off
            if put_off is not None:
                self.put_off.done(put_off)
            return
        folder = self.config.sent_folder
        result = appends.save_sent_copy(self.mailbox, row.raw, row.reply_message_id, folder=folder)
        if result.outcome is AppendOutcome.NO_SLOT:
            if put_off is not None:
                self.put_off.again(put_off)
                return
            self.put_off.put_off(outbox_id=outbox_id)
            log.info(
                "no IMAP connection slot of the account free (IMAP_MAX_CONNECTIONS): the copy of a "
                "sent reply is saved in the Sent folder later",
                outbox_id=outbox_id,
                folder=folder,
            )
            return
        if put_off is not None:
            self.put_off.done(put_off)
        if result.saved:
            log.info(
                "copy of a sent reply saved in the Sent folder",
                outbox_id=outbox_id,
                folder=folder,
                **({"found_in_folder": True} if result.outcome is AppendOutcome.FOUND else {}),
                **({"put_off": put_off.attempts} if put_off is not None else {}),
            )
        elif result.outcome is AppendOutcome.UNKNOWN:
            log.warning(
                "copy of a sent reply may or may not be in the Sent folder; not saved again",
                outbox_id=outbox_id,
                folder=folder,
                error=result.error,
            )
        else:
            log.warning(
                "copy of a sent reply to the Sent folder failed", outbox_id=outbox_id, error=result.error
            )

    def _save_next_draft(self) -> bool:
        with self.engine.begin() as conn:
            row = outbox.claim_next(
                conn, claimer=self.claimer, now=self.clock(), action="draft", account=self.account
            )
            origin = inbound_origin(conn, row) if row is not None else None
        if row is None:
            return False
        folder = self.config.drafts_folder
        result = appends.save_draft(self.mailbox, row.raw, row.reply_message_id, folder=folder)
        if result.outcome is AppendOutcome.NO_SLOT:
            # Nothing was tried: no failure counted. False: no more drafts now, they would find none.
            with self.engine.begin() as conn:
                outbox.put_back(
                    conn,
                    row,
                    claimer=self.claimer,
                    reason=f"saving the draft waits for an IMAP connection slot: {result.error}",
                    now=self.clock(),
                    delay=first_delay(),
                )
            log.info(
                "no IMAP connection slot of the account free (IMAP_MAX_CONNECTIONS): the draft is "
                "saved later",
                outbox_id=row.id,
                folder=folder,
                **request_context(origin),
            )
            return False
        if result.outcome is AppendOutcome.NOT_SAVED:
            with self.engine.begin() as conn:
                outbox.mark_transient_failure(
                    conn,
                    row,
                    claimer=self.claimer,
                    reason=f"saving the draft failed: {result.error}",
                    now=self.clock(),
                    max_attempts=self.config.send_max_attempts,
                )
            return True
        if result.outcome is AppendOutcome.UNKNOWN:
            # Never saved again blindly; ``emailops outbox retry`` searches the folder first.
            with self.engine.begin() as conn:
                outbox.mark_unknown(
                    conn, row.id, claimer=self.claimer, reason=str(result.error), now=self.clock()
                )
            metrics.reply_outcome(row.rule_name, "unknown")
            log.warning(
                "draft may or may not be saved: the answer to APPEND was lost",
                outbox_id=row.id,
                folder=folder,
                error=result.error,
                **request_context(origin),
            )
            return True
        with self.engine.begin() as conn:
            taken_from = outbox.mark_sent(
                conn, row.id, claimer=self.claimer, now=self.clock(), attempt=row.attempts
            )
        metrics.reply_outcome(row.rule_name, "drafted")
        log.info(
            "reply saved as a draft",
            outbox_id=row.id,
            folder=folder,
            **({"found_in_folder": True} if result.outcome is AppendOutcome.FOUND else {}),
            **({"previous_state": taken_from.value} if taken_from else {}),
            **request_context(origin),
        )
        return True
