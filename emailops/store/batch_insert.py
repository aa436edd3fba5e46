"""A batch of fetched messages written to PostgreSQL by one statement.

The batch travels as one array per column (``unnest``), in binary, and a single statement with
data-modifying CTEs inserts the rows not indexed yet (ON CONFLICT DO NOTHING on (folder,
UIDVALIDITY, UID)), then the search terms and the attachments of exactly those rows, and returns
their keys: one round trip for the whole batch, with the full-text vector (and the ranking vector
of the first terms) computed by the statement itself. Written as SQLAlchemy's multi-row VALUES for
the rows and one INSERT per message for the vectors, the same batch cost this process five times
the CPU (bench/README.md, "PostgreSQL against SQLite").

Another writer inserting the same UIDs meanwhile makes this statement wait for it and then skip
them: RETURNING tells which rows this one inserted, and only those get terms and attachments.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Column, Connection

from emailops.store.content import MessageContent
from emailops.store.fulltext import VECTOR_OF_TERMS, ranked_terms
from emailops.store.schema import messages


@functools.cache
def _statement(columns: tuple[str, ...], pg_types: tuple[str, ...]) -> str:
    listed = ", ".join(f'"{name}"' for name in columns)
    arrays = ", ".join(f"%(c_{name})b::{pg_type}[]" for name, pg_type in zip(columns, pg_types, strict=True))
    texts = "%(terms)b::text[], %(ranked)b::text[]"
    batch = f"unnest({arrays}, {texts}) WITH ORDINALITY AS b({listed}, terms, ranked, n)"
    files = (
        "unnest(%(f_uid)b::bigint[], %(f_filename)b::text[], %(f_content_type)b::text[], "
        "%(f_size)b::bigint[]) WITH ORDINALITY AS f(uid, filename, content_type, size, n)"
    )
    # Only the schema's column names and types are formatted in; every value is a parameter.
    return (
        f"WITH batch AS (SELECT * FROM {batch}), "  # noqa: S608  # nosec B608
        f"new AS (INSERT INTO messages ({listed}) SELECT {listed} FROM batch ORDER BY n "
        "ON CONFLICT (folder_id, uidvalidity, uid) DO NOTHING RETURNING id, uid), "
        "vectors AS (INSERT INTO search_terms (message_pk, vector, rank_vector) "
        f"SELECT new.id, {VECTOR_OF_TERMS.format('batch.terms')}, {VECTOR_OF_TERMS.format('batch.ranked')} "
        "FROM new JOIN batch USING (uid)), "
        "files AS (INSERT INTO attachments (message_pk, filename, content_type, size) "
        f"SELECT new.id, f.filename, f.content_type, f.size FROM new JOIN {files} USING (uid) ORDER BY f.n) "
        "SELECT id, uid FROM new"
    )


def _converter(column: Column[Any], conn: Connection) -> Callable[[Any], Any]:
    """What SQLAlchemy would bind for a value of ``column`` (an aware moment for a Timestamp)."""
    if column.name == "address_lists":
        return json.dumps  # sent as JSON text, parsed by the jsonb[] cast
    processor = column.type.bind_processor(conn.dialect)
    return processor if processor is not None else _unchanged


def _unchanged(value: Any) -> Any:
    return value


def store_batch(
    conn: Connection, rows: list[dict[str, object]], by_uid: Mapping[int, MessageContent]
) -> dict[int, int]:
    """Insert the ``rows`` (``messages`` columns) not indexed yet, with the search terms and
    attachments of their contents (``by_uid``); return uid -> primary key of those inserted."""
    columns = tuple(column for column in messages.c if column.name in rows[0])
    names = tuple(column.name for column in columns)
    types = tuple(column.type.compile(dialect=conn.dialect) for column in columns)
    params: dict[str, list[Any]] = {}
    for column in columns:
        convert = _converter(column, conn)
        params[f"c_{column.name}"] = [convert(row[column.name]) for row in rows]
    uids = [int(row["uid"]) for row in rows]  # type: ignore[call-overload]
    params["terms"] = [by_uid[uid].search_terms for uid in uids]
    params["ranked"] = [ranked_terms(terms) for terms in params["terms"]]
    files = [(uid, *attachment) for uid in uids for attachment in by_uid[uid].attachments]
    for index, name in enumerate(("f_uid", "f_filename", "f_content_type", "f_size")):
        params[name] = [file[index] for file in files]
    result = conn.exec_driver_sql(_statement(names, types), params)
    return {uid: pk for pk, uid in result.all()}
