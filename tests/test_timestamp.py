"""The Timestamp column type: aware UTC datetimes in and out, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select

from emailops.store.schema import Timestamp

moments = Table("moments", MetaData(), Column("id", Integer, primary_key=True), Column("at", Timestamp))


def test_moments_come_back_aware_in_utc(db_url: str) -> None:
    # A session time zone far from UTC: PostgreSQL answers in it unless the type converts.
    options = {"options": "-c timezone=Asia/Kolkata"} if db_url.startswith("postgresql") else {}
    engine = create_engine(db_url, connect_args=options)
    try:
        moments.metadata.create_all(engine)
        written = {
            1: datetime(2024, 5, 6, 9, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
            2: datetime(2024, 5, 6, 7, 0),  # naive: taken as UTC
            3: None,
        }
        with engine.begin() as conn:
            conn.execute(insert(moments), [{"id": key, "at": value} for key, value in written.items()])
            read = dict(conn.execute(select(moments.c.id, moments.c.at).order_by(moments.c.id)).all())
        assert read == {
            1: datetime(2024, 5, 6, 7, 0, 0, 123456, tzinfo=UTC),
            2: datetime(2024, 5, 6, 7, 0, tzinfo=UTC),
            3: None,
        }
        assert read[1] is not None and read[1].tzinfo is UTC and read[2] is not None and read[2].tzinfo is UTC
    finally:
        engine.dispose()
