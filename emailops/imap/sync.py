"""Incremental sync of one IMAP folder into the index.

Per folder the index keeps UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and the server's message count. A
pass that finds the folder unselected asks STATUS first, and ends there when it shows what the
last pass saved: one round trip, whatever the folder's size. Otherwise (``FolderSync._pass``, one
method a step):

1. SELECT (read-only, so indexing never changes a flag): UIDVALIDITY, UIDNEXT, EXISTS, HIGHESTMODSEQ;
   and the folder's state in the index. When they agree (and no reconcile is asked for), steps 3
   to 5 are skipped.
2. The first sync records its baseline (mail below it was there before: none of it is answered).
   A changed UIDVALIDITY: rows are re-mapped to their new UIDs by Message-ID (no duplicate, no
   re-answer), the rest of the old generation is marked expunged.
3. New UIDs (UIDNEXT moved; ``new_mail``, with an attempt counted so that a message that keeps
   failing is quarantined): sizes first, then BODY.PEEK[] in batches bounded by count and bytes,
   downloaded, parsed and stored at once (``fetch_pipeline``); a message above
   ``max_message_bytes`` is fetched as its header and a bounded part of its text (``download``).
4. Flags: with CONDSTORE, only what changed since HIGHESTMODSEQ; without, by a periodic reconcile.
5. Expunges: when EXISTS differs from the last count plus the arrivals, one UID SEARCH tells which
   UIDs left (marked expunged, never dropped) and which are missing (fetched).
6. What SELECT showed is saved as the folder's state: the next pass starts from it.
Every write is idempotent on (folder, UIDVALIDITY, UID): a pass killed at any point and run again
leaves the same index.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import Engine, select

from emailops.cache import RawMessageCache
from emailops.clock import Clock, utc_now
from emailops.config import SyncConfig
from emailops.imap.announcements import forget_unsolicited
from emailops.imap.bulk_fetch import fetch_meta, stored_flags
from emailops.imap.errors import ImapFolderMissingError
from emailops.imap.folder_status import MailboxStatus, SyncReport, mailbox_status
from emailops.imap.new_mail import FolderIndexer
from emailops.store import folders as folder_store
from emailops.store import index_work
from emailops.store import messages as message_store
from emailops.store.database import reading
from emailops.store.schema import messages

log = structlog.get_logger(component="index")
# What decides whether DEBUG lines are rendered (structlog hands them to the standard library).
_stdlib_log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(rb"<[^<>\s]+>")


@contextmanager
def _missing_folder_told(client: IMAPClient, folder: str) -> Iterator[None]:
    """A NO to SELECT or STATUS becomes ``ImapFolderMissingError`` when ``folder`` is not on the
    server. A folder that exists but cannot be opened now, or a broken connection, keeps its error."""
    try:
        yield
    except IMAPClientError as exc:
        if isinstance(exc, IMAPClientAbortError) or client.folder_exists(folder):
            raise
        raise ImapFolderMissingError(f"folder {folder!r} does not exist on the server ({exc})") from exc


class FolderSync:
    """Syncs one folder of one account. Holds no connection: each call is given a logged-in client."""

    def __init__(
        self,
        engine: Engine,
        config: SyncConfig,
        folder: str,
        *,
        cache: RawMessageCache | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self.config = config
        self.folder = folder
        self.cache = cache
        self.clock = clock
        self.log = log.bind(folder=folder)
        # The lease epoch of the worker watching the folder: every write of the folder's sync state
        # checks it (``folders.LeaseLostError`` once another took over). None: no lease (one-off).
        self.fence: int | None = None
        # The connection on which this folder is selected now, if any.
        self._selected_on: IMAPClient | None = None

    def select(self, client: IMAPClient) -> MailboxStatus:
        with _missing_folder_told(client, self.folder):
            response = client.select_folder(self.folder, readonly=True)
        status = mailbox_status(response)
        self._selected_on = client
        forget_unsolicited(client)  # what SELECT itself announced is in ``status``
        return status

    def release(self, client: IMAPClient) -> None:
        """Leave the folder (UNSELECT, or CLOSE: the folder was opened read-only, so nothing is
        expunged), so that the next poll may ask STATUS, which RFC 3501 reserves for folders that
        are not selected."""
        selected = self._selected_on
        if selected is None or selected is not client:  # the None test narrows ``client`` for mypy
            return
        if client.has_capability("UNSELECT"):
            client.unselect_folder()
        else:
            client.close_folder()
        self._selected_on = None

    def sync(
        self,
        client: IMAPClient,
        *,
        reconcile: bool = False,
        budget_seconds: float | None = None,
        keep_selected: bool = False,
    ) -> SyncReport:
        """One pass. ``reconcile`` forces the full flag/expunge comparison (servers without CONDSTORE).

        With ``budget_seconds``, fetching stops after the batch that passes the budget, with the
        progress committed, so that a worker can heartbeat and stop between passes; the report says
        ``complete=False`` and the next pass continues. ``keep_selected`` leaves the folder selected
        afterwards (for IDLE); otherwise it is released and the next pass starts with one STATUS,
        which ends it when nothing changed: a poll costs one round trip, whatever the folder's size
        (a SELECT costs more as the folder grows).
        """
        started = time.monotonic()
        report = SyncReport(self.folder)
        if not reconcile and self._selected_on is not client and self._unchanged_by_status(client):
            report.seconds = time.monotonic() - started
            return report
        try:
            return self._pass(client, report, started, reconcile, budget_seconds)
        finally:
            if not keep_selected:
                self.release(client)

    def _unchanged_by_status(self, client: IMAPClient) -> bool:
        state = self._folder_state()
        if state.uidvalidity is None or state.uidnext is None or state.server_count is None:
            return False
        items = ["UIDVALIDITY", "UIDNEXT", "MESSAGES"]
        if state.highestmodseq is not None:
            items.append("HIGHESTMODSEQ")
        with _missing_folder_told(client, self.folder):
            answer = client.folder_status(self.folder, items)
        seen = {key.decode(): int(value) for key, value in answer.items()}
        if (
            seen.get("UIDVALIDITY") != state.uidvalidity
            or seen.get("UIDNEXT") != state.uidnext
            or seen.get("MESSAGES") != state.server_count
            or (state.highestmodseq is not None and seen.get("HIGHESTMODSEQ") != state.highestmodseq)
        ):
            return False
        with self.engine.begin() as conn:
            folder_store.touch_sync(conn, state.id, self.clock(), fence=self.fence)
        return True

    def _pass(
        self,
        client: IMAPClient,
        report: SyncReport,
        started: float,
        reconcile: bool,
        budget_seconds: float | None,
    ) -> SyncReport:
        """The steps of the module's docstring, in its order."""
        deadline = None if budget_seconds is None else started + budget_seconds
        status = self.select(client)
        state = self._folder_state()
        flags_unknown = self._flags_unknown(state, status)
        if state.uidvalidity is None or state.baseline_uidnext is None:
            state = self._begin_first_sync(state, status)
        elif state.uidvalidity != status.uidvalidity:
            state = self._resync(client, state, status, report)
        if reconcile or not self._unchanged(state, status):
            indexer = self._indexer(state, status, report)
            arrived, report.complete = indexer.fetch_new(client, deadline)
            if not report.complete:
                return self._finish(report, started)
            report.flags_changed += self._flag_changes(
                client, state, status, reconcile=reconcile, flags_unknown=flags_unknown
            )
            self._expunges(client, indexer, reconcile=reconcile, arrived=arrived)
        self._save_state(state.id, status, reconcile=reconcile)
        return self._finish(report, started)

    def _indexer(
        self, state: folder_store.FolderState, status: MailboxStatus, report: SyncReport
    ) -> FolderIndexer:
        """Steps 3 and 5 index messages by UID (``new_mail``), as of this pass's state."""
        return FolderIndexer(
            engine=self.engine,
            config=self.config,
            folder=self.folder,
            cache=self.cache,
            clock=self.clock,
            fence=self.fence,
            log=self.log,
            history_lines=_stdlib_log.isEnabledFor(logging.DEBUG),
            state=state,
            status=status,
            report=report,
        )

    def _flags_unknown(self, state: folder_store.FolderState, status: MailboxStatus) -> bool:
        """Whether the last pass left rows whose flags must all be compared (read before step 2)."""
        # A pass that ended before recording HIGHESTMODSEQ (cut by its time budget, killed, or
        # killed right after a UIDVALIDITY re-map) left rows whose flags may have changed since
        # they were fetched, and no MODSEQ to ask CHANGEDSINCE from: all their flags are compared.
        return (
            status.highestmodseq is not None
            and state.highestmodseq is None
            and state.uidvalidity == status.uidvalidity
            and self._has_rows(state.id, status.uidvalidity)
        )

    def _has_rows(self, folder_id: int, uidvalidity: int) -> bool:
        with reading(self.engine) as conn:
            return (
                conn.execute(
                    select(messages.c.id)
                    .where(messages.c.folder_id == folder_id, messages.c.uidvalidity == uidvalidity)
                    .limit(1)
                ).first()
                is not None
            )

    def _unchanged(self, state: folder_store.FolderState, status: MailboxStatus) -> bool:
        """Whether SELECT shows the folder as the last pass left it: then steps 3 to 5 are skipped."""
        # Nothing arrived (same UIDNEXT) and the count is the same, so nothing left either; with
        # CONDSTORE an unchanged HIGHESTMODSEQ also rules out flag changes. No row is counted: the
        # cost does not grow with the folder.
        return (
            state.uidnext is not None
            and state.uidnext == status.uidnext
            and state.server_count == status.exists
            and (status.highestmodseq is None or state.highestmodseq == status.highestmodseq)
        )

    def _save_state(self, folder_id: int, status: MailboxStatus, *, reconcile: bool) -> None:
        """Step 6: what SELECT showed is what the index now holds."""
        with self.engine.begin() as conn:
            folder_store.save_sync_state(
                conn,
                folder_id,
                fence=self.fence,
                uidvalidity=status.uidvalidity,
                uidnext=status.uidnext,
                highestmodseq=status.highestmodseq,
                server_count=status.exists,
                now=self.clock(),
                reconciled=reconcile,
            )

    def _folder_state(self) -> folder_store.FolderState:
        with reading(self.engine) as conn:
            state = folder_store.get_folder(conn, self.config.account, self.folder)
        if state is None:
            with self.engine.begin() as conn:
                state = folder_store.ensure_folder(conn, self.config.account, self.folder)
        return state

    def _finish(self, report: SyncReport, started: float) -> SyncReport:
        report.new = len(report.new_message_pks)
        report.seconds = time.monotonic() - started
        if report.new or report.flags_changed or report.expunged or report.resynced:
            self.log.info(
                "folder synced",
                new=report.new,
                flags_changed=report.flags_changed,
                expunged=report.expunged,
                resynced=report.resynced,
                complete=report.complete,
                seconds=round(report.seconds, 3),
            )
        return report

    # -- state transitions -------------------------------------------------------------------

    def _begin_first_sync(
        self, state: folder_store.FolderState, status: MailboxStatus
    ) -> folder_store.FolderState:
        """Record the baseline before fetching anything: mail below it was there before us."""
        baseline = status.uidnext if status.uidnext is not None else 1
        if state.baseline_uidnext is not None and state.uidvalidity == status.uidvalidity:
            baseline = state.baseline_uidnext
        with self.engine.begin() as conn:
            folder_store.save_sync_state(
                conn,
                state.id,
                fence=self.fence,
                uidvalidity=status.uidvalidity,
                uidnext=None,
                highestmodseq=None,
                now=self.clock(),
                baseline_uidnext=baseline,
            )
            fresh = folder_store.get_folder(conn, self.config.account, self.folder)
        assert fresh is not None
        self.log.info("first sync of folder", uidvalidity=status.uidvalidity, messages=status.exists)
        return fresh

    def _resync(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        report: SyncReport,
    ) -> folder_store.FolderState:
        """UIDVALIDITY changed: re-map rows by Message-ID, mark the rest of the old generation expunged."""
        assert state.uidvalidity is not None
        self.log.warning("UIDVALIDITY changed, resyncing", old=state.uidvalidity, new=status.uidvalidity)
        uid_by_message_id: dict[str, int] = {}
        # The flags of the new generation: a re-mapped row must not keep the old message's.
        server_flags: dict[int, tuple[tuple[str, ...], int | None]] = {}
        if status.exists:
            condstore = status.highestmodseq is not None
            response = fetch_meta(client, "1:*", modseq=condstore, message_id_header=True)
            for uid in sorted(response):
                meta = response[uid]
                found = _MESSAGE_ID.search(meta.message_id_header or b"")
                if found:
                    uid_by_message_id.setdefault(found.group().decode("ascii", "replace"), uid)
                server_flags[uid] = (stored_flags(meta.flags), meta.modseq)
        now = self.clock()
        with self.engine.begin() as conn:
            matched = message_store.remap_uidvalidity(
                conn, state.id, state.uidvalidity, status.uidvalidity, uid_by_message_id
            )
            message_store.update_flags(
                conn, state.id, status.uidvalidity, {uid: server_flags[uid] for uid in matched}
            )
            index_work.remap_uidvalidity(
                conn, state.id, state.uidvalidity, status.uidvalidity, uid_by_message_id
            )
            leftovers = message_store.live_uids(conn, state.id, state.uidvalidity)
            report.expunged += message_store.mark_expunged(conn, state.id, state.uidvalidity, leftovers, now)
            # Everything now in the folder counts as already there: nothing of it is answered.
            folder_store.save_sync_state(
                conn,
                state.id,
                fence=self.fence,
                uidvalidity=status.uidvalidity,
                uidnext=None,
                highestmodseq=None,
                now=now,
                baseline_uidnext=status.uidnext if status.uidnext is not None else 1,
            )
            fresh = folder_store.get_folder(conn, self.config.account, self.folder)
        report.resynced = True
        self.log.info("re-mapped by Message-ID", matched=len(matched), expunged=report.expunged)
        assert fresh is not None
        return fresh

    # -- flags and expunges ------------------------------------------------------------------

    def _flag_changes(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        *,
        reconcile: bool,
        flags_unknown: bool,
    ) -> int:
        """Step 4: how many rows' flags changed."""
        condstore = status.highestmodseq is not None
        changed = 0
        if condstore and state.highestmodseq is not None and state.highestmodseq != status.highestmodseq:
            changed += self._flags_since(client, state.id, status, state.highestmodseq)
        if (reconcile and not condstore) or flags_unknown:
            changed += self._reconcile_flags(client, state.id, status)
        return changed

    def _expunges(self, client: IMAPClient, indexer: FolderIndexer, *, reconcile: bool, arrived: int) -> None:
        """Step 5, after ``arrived`` new UIDs were fetched: expunged rows marked, missing ones fetched."""
        state, status = indexer.state, indexer.status
        condstore = status.highestmodseq is not None
        # What the server should hold if nothing was expunged: the last count plus the arrivals.
        # A mismatch (or a periodic reconcile without CONDSTORE) compares the UID lists.
        previous = state.server_count if state.uidnext is not None else 0
        expected = None if previous is None else previous + arrived
        if (reconcile and not condstore) or expected != status.exists:
            expunged, missing = self._reconcile_uids(client, state.id, status)
            indexer.report.expunged += expunged
            if missing:
                indexer.fetch_uids(client, sorted(missing))

    def _flags_since(self, client: IMAPClient, folder_id: int, status: MailboxStatus, modseq: int) -> int:
        response = fetch_meta(client, "1:*", modseq=True, changed_since=modseq)
        server = {uid: (stored_flags(meta.flags), meta.modseq) for uid, meta in response.items()}
        with self.engine.begin() as conn:
            return message_store.update_flags(conn, folder_id, status.uidvalidity, server)

    def _reconcile_flags(self, client: IMAPClient, folder_id: int, status: MailboxStatus) -> int:
        condstore = status.highestmodseq is not None
        server = {
            uid: (stored_flags(meta.flags), meta.modseq)
            for uid, meta in fetch_meta(client, "1:*", modseq=condstore).items()
        }
        with self.engine.begin() as conn:
            return message_store.update_flags(conn, folder_id, status.uidvalidity, server)

    def _reconcile_uids(
        self, client: IMAPClient, folder_id: int, status: MailboxStatus
    ) -> tuple[int, set[int]]:
        """Mark what left the server as expunged; return (how many, UIDs the index is missing).

        A quarantined message is not missing: it stays set aside while it is on the server."""
        on_server = set(client.search("ALL"))
        with self.engine.begin() as conn:
            indexed = message_store.live_uids(conn, folder_id, status.uidvalidity)
            gone = indexed - on_server
            count = message_store.mark_expunged(conn, folder_id, status.uidvalidity, gone, self.clock())
            set_aside = index_work.quarantined_uids(conn, folder_id, status.uidvalidity)
            index_work.forget_gone(conn, folder_id, status.uidvalidity, set_aside - on_server)
        return count, on_server - indexed - set_aside
