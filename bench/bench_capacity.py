"""How many accounts one container serves: memory and IMAP connections of one daemon (not a test).

    python -m bench.bench_capacity --accounts 50            # 10 minutes, WORKERS=2, SQLite
    python -m bench.bench_capacity --accounts 500 --minutes 10 [--pg]

One container-equivalent daemon (``python -m prod.run``, ``WORKERS=2``, no ``EMAIL_*``) serves
``--accounts`` accounts of the index, each a user of one private Dovecot with
``--messages`` messages in each of its ``--folders`` folders, added with ``emailops accounts
import`` as an operator would. While it runs, one new message is delivered every
``--mail-every`` seconds to an account in turn. Every ``--sample-seconds`` the bench reads the
resident memory (VmRSS) of the supervisor and every process under it, how many accounts finished
their first sync, and the IMAP connections per account as Dovecot counts them (``doveadm who``).
It prints the samples, then the figures after ``--minutes``: total RSS (target: 500 accounts
under 400 MB after 10 minutes), RSS per process, connections per account (min / max / mean,
the budget being ``IMAP_MAX_CONNECTIONS``); they go to ``bench/results/capacity-N.json``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._accounts import accounts_file, import_accounts, index_accounts_env, index_users, user
from bench._report import figure, headline, write_result
from bench._servers import Daemon, emailops_env, ensure_inotify_instances, fresh_postgres, synthetic_messages
from bench.soak import children, command_line, read_proc
from localmail.dovecot import LocalDovecot
from tests.index_helpers import message

REPO = Path(__file__).resolve().parents[1]
TARGET_MB = 400.0
TARGET_ACCOUNTS = 500
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def pss_kb(pid: int) -> int:
    """Proportional set size: pages shared with other processes counted by their share."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)


def daemon_tree(supervisor: int) -> dict[str, tuple[int, int]]:
    """(VmRSS, PSS) in kB of the supervisor and every process under it, by role."""
    found: dict[str, tuple[int, int]] = {}
    queue = [supervisor]
    while queue:
        pid = queue.pop()
        proc = read_proc(pid)
        if proc is not None:
            role = "worker"
            if pid == supervisor:
                role = "supervisor"
            elif "resource_tracker" in command_line(pid):
                role = "tracker"  # multiprocessing's resource tracker, started with the workers
            found[f"{role} {pid}"] = (proc[0], pss_kb(pid))
        queue += children(pid)
    return found


def by_role(values: dict[str, float], divisor: float, decimals: int) -> str:
    """``supervisor 90, worker 88, ...`` from values keyed by role and pid."""
    return ", ".join(f"{role.split()[0]} {value / divisor:.{decimals}f}" for role, value in values.items())


def connections(dovecot: LocalDovecot, count: int) -> list[int]:
    """IMAP connections logged in now, per account (``doveadm who -1``: one line per connection)."""
    per_user: collections.Counter[str] = collections.Counter()
    for line in dovecot.doveadm("who", "-1").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[1:2] == ["imap"]:
            per_user[fields[0]] += 1
    return [per_user[user(n)] for n in range(count)]


