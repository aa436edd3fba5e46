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
3. New UIDs (UIDNEXT moved): sizes first, then BODY.PEEK[] in batches bounded by count and bytes,
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

import functools
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import Engine, select

from emailops import metrics
from emailops.cache import RawMessageCache
from emailops.clock import Clock, utc_now
from emailops.config import SyncConfig
from emailops.imap.announcements import forget_unsolicited
from emailops.imap.bulk_fetch import FetchedBody, fetch_meta, fetch_sizes, message_set, stored_flags
from emailops.imap.download import BatchDownloader
from emailops.imap.errors import CONNECTION_ERRORS, ImapFolderMissingError
from emailops.imap.fetch_pipeline import fetch_parse_store
from emailops.imap.parsing import Parsed
from emailops.request_ids import request_id
from emailops.store import folders as folder_store
from emailops.store import index_work
from emailops.store import messages as message_store
from emailops.store.database import reading
from emailops.store.schema import messages

log = structlog.get_logger(component="index")
# What decides whether DEBUG lines are rendered (structlog hands them to the standard library).
_stdlib_log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(rb"<[^<>\s]+>")


@dataclass(frozen=True)
class MailboxStatus:
    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None


@dataclass
class SyncReport:
    folder: str
    new: int = 0
    flags_changed: int = 0
    expunged: int = 0
    resynced: bool = False
    seconds: float = 0.0
    new_message_pks: list[int] = field(default_factory=list)
    # False when the pass stopped at its time budget; the next pass carries on where it stopped.
    complete: bool = True
    # True when the folder does not exist on the server (``sync_once`` goes on with the others).
    missing: bool = False


