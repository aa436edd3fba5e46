"""A size-bounded cache of raw messages in ``CACHE_DIR``, so that ``emailops reindex`` can rebuild
the index without downloading the mailbox again.

Layout: ``<dir>/raw/<folder key>/<uidvalidity>/<uid>-<size>.eml`` where the folder key is a hash of
the account and folder name. A (folder, UIDVALIDITY, UID) names one message for ever (RFC 3501), so
an entry never goes stale. When the total passes ``max_bytes`` the least recently written entries go.

A file is written in place, and its name says how long it must be: one cut short (a crash, a full
disk) is not that long and is ignored, as if absent. This costs a third of writing each file to a
temporary name and renaming it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import structlog

log = structlog.get_logger(component="index")

# UID -> (file name, the length its name says).
CachedCopies = dict[int, tuple[str, int]]


class RawMessageCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.root = directory / "raw"
        self.max_bytes = max_bytes
        self._total: int | None = None
        self._write_failure_told = False

    def _folder_dir(self, account: str, folder: str, uidvalidity: int) -> Path:
        key = hashlib.sha256(f"{account}\0{folder}".encode()).hexdigest()[:24]
        return self.root / key / str(uidvalidity)

    def get_many(
        self,
        account: str,
        folder: str,
        uidvalidity: int,
        uids: Iterable[int],
        copies: CachedCopies | None = None,
    ) -> dict[int, bytes]:
        """The cached messages among ``uids``: found in ``copies`` (``listing``'s answer) or else in
        a fresh listing; only the hits are read."""
        if copies is None:
            copies = self.listing(account, folder, uidvalidity)
        base = str(self._folder_dir(account, folder, uidvalidity))
        found: dict[int, bytes] = {}
        for uid in uids:
            if uid not in copies:
                continue
            name, size = copies[uid]
            try:
                with open(os.path.join(base, name), "rb") as cached:
                    data = cached.read()
            except OSError:
                continue
            if len(data) == size:
                found[uid] = data
        return found

    def get_one(self, account: str, folder: str, uidvalidity: int, uid: int, size: int) -> bytes | None:
        """Message ``uid`` if it is cached whole with ``size`` bytes (the size the server gave, as
        the index keeps it), without listing the folder's copies; None otherwise."""
        path = os.path.join(self._folder_dir(account, folder, uidvalidity), f"{uid}-{size}.eml")
        try:
            with open(path, "rb") as cached:
                data = cached.read()
        except OSError:
            return None
        return data if len(data) == size else None

    def listing(self, account: str, folder: str, uidvalidity: int) -> CachedCopies:
        """The copies held for one folder, from one directory listing. A sync pass lists once and
        reads each batch from it: what the pass writes meanwhile it has just downloaded and does
        not ask for again, while listing a growing directory per batch cost a few percent of an
        initial sync."""
        try:
            names = os.listdir(self._folder_dir(account, folder, uidvalidity))
        except OSError:
            return {}
        copies: CachedCopies = {}
        for name in names:
            stem, dot, extension = name.partition(".")
            number, dash, length = stem.partition("-")
            if extension == "eml" and dot and dash and number.isdigit() and length.isdigit():
                copies[int(number)] = (name, int(length))
        return copies

    def put_many(self, account: str, folder: str, uidvalidity: int, items: dict[int, bytes]) -> None:
        """Store messages; a failure to write (disk full, read-only) only costs a later download,
        and is logged once per cache so that the operator learns reindex will download again."""
        if self.max_bytes <= 0 or not items:
            return
        directory = self._folder_dir(account, folder, uidvalidity)
        base = str(directory)  # plain strings: pathlib per file was most of the cost here
        try:
            directory.mkdir(parents=True, exist_ok=True)
            added = 0
            for uid, raw in items.items():
                if len(raw) > self.max_bytes // 10:
                    continue
                _write(os.path.join(base, f"{uid}-{len(raw)}.eml"), raw)
                added += len(raw)
        except OSError as exc:
            if not self._write_failure_told:
                self._write_failure_told = True
                log.warning(
                    "raw message cache not writable; indexing goes on, reindex will download again",
                    cache_dir=str(self.root.parent),
                    error=str(exc),
                )
            return
        if self._total is None:
            self._total = self._measure()
        else:
            self._total += added
        if self._total > self.max_bytes:
            self._evict()

    def _entries(self) -> list[os.DirEntry[str]]:
        entries: list[os.DirEntry[str]] = []
        if not self.root.is_dir():
            return entries
        stack = [str(self.root)]
        while stack:
            with os.scandir(stack.pop()) as listing:
                for entry in listing:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.name.endswith(".eml"):
                        entries.append(entry)
        return entries

    def _measure(self) -> int:
        return sum(entry.stat().st_size for entry in self._entries())

    def _evict(self) -> None:
        entries = sorted(self._entries(), key=lambda entry: entry.stat().st_mtime)
        total = sum(entry.stat().st_size for entry in entries)
        target = int(self.max_bytes * 0.9)
        for entry in entries:
            if total <= target:
                break
            size = entry.stat().st_size
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            total -= size
        self._total = total


def _write(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)