def count(url: str, sql: str) -> int:
    from sqlalchemy import text

    from emailops.store.database import create_index_engine

    engine = create_index_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folders = ["INBOX", "Support", "Billing", "Archive2"][: args.folders]
    users = index_users(args.accounts)
    # Dovecot runs one imap process per connection, up to 1,024 (its imap service's limit).
    figure("kernel", ensure_inotify_instances(args.accounts * len(folders)))
    with LocalDovecot(users) as dovecot:
        started = time.monotonic()
        for n, name in enumerate(users):
            for folder in folders:
                dovecot.bulk_load(name, folder, synthetic_messages(args.messages, seed=n))
        figure(
            "mailboxes loaded",
            f"{args.accounts} x {len(folders)} folders x {args.messages} messages"
            f" in {time.monotonic() - started:.0f} s",
        )
        url = (
            fresh_postgres(PG_ADMIN, "emailops_bench_capacity")
            if args.pg
            else f"sqlite:///{work / 'emailops.db'}"
        )
        env = index_accounts_env(emailops_env(imap_port=dovecot.imap_port, work_dir=work)) | {
            "INDEX_DB_URL": url,
            "WORKERS": str(args.workers),
            "IMAP_IDLE_FOLDERS": str(args.idle_folders),
        }
        (work / "rules.toml").write_text("")
        import_accounts(env, work, accounts_file(work / "accounts.toml", dovecot, args.accounts, folders))
        daemon = Daemon(env, work)
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        next_mail = t0
        turn = itertools.cycle(range(args.accounts))
        delivered = 0
        try:
            while (elapsed := time.monotonic() - t0) < args.minutes * 60:
                if not daemon.alive():
                    raise SystemExit(f"the daemon exited: {daemon.log_tail()}")
                if time.monotonic() >= next_mail and samples:  # from the first sample on
                    delivered += 1
                    dovecot.deliver(user(next(turn)), message(100_000 + delivered))
                    next_mail += args.mail_every
                if not samples or elapsed >= samples[-1]["t"] + args.sample_seconds:
                    tree = daemon_tree(daemon.process.pid)
                    per_account = connections(dovecot, args.accounts)
                    sample = {
                        "t": round(elapsed),
                        "rss_total_kb": sum(rss for rss, _ in tree.values()),
                        "pss_total_kb": sum(pss for _, pss in tree.values()),
                        "rss_kb": {role: rss for role, (rss, _) in sorted(tree.items())},
                        "first_synced_folders": count(
                            url, "SELECT count(*) FROM folders WHERE first_synced_at IS NOT NULL"
                        ),
                        "connections": sum(per_account),
                        "connections_max": max(per_account),
                        "accounts_connected": sum(1 for c in per_account if c),
                    }
                    samples.append(sample)
                    print(
                        f"   t={sample['t']:>4} s  RSS {sample['rss_total_kb'] / 1024:6.1f} MB "
                        f"({by_role(sample['rss_kb'], 1024, 0)}), "
                        f"PSS {sample['pss_total_kb'] / 1024:.1f} MB  "
                        f"first-synced folders {sample['first_synced_folders']}/{len(users) * len(folders)}  "
                        f"IMAP connections {sample['connections']} (at most {sample['connections_max']} "
                        f"per account, {sample['accounts_connected']} accounts)",
                        flush=True,
                    )
                time.sleep(0.5)
            indexed = count(url, "SELECT count(*) FROM messages")
            synced = count(url, "SELECT count(*) FROM folders WHERE first_synced_at IS NOT NULL")
            per_account = connections(dovecot, args.accounts)
        finally:
            daemon.stop()
        log = daemon.log_path.read_text(errors="replace")
    last = samples[-1]
    return {
        "accounts": args.accounts,
        "folders_per_account": len(folders),
        "messages_per_folder": args.messages,
        "workers": args.workers,
        "idle_folders": args.idle_folders,
        "backend": "postgresql" if args.pg else "sqlite",
        "minutes": args.minutes,
        "load_average_end": os.getloadavg(),
        "delivered": delivered,
        "first_synced_folders": synced,
        # Signs that the workers did not keep up: leases renewed too late, a loop stuck > 60 s.
        "leases_lost": log.count("lost the lease of a folder to another worker"),
        "workers_restarted": log.count('"worker died; restarting"'),
        "indexed": indexed,
        "expected_indexed": args.accounts * len(folders) * args.messages + delivered,
        "rss_total_mb": last["rss_total_kb"] / 1024,
        "rss_per_process_mb": {role: kb / 1024 for role, kb in last["rss_kb"].items()},
        "pss_total_mb": last["pss_total_kb"] / 1024,
        "connections_per_account": {
            "min": min(per_account),
            "max": max(per_account),
            "mean": statistics.mean(per_account),
        },
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--folders", type=int, default=1, choices=range(1, 5), help="folders per account (1-4)"
    )
    parser.add_argument("--idle-folders", type=int, default=4, help="IMAP_IDLE_FOLDERS (default 4)")
    parser.add_argument("--messages", type=int, default=20, help="messages per folder before the start")
    parser.add_argument("--mail-every", type=float, default=5.0, help="seconds between two new messages")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--pg", action="store_true", help="PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    args = parser.parse_args()
    headline(f"{args.accounts} accounts, one daemon with WORKERS={args.workers}, {args.minutes:g} minutes")
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as work:
        result = run(args, Path(work))
    rss = result["rss_total_mb"]
    connected = result["connections_per_account"]
    figure(
        f"RSS after {args.minutes:g} min, supervisor + workers",
        f"{rss:.1f} MB ({by_role(result['rss_per_process_mb'], 1, 1)})",
        *((f"< {TARGET_MB:.0f} MB", rss < TARGET_MB) if args.accounts == TARGET_ACCOUNTS else ()),
    )
    figure("PSS after the same time (shared pages shared out)", f"{result['pss_total_mb']:.1f} MB")
    figure("RSS per account (total / accounts)", f"{rss * 1024 / args.accounts:.0f} kB")
    figure(
        "IMAP connections per account",
        f"min {connected['min']}, max {connected['max']}, mean {connected['mean']:.2f}",
    )
    figure("messages indexed / expected", f"{result['indexed']} / {result['expected_indexed']}")
    figure(
        "folders first-synced",
        f"{result['first_synced_folders']} / {args.accounts * result['folders_per_account']}",
    )
    figure("leases lost / workers restarted", f"{result['leases_lost']} / {result['workers_restarted']}")
    figure("load average at the end (1, 5, 15 min)", " ".join(f"{v:.1f}" for v in result["load_average_end"]))
    write_result(f"capacity-{args.accounts}", result)


if __name__ == "__main__":
    main()