def _status(response: dict[bytes, object]) -> MailboxStatus:
    def number(key: bytes) -> int | None:
        value = response.get(key)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        return int(value) if value is not None else None  # type: ignore[call-overload]

    uidvalidity = number(b"UIDVALIDITY")
    if uidvalidity is None:
        raise ValueError("the server's SELECT answer has no UIDVALIDITY")
    return MailboxStatus(
        uidvalidity=uidvalidity,
        uidnext=number(b"UIDNEXT"),
        exists=number(b"EXISTS") or 0,
        highestmodseq=number(b"HIGHESTMODSEQ"),
    )


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
        status = _status(response)
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
            arrived, report.complete = self._fetch_new(client, state, status, report, deadline)
            if not report.complete:
                return self._finish(report, started)
            report.flags_changed += self._flag_changes(
                client, state, status, reconcile=reconcile, flags_unknown=flags_unknown
            )
            self._expunges(client, state, status, report, reconcile=reconcile, arrived=arrived)
        self._save_state(state.id, status, reconcile=reconcile)
        return self._finish(report, started)

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

    # -- fetching ----------------------------------------------------------------------------

    def _fetch_new(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        report: SyncReport,
        deadline: float | None,
    ) -> tuple[int, bool]:
        """Step 3: fetch the UIDs from the progress mark (UIDNEXT) on. Returns how many the server
        holds from there on, and False when the deadline stopped the fetch (progress is saved)."""
        if status.uidnext is not None and state.uidnext is not None and status.uidnext <= state.uidnext:
            return 0, True
        start = state.uidnext or 1
        # "N:*" always names the last message, even when its UID is below N: filter.
        sizes = {uid: size for uid, size in fetch_sizes(client, f"{start}:*").items() if uid >= start}
        with reading(self.engine) as conn:
            known = set(
                conn.execute(
                    select(messages.c.uid).where(
                        messages.c.folder_id == state.id,
                        messages.c.uidvalidity == status.uidvalidity,
                        messages.c.uid >= start,
                    )
                ).scalars()
            )
            set_aside = index_work.quarantined_uids(conn, state.id, status.uidvalidity)
        wanted = sorted(uid for uid in sizes if uid not in known and uid not in set_aside)
        complete = self._fetch_counting_attempts(client, state, status, wanted, report, sizes, deadline)
        return len(sizes), complete

    def _fetch_counting_attempts(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        wanted: list[int],
        report: SyncReport,
        sizes: dict[int, int],
        deadline: float | None,
    ) -> bool:
        """Fetch new mail with an attempt counted on its first message before the work (see
        ``store.index_work``): retried alone, then quarantined, so that no message stops the folder."""
        if not wanted:
            return True
        first = wanted[0]
        with self.engine.begin() as conn:
            attempts = index_work.begin_attempt(conn, state.id, first)
        if attempts > self.config.max_attempts_per_message:
            self._quarantine(client, state, status, first, attempts - 1)
            return self._fetch_counting_attempts(client, state, status, wanted[1:], report, sizes, deadline)
        try:
            if attempts > 1:
                # Tried before and not indexed: alone this time, so that it holds back no other.
                self._fetch_uids(client, state, status, [first], report, sizes, save_progress=True)
                wanted = wanted[1:]
            return self._fetch_uids(
                client, state, status, wanted, report, sizes, deadline, save_progress=True
            )
        except CONNECTION_ERRORS:
            with self.engine.begin() as conn:
                index_work.give_back_attempt(conn, state.id, first)
            raise

    def _quarantine(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        uid: int,
        attempts: int,
    ) -> None:
        message_id = _message_id(client, uid)
        reason = f"indexing did not finish in {attempts} attempts (it raised, or hung or killed the worker)"
        with self.engine.begin() as conn:
            index_work.quarantine(
                conn,
                state.id,
                status.uidvalidity,
                uid,
                message_id=message_id,
                attempts=attempts,
                reason=reason,
                now=self.clock(),
            )
            folder_store.save_progress(conn, state.id, uidnext=uid + 1, fence=self.fence)
        metrics.message_quarantined("index")
        self.log.error(
            "message quarantined: indexing it keeps failing; the folder goes on (emailops quarantine)",
            uid=uid,
            message_id=message_id,
            attempts=attempts,
            reason=reason,
        )

    def _fetch_uids(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        uids: Sequence[int],
        report: SyncReport,
        sizes: dict[int, int] | None = None,
        deadline: float | None = None,
        *,
        save_progress: bool = False,
    ) -> bool:
        """Fetch and index ``uids`` (ascending) in batches; False when stopped by the deadline.

        With ``save_progress`` every batch also records UIDNEXT as one past its last UID, in the same
        transaction: all UIDs below it are indexed, so a pass cut short (or killed) resumes there.
        """
        if not uids:
            return True
        if sizes is None:
            sizes = fetch_sizes(client, message_set(uids))
        store = functools.partial(self._store, state, status, report, save_progress)
        with BatchDownloader(
            client, self.config, self.folder, status.uidvalidity, sizes, self.cache
        ) as download:
            return fetch_parse_store(uids, sizes, self.config, download, store, deadline)

    def _store(
        self,
        state: folder_store.FolderState,
        status: MailboxStatus,
        report: SyncReport,
        save_progress: bool,
        bodies: list[FetchedBody],
        contents: Parsed,
        batch_started: float,
    ) -> None:
        """The store stage of ``fetch_parse_store``: one batch in one transaction."""
        fetched = [
            message_store.FetchedMessage(
                uid=body.uid,
                flags=stored_flags(body.flags),
                internal_date=body.internal_date,
                modseq=body.modseq,
                content=content,
            )
            for body, content in zip(bodies, contents, strict=True)
        ]
        for item in fetched:
            columns = item.content.columns
            if "message-truncated:" in str(columns["problems"]):
                self.log.warning(
                    "large message indexed from its beginning", uid=item.uid, size=columns["size"]
                )
        with self.engine.begin() as conn:
            inserted = message_store.insert_messages(
                conn,
                state.id,
                status.uidvalidity,
                fetched,
                baseline_uidnext=state.baseline_uidnext,
                now=self.clock(),
            )
            if save_progress and bodies:
                folder_store.save_progress(
                    conn, state.id, uidnext=max(body.uid for body in bodies) + 1, fence=self.fence
                )
        report.new_message_pks += inserted.values()
        metrics.index_batch(time.monotonic() - batch_started)
        if inserted:
            self._tell_indexed(fetched, inserted, state.baseline_uidnext, status.uidvalidity)

    def _tell_indexed(
        self,
        fetched: list[message_store.FetchedMessage],
        inserted: dict[int, int],
        baseline_uidnext: int | None,
        uidvalidity: int,
    ) -> None:
        """Metrics and the "message indexed" line of each message of a committed batch.

        The line is INFO for new mail (arrived after the folder's first sync: what the rules see,
        whose ``request_id`` their decision and the reply's delivery repeat), DEBUG for mail that was
        there before: one INFO line for each of 100,000 old messages would cost the initial sync
        about half its time (85 us a line) and tell nothing the "folder synced" line does not.
        """
        metrics.messages_indexed(self.folder, len(inserted))
        committed = self.clock()
        history_lines = _stdlib_log.isEnabledFor(logging.DEBUG)
        problem_kinds: Counter[str] = Counter()
        for item in fetched:
            if item.uid not in inserted:
                continue
            problems = str(item.content.columns["problems"])
            if problems and metrics.enabled():
                problem_kinds.update(metrics.problem_kind(problem) for problem in problems.split())
            new_mail = baseline_uidnext is not None and item.uid >= baseline_uidnext
            if new_mail and item.internal_date is not None:
                metrics.index_lag((committed - item.internal_date).total_seconds())
            if new_mail or history_lines:
                (self.log.info if new_mail else self.log.debug)(
                    "message indexed",
                    uid=item.uid,
                    size=item.content.columns["size"],
                    parse_ms=round(item.content.parse_seconds * 1000, 2),
                    problems=problems,
                    request_id=request_id(self.config.account, self.folder, uidvalidity, item.uid),
                )
        metrics.parse_problems(problem_kinds)

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

    def _expunges(
        self,
        client: IMAPClient,
        state: folder_store.FolderState,
        status: MailboxStatus,
        report: SyncReport,
        *,
        reconcile: bool,
        arrived: int,
    ) -> None:
        """Step 5, after ``arrived`` new UIDs were fetched: expunged rows marked, missing ones fetched."""
        condstore = status.highestmodseq is not None
        # What the server should hold if nothing was expunged: the last count plus the arrivals.
        # A mismatch (or a periodic reconcile without CONDSTORE) compares the UID lists.
        previous = state.server_count if state.uidnext is not None else 0
        expected = None if previous is None else previous + arrived
        if (reconcile and not condstore) or expected != status.exists:
            expunged, missing = self._reconcile_uids(client, state.id, status)
            report.expunged += expunged
            if missing:
                self._fetch_uids(client, state, status, sorted(missing), report)

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


def _message_id(client: IMAPClient, uid: int) -> str | None:
    """The message's Message-ID, read from its header alone (best effort: the message is bad)."""
    try:
        answer = client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).get(uid, {})
    except IMAPClientAbortError:
        raise
    except IMAPClientError:
        return None
    raw = next((value for key, value in answer.items() if key.startswith(b"BODY[HEADER")), b"")
    _, _, value = bytes(raw or b"").partition(b":")
    return value.strip().decode("ascii", "replace")[:998] or None
