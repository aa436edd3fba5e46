"""The download stage of a fetch (see ``fetch_pipeline``): the raw messages of each batch.

A message comes from the raw-message cache when it holds a copy (its flags still from the
server), else it is downloaded with ``BODY.PEEK[]`` and then cached by a thread of its own. A
message above ``max_message_bytes`` is fetched as its header and the beginning of its text.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

from imapclient import IMAPClient

from emailops.cache import CachedCopies, RawMessageCache
from emailops.config import SyncConfig
from emailops.imap.bulk_fetch import FetchedBody, fetch_bodies, fetch_meta, message_set, stored_flags

# How much of an oversized message's text is fetched and indexed.
PARTIAL_TEXT_BYTES = 1024 * 1024


@dataclass
class BatchDownloader:
    """Downloads the batches of one run of UIDs of a folder generation; called with a batch.

    The cache is listed once, when the run begins (see ``RawMessageCache.listing``). Leaving the
    ``with`` block waits for the copies still being written.
    """

    client: IMAPClient
    config: SyncConfig
    folder: str
    uidvalidity: int
    sizes: Mapping[int, int]
    cache: RawMessageCache | None
    _copies: CachedCopies = field(init=False, default_factory=dict)
    _cache_writer: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        if self.cache is not None:
            self._copies = self.cache.listing(self.config.account, self.folder, self.uidvalidity)
        self._cache_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache")

    def __enter__(self) -> BatchDownloader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cache_writer.shutdown(wait=True)

    def __call__(self, uids: list[int]) -> list[FetchedBody]:
        """The raw messages of ``uids``: from the cache, or downloaded (and then cached)."""
        client, account, folder, uidvalidity = self.client, self.config.account, self.folder, self.uidvalidity
        cache = self.cache
        cached = cache.get_many(account, folder, uidvalidity, uids, self._copies) if cache is not None else {}
        large = [
            uid
            for uid in uids
            if self.sizes.get(uid, 0) > self.config.max_message_bytes and uid not in cached
        ]
        whole = [uid for uid in uids if uid not in cached and uid not in large]
        condstore = client.has_capability("CONDSTORE")
        bodies = fetch_bodies(client, whole, modseq=condstore) if whole else []
        if cache is not None and bodies:
            self._cache_writer.submit(
                cache.put_many, account, folder, uidvalidity, {body.uid: body.raw for body in bodies}
            )
        if cached:
            found = fetch_meta(client, message_set(cached), modseq=condstore, internal_date=True)
            for uid in sorted(found.keys() & cached.keys()):
                meta = found[uid]
                bodies.append(
                    FetchedBody(uid, stored_flags(meta.flags), meta.internal_date, meta.modseq, cached[uid])
                )
        for uid in large:
            bodies += self._beginning(uid, condstore)
        return bodies

    def _beginning(self, uid: int, condstore: bool) -> list[FetchedBody]:
        """A message above the limit: its header and the first part of its text, never the whole."""
        items = ["BODY.PEEK[HEADER]", f"BODY.PEEK[TEXT]<0.{PARTIAL_TEXT_BYTES}>"]
        data = self.client.fetch([uid], items).get(uid)
        # Flags from answers that name their UID (see fetch_meta), not from imapclient's merge.
        meta = fetch_meta(self.client, str(uid), modseq=condstore, internal_date=True).get(uid)
        if data is None or meta is None:
            return []
        header = data.get(b"BODY[HEADER]") or b""
        text = next((v for k, v in data.items() if k.startswith(b"BODY[TEXT]")), b"") or b""
        return [FetchedBody(uid, stored_flags(meta.flags), meta.internal_date, meta.modseq, header + text)]
