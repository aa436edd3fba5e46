"""Step 3 of a sync pass (see ``sync``): a folder's messages fetched by UID, parsed and stored.

New mail is fetched from the progress mark on, with an attempt counted on its first message before
the work (``store.index_work``): a message that makes indexing raise, hang or kill the worker is
tried again alone, then quarantined, so that no message stops its folder. Each stored batch moves
the progress mark in its own transaction, so a pass cut short (or killed) resumes there.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import Engine, select
from structlog.typing import FilteringBoundLogger

from emailops import metrics
from emailops.cache import RawMessageCache
from emailops.clock import Clock
from emailops.config import SyncConfig
from emailops.imap.bulk_fetch import FetchedBody, fetch_sizes, message_set, stored_flags
from emailops.imap.download import BatchDownloader
from emailops.imap.errors import CONNECTION_ERRORS
from emailops.imap.fetch_pipeline import fetch_parse_store
from emailops.imap.folder_status import MailboxStatus, SyncReport
from emailops.imap.parsing import Parsed
from emailops.request_ids import request_id
from emailops.store import folders as folder_store
from emailops.store import index_work
from emailops.store import messages as message_store
from emailops.store.database import reading
from emailops.store.schema import messages

# The UIDs whose sizes a pass with a deadline asks for at most (see ``FolderIndexer.fetch_new``).
SIZE_WINDOW_UIDS = 1000


@dataclass
class FolderIndexer:
    """Indexes messages of one folder during one pass (``FolderSync`` makes one per pass).

    ``fence`` is the lease epoch every write of the progress mark checks; ``history_lines`` tells
    whether mail that was there before the first sync gets its DEBUG "message indexed" line.
    """

    engine: Engine
    config: SyncConfig
    folder: str
    cache: RawMessageCache | None
    clock: Clock
    fence: int | None
    log: FilteringBoundLogger
    history_lines: bool
    state: folder_store.FolderState
    status: MailboxStatus
    report: SyncReport

    def fetch_new(self, client: IMAPClient, deadline: float | None) -> tuple[int, bool]:
        """Fetch the UIDs from the progress mark (UIDNEXT) on. Returns how many the server holds
        from there on, and False when the deadline stopped the fetch (progress is saved)."""
        state, status = self.state, self.status
        if status.uidnext is not None and state.uidnext is not None and status.uidnext <= state.uidnext:
            return 0, True
        start = state.uidnext or 1
        # A pass with a deadline looks at one window of UIDs: the sizes of a whole large backlog,
        # asked in every short pass, would cost more than the pass's fetching.
        end = None
        if deadline is not None and status.uidnext is not None and status.uidnext - start > SIZE_WINDOW_UIDS:
            end = start + SIZE_WINDOW_UIDS - 1
        # "N:*" always names the last message, even when its UID is below N: filter.
        answer = fetch_sizes(client, f"{start}:{end or '*'}")
        sizes = {uid: size for uid, size in answer.items() if uid >= start}
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
        complete = self._fetch_counting_attempts(client, wanted, sizes, deadline)
        if end is None:
            return len(sizes), complete
        if complete:
            # Every UID of the window is indexed or set aside: the next pass starts above it.
            with self.engine.begin() as conn:
                folder_store.save_progress(conn, state.id, uidnext=end + 1, fence=self.fence)
        return len(sizes), False

    def fetch_uids(
        self,
        client: IMAPClient,
        uids: Sequence[int],
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
        store = functools.partial(self._store, save_progress)
        with BatchDownloader(
            client, self.config, self.folder, self.status.uidvalidity, sizes, self.cache
        ) as download:
            return fetch_parse_store(uids, sizes, self.config, download, store, deadline)

    def _fetch_counting_attempts(
        self, client: IMAPClient, wanted: list[int], sizes: dict[int, int], deadline: float | None
    ) -> bool:
        """Fetch new mail with an attempt counted on its first message before the work: retried
        alone, then quarantined. A dropped connection is not the message's fault: given back."""
        if not wanted:
            return True
        first = wanted[0]
        with self.engine.begin() as conn:
            attempts = index_work.begin_attempt(conn, self.state.id, first)
        if attempts > self.config.max_attempts_per_message:
            self._quarantine(client, first, attempts - 1)
            return self._fetch_counting_attempts(client, wanted[1:], sizes, deadline)
        try:
            if attempts > 1:
                # Tried before and not indexed: alone this time, so that it holds back no other.
                self.fetch_uids(client, [first], sizes, save_progress=True)
                wanted = wanted[1:]
            return self.fetch_uids(client, wanted, sizes, deadline, save_progress=True)
        except CONNECTION_ERRORS:
            with self.engine.begin() as conn:
                index_work.give_back_attempt(conn, self.state.id, first)
            raise

    def _quarantine(self, client: IMAPClient, uid: int, attempts: int) -> None:
        message_id = _message_id(client, uid)
        reason = f"indexing did not finish in {attempts} attempts (it raised, or hung or killed the worker)"
        with self.engine.begin() as conn:
            index_work.quarantine(
                conn,
                self.state.id,
                self.status.uidvalidity,
                uid,
                message_id=message_id,
                attempts=attempts,
                reason=reason,
                now=self.clock(),
            )
            folder_store.save_progress(conn, self.state.id, uidnext=uid + 1, fence=self.fence)
        metrics.message_quarantined("index")
        self.log.error(
            "message quarantined: indexing it keeps failing; the folder goes on (emailops quarantine)",
            uid=uid,
            message_id=message_id,
            attempts=attempts,
            reason=reason,
        )

    def _store(
        self, save_progress: bool, bodies: list[FetchedBody], contents: Parsed, batch_started: float
    ) -> None:
        """The store stage of ``fetch_parse_store``: one batch in one transaction."""
        state, status = self.state, self.status
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
        self.report.new_message_pks += inserted.values()
        metrics.index_batch(time.monotonic() - batch_started)
        if inserted:
            self._tell_indexed(fetched, inserted)

    def _tell_indexed(self, fetched: list[message_store.FetchedMessage], inserted: dict[int, int]) -> None:
        """Metrics and the "message indexed" line of each message of a committed batch.

        The line is INFO for new mail (arrived after the folder's first sync: what the rules see,
        whose ``request_id`` their decision and the reply's delivery repeat), DEBUG for mail that was
        there before: one INFO line for each of 100,000 old messages would cost the initial sync
        about half its time (85 us a line) and tell nothing the "folder synced" line does not.
        """
        metrics.messages_indexed(self.folder, len(inserted), self.config.account)
        committed = self.clock()
        baseline_uidnext = self.state.baseline_uidnext
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
            if new_mail or self.history_lines:
                (self.log.info if new_mail else self.log.debug)(
                    "message indexed",
                    uid=item.uid,
                    size=item.content.columns["size"],
                    parse_ms=round(item.content.parse_seconds * 1000, 2),
                    problems=problems,
                    request_id=request_id(
                        self.config.account, self.folder, self.status.uidvalidity, item.uid
                    ),
                )
        metrics.parse_problems(problem_kinds)


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
