"""INDEX_DB_URL, read without SQLAlchemy: the settings and the healthcheck must start fast.

Accepts what the index supports: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` and
``postgresql[+driver]://[user[:password]@]host[:port]/database[?options]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class DatabaseUrl:
    backend: str
    driver: str | None
    database: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    query: dict[str, str] = field(default_factory=dict)

    def masked(self, original: str) -> str:
        """``original`` with the password replaced by ``***``."""
        if not self.password:
            return original
        scheme, _, rest = original.partition("://")
        authority, slash, path = rest.partition("/")
        credentials, _, host = authority.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}{slash}{path}"


def parse_database_url(text: str) -> DatabaseUrl:
    """Parse ``text`` or raise ``ValueError`` saying what is wrong with it."""
    scheme, separator, rest = text.partition("://")
    if not separator or not scheme:
        raise ValueError("is not a database URL (expected sqlite:///PATH or postgresql+psycopg://HOST/DB)")
    backend, _, driver = scheme.partition("+")
    if backend not in BACKENDS:
        raise ValueError(f"must be sqlite:/// or postgresql+psycopg://, not {scheme}://")
    if backend == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError("names no SQLite file (use sqlite:////data/emailops.db)")
        if rest[1:].split("?", 1)[0] == ":memory:":
            # Each worker, and each thread of one (the sync stores from its own thread), would
            # get a database of its own, and the index would be gone at exit.
            raise ValueError("is an in-memory SQLite database, which workers cannot share; name a file")
        return DatabaseUrl(backend, driver or None, database=rest[1:])
    parts = urlsplit(f"//{rest}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname and "host" not in dict(parse_qsl(parts.query)):
        raise ValueError("names no PostgreSQL host")
    if not database:
        raise ValueError("names no PostgreSQL database")
    return DatabaseUrl(
        backend,
        driver or None,
        database=database,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        host=parts.hostname,
        port=port,
        query=dict(parse_qsl(parts.query)),
    )
