"""The claimable-row helper on SQLite and PostgreSQL (``db_url``): claim, attempts, expiry by the
database's clock and takeover, fencing by claimer and attempt, and the operator's retry and cancel
of one account's row."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, select, update

from emailops.store import work_queue
from emailops.store.database import create_index_engine
from emailops.store.db_clock import db_now
from emailops.store.schema import Id, Timestamp

tasks = Table(
    "tasks",
    MetaData(),
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("account", String(100), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_by", String(200)),
    Column("claimed_at", Timestamp),
    Column("result", String(100)),
)
QUEUE = work_queue.WorkQueue.on(tasks, pending="pending", working="working")
HOUR = timedelta(hours=1)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_index_engine(db_url)
    tasks.metadata.create_all(engine)
    yield engine
    engine.dispose()


def add(engine: Engine, account: str = "a", state: str = "pending") -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                tasks.insert().values(account=account, state=state).returning(tasks.c.id)
            ).scalar_one()
        )


def claim(engine: Engine, claimer: str, timeout: timedelta = HOUR) -> work_queue.Claim | None:
    with engine.begin() as conn:
        candidates = (tasks.c.state == "pending") | work_queue.stale(conn, QUEUE, claim_timeout=timeout)
        return work_queue.claim_next(conn, QUEUE, claimer, candidates=candidates, order_by=(tasks.c.id,))


def row(engine: Engine, row_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(conn.execute(select(tasks).where(tasks.c.id == row_id)).mappings().one())


def age_claim(engine: Engine, row_id: int, by: timedelta) -> None:
    """Move the claim's time back by ``by``, by the database's clock (as if it was made then)."""
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == row_id).values(claimed_at=db_now(conn, -by)))


def test_claim_takes_the_first_pending_row_once_and_counts_the_attempt(engine: Engine) -> None:
    first, second = add(engine), add(engine)
    add(engine, state="done")
    taken = claim(engine, "w1")
    assert taken == work_queue.Claim(first, "w1", 1)
    stored = row(engine, first)
    assert stored["state"] == "working" and stored["claimed_by"] == "w1" and stored["attempts"] == 1
    assert stored["claimed_at"] is not None
    assert claim(engine, "w2") == work_queue.Claim(second, "w2", 1)
    assert claim(engine, "w3") is None  # the done row is no candidate, the working ones are held


def test_claim_row_is_refused_when_the_row_is_not_a_candidate(engine: Engine) -> None:
    row_id = add(engine)
    with engine.begin() as conn:
        pending = tasks.c.state == "pending"
        assert work_queue.claim_row(conn, QUEUE, row_id, None, candidates=pending) == work_queue.Claim(
            row_id, None, 1
        )
        assert work_queue.claim_row(conn, QUEUE, row_id, "w2", candidates=pending) is None
        # A claimer-less claim (a stage run without a process identity) is fenced on NULL.
        assert work_queue.settle(conn, QUEUE, work_queue.Claim(row_id, None, 1), {"state": "done"})


def test_an_expired_claim_is_taken_over_by_the_database_clock_and_the_old_holder_is_fenced(
    engine: Engine,
) -> None:
    row_id = add(engine)
    old = claim(engine, "w1")
    assert old is not None
    assert claim(engine, "w2") is None  # not expired: an hour's timeout, claimed just now
    with engine.connect() as conn:
        expired = select(tasks.c.id).where(work_queue.stale(conn, QUEUE, claim_timeout=HOUR))
        assert conn.execute(expired).all() == []
    age_claim(engine, row_id, HOUR + timedelta(minutes=1))
    new = claim(engine, "w2")
    assert new == work_queue.Claim(row_id, "w2", 2)
    with engine.begin() as conn:
        assert not work_queue.still_held(conn, QUEUE, old)
        assert not work_queue.settle(conn, QUEUE, old, {"state": "done", "result": "w1's"})
        assert work_queue.still_held(conn, QUEUE, new)
        assert work_queue.settle(conn, QUEUE, new, {"state": "done", "result": "w2's"})
    assert row(engine, row_id)["result"] == "w2's"


def test_fencing_needs_the_same_attempt_not_only_the_same_claimer(engine: Engine) -> None:
    row_id = add(engine)
    first = claim(engine, "w1")
    assert first is not None
    age_claim(engine, row_id, 2 * HOUR)
    again = claim(engine, "w1")  # the same process claims it again after its claim expired
    assert again == work_queue.Claim(row_id, "w1", 2)
    with engine.begin() as conn:
        assert not work_queue.settle(conn, QUEUE, first, {"state": "done", "result": "late"})
    assert row(engine, row_id)["result"] is None and row(engine, row_id)["state"] == "working"


def test_dead_claimers_are_stale_at_once(engine: Engine) -> None:
    row_id = add(engine)
    assert claim(engine, "gone") is not None
    with engine.begin() as conn:
        assert work_queue.working_claimers(conn, QUEUE, "a") == ["gone"]
        assert work_queue.working_claimers(conn, QUEUE, "b") == []
        stale = work_queue.stale(conn, QUEUE, claim_timeout=None, dead_claimers=("gone",))
        taken = work_queue.claim_next(conn, QUEUE, "w2", candidates=stale, order_by=(tasks.c.id,))
    assert taken == work_queue.Claim(row_id, "w2", 2)
    with engine.connect() as conn, pytest.raises(ValueError):
        work_queue.stale(conn, QUEUE, claim_timeout=None)


def test_operator_retry_and_cancel_change_only_the_named_accounts_row(engine: Engine) -> None:
    mine, theirs = add(engine, "a", state="failed"), add(engine, "b", state="failed")
    retry = work_queue.retry_values(QUEUE)
    with engine.begin() as conn:
        conn.execute(update(tasks).values(attempts=3, claimed_by="w1"))
        # Account a's operator names b's row: refused, b's row untouched.
        assert not work_queue.change_by_operator(
            conn, QUEUE, theirs, account="a", allowed=("failed",), values=retry
        )
        assert work_queue.change_by_operator(
            conn, QUEUE, mine, account="a", allowed=("failed",), values=retry
        )
        # A state that is not allowed: refused.
        assert not work_queue.change_by_operator(
            conn, QUEUE, mine, account="a", allowed=("failed",), values={"state": "cancelled"}
        )
        assert not work_queue.change_by_operator(
            conn, QUEUE, theirs, account="a", allowed=("failed",), values={"state": "cancelled"}
        )
    assert {k: row(engine, mine)[k] for k in ("state", "attempts", "claimed_by")} == {
        "state": "pending",
        "attempts": 0,
        "claimed_by": None,
    }
    assert {k: row(engine, theirs)[k] for k in ("state", "attempts", "claimed_by")} == {
        "state": "failed",
        "attempts": 3,
        "claimed_by": "w1",
    }
    with engine.begin() as conn:
        assert work_queue.change_by_operator(
            conn, QUEUE, theirs, account="b", allowed=("failed",), values={"state": "cancelled"}
        )
    assert row(engine, theirs)["state"] == "cancelled"


def test_concurrent_claimers_never_share_a_row(engine: Engine) -> None:
    ids = {add(engine) for _ in range(30)}

    def drain(claimer: str) -> list[int]:
        taken: list[int] = []
        while (next_claim := claim(engine, claimer)) is not None:
            taken.append(next_claim.row_id)
        return taken

    with ThreadPoolExecutor(max_workers=4) as pool:
        per_claimer = list(pool.map(drain, [f"w{n}" for n in range(4)]))
    assert sorted(row_id for taken in per_claimer for row_id in taken) == sorted(ids)


def test_the_rules_stage_fences_by_claimer_and_attempt_and_recovers_one_account(engine: Engine) -> None:
    """``store.rules_work`` on the helper: a decision of another claimer or an earlier attempt is
    refused, and one account's recovery of stalled claims leaves another account's alone."""
    from emailops.store import folders as folder_store
    from emailops.store import messages as message_store
    from emailops.store import rules_work
    from emailops.store.migrations import migrate
    from emailops.store.schema import messages
    from tests.test_store import NOW, fetched

    migrate(engine)
    with engine.begin() as conn:
        pks = {}
        for account in ("a", "b"):
            folder = folder_store.ensure_folder(conn, account, "INBOX")
            inserted = message_store.insert_messages(
                conn, folder.id, 1, [fetched(1)], baseline_uidnext=1, now=NOW
            )
            pks[account] = inserted[1]
        assert rules_work.claim(conn, pks["a"], "w1") == 1
        assert rules_work.claim(conn, pks["b"], "w1") == 1
        assert not rules_work.finish(conn, pks["a"], 1, claimer="w2")  # another claimer
        assert rules_work.release_failed(conn, pks["a"], 1, claimer="w2", reason="x", max_attempts=1) is None
        conn.execute(update(messages).values(rules_claimed_at=db_now(conn, -2 * HOUR)))
        assert rules_work.recover_stalled(conn, "a", claim_timeout=HOUR, max_attempts=3) == (1, [])
        assert rules_work.claim(conn, pks["a"], "w2") == 2
        assert not rules_work.finish(conn, pks["a"], 1, claimer="w1")  # the stale claim's decision
        assert rules_work.finish(conn, pks["a"], 2, claimer="w2")
        states = dict(conn.execute(select(messages.c.id, messages.c.rules_state)).all())
    assert states == {pks["a"]: "done", pks["b"]: "working"}
