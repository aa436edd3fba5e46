"""The database server's clock, as SQL: what leases and claims are timed by.

Hosts' clocks drift apart (containers too), so a lease written with one host's time and checked
with another's can expire early or never. Every lease and claim time is computed in
the database that all workers share, inside the statement that uses it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, DateTime, func, type_coerce
from sqlalchemy.sql.elements import ColumnElement

# SQLite's text form of a UTC time, as SQLAlchemy stores DateTime values there (microseconds).
_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%f000"


def db_now(conn: Connection, offset: timedelta = timedelta(0)) -> ColumnElement[datetime]:
    """The database's current UTC time plus ``offset``: an expression for a statement."""
    moment: ColumnElement[Any]
    if conn.dialect.name == "sqlite":
        moment = func.strftime(_SQLITE_FORMAT, "now", f"{offset.total_seconds():+.6f} seconds")
    else:
        moment = func.statement_timestamp() + offset
    return type_coerce(moment, DateTime(timezone=True))
