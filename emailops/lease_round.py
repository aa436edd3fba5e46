"""One worker's lease round: which folders of all its accounts it watches, in two transactions
whatever the number of accounts (a read, then the writes).

The folders of every account are shared out between all live workers of all containers
(``store.lease_workers``): with N folders and W workers each holds between ``N // W`` and
``ceil(N / W)``. A worker over that gives folders up, and a worker at it gives one up while
another holds fewer than ``N // W``; it takes a free folder (never watched, released, or whose
holder's lease expired) while under ``N // W``, and up to ``ceil(N / W)`` what the other workers
under ``N // W`` do not need. Beyond it a worker still takes the folders of a
replaced worker of its own run (at once) and folders nobody has watched for two lease periods, so
that a folder is never left unwatched by a miscount. The round also renews the worker's
connection slots of every account (``store.connection_slots``) and hands each account its
folders and the count of workers that share its connections (``AccountWatch.hold``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy import Engine

from emailops.config import SyncConfig
from emailops.processes import is_dead_sibling
from emailops.store import connection_slots, lease_workers
from emailops.store import folders as folder_store
from emailops.store.database import reading
from emailops.store.folders import FolderLease

# A folder of a worker that died (and is not replaced) is taken over after at most LEASE_TTL; its
# connection slots are free after as long.
LEASE_TTL = timedelta(seconds=30)


class LeasedAccount(Protocol):
    """What a lease round needs of one account's watch (``account_watch.AccountWatch``)."""

    config: SyncConfig

    def watched_ids(self) -> list[int]: ...

    def hold(
        self,
        leases: dict[str, tuple[int, int]],
        *,
        given_up: set[str],
        holders: int,
        slots_held: int,
        own_slots: set[int],
    ) -> None: ...


@dataclass
class RoundPlan:
    """What a worker does with the leases in one round (folder ids)."""

    renew: list[int] = field(default_factory=list)
    # With the dead holder it replaces (a worker of its own run), taken at once.
    take: list[tuple[int, str | None]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)


def plan_round(
    view: Sequence[FolderLease],
    owner: str,
    live: Collection[str],
    dead_runs: tuple[str, ...],
    watching: set[int],
) -> RoundPlan:
    """The round of ``owner``, watching the folders ``watching``, over the folders of ``view``
    and the live workers ``live`` (those holding a live lease count too: a worker of a release
    before ``lease_workers`` does not announce itself)."""
    holdings = Counter(lease.owner for lease in view if lease.live and lease.owner is not None)
    owners = {lease.owner for lease in view if lease.owner is not None} | set(live)
    dead = {other for other in owners if is_dead_sibling(owner, other, dead_runs)}
    workers = ({*live, *holdings} - dead) | {owner}
    low, high = len(view) // len(workers), math.ceil(len(view) / len(workers))
    others_short = any(holdings[worker] < low for worker in workers if worker != owner)
    plan = RoundPlan()
    mine = sorted(lease.id for lease in view if lease.owner == owner and lease.id in watching)
    excess = len(mine) - high if len(mine) > high else int(len(mine) > low and others_short)
    plan.renew, plan.release = mine[: len(mine) - excess], mine[len(mine) - excess :]
    held = len(plan.renew)
    for lease in view:
        if lease.owner in dead:
            plan.take.append((lease.id, lease.owner))
            held += 1
    # Free: never watched, released or expired; or recorded as this worker's but not watched.
    kept = set(mine)
    free = [
        lease
        for lease in view
        if lease.id not in kept and lease.owner not in dead and (not lease.live or lease.owner == owner)
    ]
    # What the other workers under ``low`` still need of the free folders: beyond ``low`` a worker
    # takes only what is left over, so that a container's folders freed at once are shared out in
    # one round rather than two.
    needed = sum(max(0, low - holdings[worker]) for worker in workers if worker != owner)
    left = len(free)
    for lease in free:
        if held < low or (held < high and left > needed) or lease.orphaned:
            plan.take.append((lease.id, None))
            held += 1
        left -= 1
    return plan


class LeaseRound:
    def __init__(
        self, engine: Engine, owner: str, dead_runs: tuple[str, ...], ttl: timedelta = LEASE_TTL
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.dead_runs = dead_runs
        self.ttl = ttl

    def run(self, accounts: Sequence[LeasedAccount]) -> None:
        """Renew, take or give up the folder leases of ``accounts`` and the worker's connection
        slots, and hand each account its folders."""
        by_account = {watch.config.account: watch for watch in accounts}
        wanted = {(watch.config.account, folder) for watch in accounts for folder in watch.config.folders}
        with reading(self.engine) as conn:
            view = folder_store.lease_view(conn, by_account, 2 * self.ttl)
            live = lease_workers.live_workers(conn)
            slots_held = connection_slots.slots_held(conn, by_account)
        missing = wanted - {(lease.account, lease.name) for lease in view}
        if missing:
            view = self._add_folders(missing, by_account)
        view = [lease for lease in view if (lease.account, lease.name) in wanted]
        watching = {folder_id for watch in accounts for folder_id in watch.watched_ids()}
        plan = plan_round(view, self.owner, live, self.dead_runs, watching)
        with self.engine.begin() as conn:
            lease_workers.announce(conn, self.owner, self.ttl)
            for folder_id in plan.release:
                folder_store.release_lease(conn, folder_id, self.owner)
            epochs = folder_store.renew_leases(conn, self.owner, plan.renew, self.ttl)
            for folder_id, replacing in plan.take:
                epoch = folder_store.acquire_lease(conn, folder_id, self.owner, self.ttl, replacing=replacing)
                if epoch is not None:
                    epochs[folder_id] = epoch
            slots = connection_slots.renew_holder_slots(conn, self.owner, self.ttl)
        leases_of: dict[str, list[FolderLease]] = {account: [] for account in by_account}
        for lease in view:
            leases_of[lease.account].append(lease)
        released = set(plan.release)
        for account, watch in by_account.items():
            leases = leases_of[account]
            held = {lease.name: (lease.id, epochs[lease.id]) for lease in leases if lease.id in epochs}
            others = {lease.owner for lease in leases if lease.live and lease.owner not in (None, self.owner)}
            watch.hold(
                held,
                given_up={lease.name for lease in leases if lease.id in released},
                holders=len(others) + bool(held),
                slots_held=slots_held.get(account, 0),
                own_slots=slots.get(account, set()),
            )

    def leave(self) -> None:
        """The worker stops: it no longer counts in the others' shares (its leases are released
        by the accounts' ``close``)."""
        with self.engine.begin() as conn:
            lease_workers.leave(conn, self.owner)

    def _add_folders(self, missing: set[tuple[str, str]], accounts: Collection[str]) -> list[FolderLease]:
        with self.engine.begin() as conn:
            for account, name in sorted(missing):
                folder_store.ensure_folder(conn, account, name)
            return folder_store.lease_view(conn, accounts, 2 * self.ttl)
