"""``emailops accounts import`` of a file of many accounts (target: 1,000 accounts under 10 s).

    python -m bench.bench_accounts [--accounts 1000] [--only sqlite|postgres]

Each run is the command an operator types (``python -m emailops accounts import FILE``, a new
process: start-up, migration and all), on a fresh index on SQLite (in ``--scratch``) and on
PostgreSQL (a fresh database on ``--pg``): the first import (every account added, its password
encrypted, one audit row each), then the same file again (nothing changes: every stored password
is decrypted and compared). The baseline, measured side by side in the same run, is
``python -m emailops accounts list`` on the empty (migrated) index: what any command costs before
its work. On a loaded machine every figure grows; the ratios say more than the seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._report import figure, headline, write_result
from bench._servers import fresh_postgres
from emailops.auth.crypto import new_key

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 10.0


def accounts_file(path: Path, count: int) -> Path:
    """``count`` password accounts on 10 IMAP hosts, two folders each, passwords from the file."""
    tables = [
        f'[[accounts]]\nname = "box{n:05d}"\nusername = "box{n:05d}@example.org"\n'
        f'password = "password-of-box-{n:05d}"\nimap_host = "imap{n % 10}.example.org"\nimap_port = 993\n'
        f'smtp_host = "smtp{n % 10}.example.org"\nsmtp_port = 587\nfolders = ["INBOX", "Support"]\n'
        for n in range(count)
    ]
    path.write_text("\n".join(tables), encoding="utf-8")
    return path


def timed(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "emailops", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"emailops {' '.join(args)} failed: {result.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()

    source = accounts_file(args.scratch / "emailops-bench-accounts.toml", args.accounts)
    base = {key: value for key, value in os.environ.items() if not key.startswith(("EMAIL_", "SENTRY_"))}
    base |= {"SECRETS_KEY": new_key(), "LOG_FILE_ENABLED": "false", "LOG_LEVEL": "WARNING", "ENV": "bench"}
    report: dict[str, Any] = {"accounts": args.accounts}
    for label in ("sqlite", "postgres"):
        if args.only not in (None, label):
            continue
        if label == "sqlite":
            path = args.scratch / "emailops-bench-accounts.db"
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
            url = f"sqlite:///{path}"
        else:
            url = fresh_postgres(args.pg, "emailops_bench_accounts")
        env = base | {"INDEX_DB_URL": url}
        timed(env, "migrate")
        baseline = timed(env, "accounts", "list")
        first = timed(env, "accounts", "import", str(source))
        again = timed(env, "accounts", "import", str(source))
        headline(f"{label}: accounts import of {args.accounts:,} accounts")
        figure("baseline: accounts list, empty index", f"{baseline:.2f} s")
        target = f"< {TARGET_SECONDS:g} s"
        figure(
            "first import (all added)",
            f"{first:.2f} s ({first / baseline:.1f}x)",
            target,
            first < TARGET_SECONDS,
        )
        figure(
            "same file again (0 changes)",
            f"{again:.2f} s ({again / baseline:.1f}x)",
            target,
            again < TARGET_SECONDS,
        )
        report[label] = {"baseline_seconds": baseline, "first_seconds": first, "again_seconds": again}
    write_result("accounts", report)


if __name__ == "__main__":
    main()
