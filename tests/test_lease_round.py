"""The lease round: every account's folders shared between all workers, in a bounded number of
statements whatever the number of accounts."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, event, update

from emailops.account_watch import AccountWatch
from emailops.clock import utc_now
from emailops.config import ServerConfig, SignInLimits, TlsSecurity
from emailops.lease_round import LeaseRound, plan_round
from emailops.store.folders import FolderLease
from emailops.store.schema import folders, lease_workers
from tests.index_helpers import index_engine, sync_config


def _view(holders: list[str | None]) -> list[FolderLease]:
    return [
        FolderLease(n, f"acct{n}", "INBOX", holder, live=holder is not None, orphaned=False)
        for n, holder in enumerate(holders)
    ]


def test_a_worker_alone_takes_every_folder() -> None:
    plan = plan_round(_view([None] * 5), "a", live=set(), dead_runs=(), watching=set())
    assert [folder_id for folder_id, _ in plan.take] == [0, 1, 2, 3, 4]


def test_a_worker_takes_up_to_its_share_and_gives_up_what_is_over_it() -> None:
    # Five folders, two workers: two or three each.
    view = _view(["b", "b", None, None, None])
    plan = plan_round(view, "a", live={"a", "b"}, dead_runs=(), watching=set())
    assert len(plan.take) == 3
    # Three workers now: a holds 5 and gives up all over its share of 2, at once.
    view = _view(["a"] * 5)
    plan = plan_round(view, "a", live={"a", "b", "c"}, dead_runs=(), watching={0, 1, 2, 3, 4})
    assert (plan.renew, plan.release) == ([0, 1], [2, 3, 4])
    # At its share of 2 (of 5 over 3) while c holds fewer than 1: one given up, nothing taken.
    view = _view(["a", "a", "b", "b", None])
    plan = plan_round(view, "a", live={"a", "b", "c"}, dead_runs=(), watching={0, 1})
    assert (plan.renew, plan.release, plan.take) == ([0], [1], [])
    # c takes the free folder, up to its share.
    plan = plan_round(view, "c", live={"a", "b", "c"}, dead_runs=(), watching=set())
    assert plan.take == [(4, None)]


def test_workers_that_do_not_announce_themselves_are_counted_by_their_leases() -> None:
    # A worker of the previous release holds leases and has no lease_workers row.
    view = _view(["old", "old", None, None])
    plan = plan_round(view, "a", live={"a"}, dead_runs=(), watching=set())
    assert len(plan.take) == 2


def test_a_dead_workers_folders_are_taken_at_once_and_an_orphan_beyond_the_share() -> None:
    dead = "host:run1:999999999:w2"
    me = "host:run1:1:w1"
    view = _view([dead, dead, me, None])
    view[3] = replace(view[3], orphaned=True)
    plan = plan_round(view, me, live={me, dead, "x"}, dead_runs=(), watching={2})
    assert plan.take == [(0, dead), (1, dead), (3, None)]


@pytest.mark.parametrize("seed", range(30))
def test_rounds_converge_to_a_fair_share_and_stay_there(seed: int) -> None:
    # Workers run their rounds in turn over one shared view; workers come and go. After a few
    # rounds every folder is held once, each worker holds floor or ceil of its share, and further
    # rounds change nothing (no folder goes back and forth).
    rng = random.Random(seed)
    count = rng.randint(1, 60)
    owners: dict[int, str | None] = dict.fromkeys(range(count))
    workers = [f"w{n}" for n in range(rng.randint(1, 8))]

    def round_of(worker: str) -> bool:
        view = [FolderLease(n, "a", str(n), o, o is not None, False) for n, o in owners.items()]
        mine = {n for n, o in owners.items() if o == worker}
        plan = plan_round(view, worker, live=set(workers), dead_runs=(), watching=mine)
        for folder_id in plan.release:
            owners[folder_id] = None
        for folder_id, _ in plan.take:
            owners[folder_id] = worker
        return bool(plan.release or plan.take)

    for _change in range(3):
        for _ in range(3 * len(workers) + 3):
            for worker in rng.sample(workers, len(workers)):
                round_of(worker)
        assert None not in owners.values()
        held = Counter(owners.values())
        low, high = count // len(workers), -(-count // len(workers))
        assert all(low <= held[worker] <= high for worker in workers), held
        assert not any(round_of(worker) for worker in workers for _ in range(2))
        # A worker stops (its folders released) or one more comes.
        if len(workers) > 1 and rng.random() < 0.5:
            gone = workers.pop(rng.randrange(len(workers)))
            owners.update({n: None for n, o in owners.items() if o == gone})
        else:
            workers.append(f"w{len(workers) + 10}")


def _watches(engine: Engine, owner: str, accounts: int) -> list[AccountWatch]:
    # A server that is never connected to: a lease round opens no connection.
    server = ServerConfig(host="127.0.0.1", port=1, username="u", password="p", security=TlsSecurity.NONE)
    return [
        AccountWatch(
            engine,
            server,
            sync_config(account=f"user{n}@127.0.0.1"),
            owner=owner,
            sign_ins=SignInLimits(),
            clock=utc_now,
        )
        for n in range(accounts)
    ]


def test_a_round_costs_the_same_few_statements_for_300_accounts_as_for_3(db_url: str) -> None:
    engine = index_engine(db_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    counts = {}
    for accounts in (3, 300):
        first, second = (
            LeaseRound(engine, f"h:r:{accounts}:w1", ()),
            LeaseRound(engine, f"h:r:{accounts}:w2", ()),
        )
        watches = {
            first: _watches(engine, first.owner, accounts),
            second: _watches(engine, second.owner, accounts),
        }
        for _ in range(3):
            for lease_round, account_watches in watches.items():
                lease_round.run(account_watches)
        statements.clear()
        for lease_round, account_watches in watches.items():
            lease_round.run(account_watches)
        counts[accounts] = len(statements)
        held = [sum(len(watch.watchers) for watch in account_watches) for account_watches in watches.values()]
        # Shared across accounts (one folder each), not per account: half each.
        assert held == [accounts // 2, accounts - accounts // 2] or held == [
            accounts - accounts // 2,
            accounts // 2,
        ]
        for lease_round, account_watches in watches.items():
            for watch in account_watches:
                watch.close()
            lease_round.leave()
    assert counts[300] == counts[3] <= 20, counts


def test_a_stopped_worker_is_no_longer_counted(db_url: str) -> None:
    engine = index_engine(db_url)
    first, second = LeaseRound(engine, "h:r:1:w1", ()), LeaseRound(engine, "h:r:2:w2", ())
    first_watches, second_watches = _watches(engine, first.owner, 4), _watches(engine, second.owner, 4)
    for _ in range(3):
        first.run(first_watches)
        second.run(second_watches)
    assert sum(len(w.watchers) for w in first_watches) == 2
    # The second died: once its presence and leases expired, the first holds all four.
    with engine.begin() as conn:
        long_ago = datetime(2000, 1, 1, tzinfo=UTC)
        conn.execute(
            update(lease_workers).where(lease_workers.c.owner == second.owner).values(expires_at=long_ago)
        )
        conn.execute(
            update(folders).where(folders.c.lease_owner == second.owner).values(lease_expires_at=long_ago)
        )
    first.run(first_watches)
    assert sum(len(w.watchers) for w in first_watches) == 4
    # A fresh second comes: the first gives two up within two rounds, and the second takes them.
    second = LeaseRound(engine, "h:r:3:w2", ())
    second_watches = _watches(engine, second.owner, 4)
    for _ in range(2):
        second.run(second_watches)
        first.run(first_watches)
    second.run(second_watches)
    assert [sum(len(w.watchers) for w in ws) for ws in (first_watches, second_watches)] == [2, 2]


def test_the_folders_of_a_dead_container_are_shared_out_in_one_round_of_each_worker() -> None:
    # Six workers held 34 folders each (203 in all); a container of two died and its leases
    # expired. Each of the four left takes, in its next round, up to 50 and what the others under
    # 50 do not need: after one round each, every folder is held (before: four waited a round).
    survivors = [f"w{n}" for n in range(4)]
    owners: dict[int, str | None] = {n: survivors[n // 34] if n < 136 else None for n in range(203)}
    for worker in survivors:
        view = [FolderLease(n, "a", str(n), o, o is not None, False) for n, o in owners.items()]
        mine = {n for n, o in owners.items() if o == worker}
        plan = plan_round(view, worker, live=set(survivors), dead_runs=(), watching=mine)
        assert not plan.release
        owners.update({folder_id: worker for folder_id, _ in plan.take})
    assert None not in owners.values()
    assert sorted(Counter(owners.values()).values()) == [50, 51, 51, 51]
