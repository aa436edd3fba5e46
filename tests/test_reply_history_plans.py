"""The reply limits' count queries (replies.limits) and the history purge (replies.history) use
the indexes of migration 12 on a long history, on SQLite and PostgreSQL: their cost follows the
replies in their window, not the total.

The history and the plans come from ``bench.bench_history``, which measures the same decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bench.bench_history import RULES, cap_query_plans, fill_history, purge_query_plans
from emailops.rules import load_rules
from emailops.store.database import create_index_engine
from emailops.store.migrations import migrate


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_index_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def test_the_cap_queries_use_their_indexes(engine: Engine, tmp_path: Path) -> None:
    fill_history(engine, 20_000)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    plans = cap_query_plans(engine, load_rules(rules_file))

    # Per rule and sender, per sender and day, per hour; each on the outbox and the model's jobs.
    assert len(plans) == 6
    for statement, plan in plans:
        table = "llm_jobs" if " FROM llm_jobs " in statement else "outbox"
        shown = "\n".join(plan)
        assert "Seq Scan" not in shown and f"SCAN {table}" not in shown, (statement, shown)
        if "recipient =" in statement:
            assert f"ix_{table}_account_recipient_created" in shown, (statement, shown)
        elif table == "outbox" or engine.dialect.name == "sqlite":
            assert f"ix_{table}_account_created" in shown, (statement, shown)
        else:
            # PostgreSQL may count the open jobs from the state index instead: few are open.
            assert "Index Scan" in shown or "Index Only Scan" in shown, (statement, shown)


def test_the_purge_reads_only_the_rows_not_purged_yet(engine: Engine) -> None:
    fill_history(engine, 20_000)
    plans = purge_query_plans(engine)

    # The outbox and the model's jobs by their unpurged index; the rules' decisions by their age.
    assert len(plans) == 3
    for statement, plan in plans:
        if " FROM rule_decisions " in statement:
            # This history has no decisions: PostgreSQL's planner reads an empty table whole.
            if engine.dialect.name == "sqlite":
                assert "ix_rule_decisions_decided" in "\n".join(plan), (statement, plan)
            continue
        table = "llm_jobs" if " FROM llm_jobs " in statement else "outbox"
        assert f"ix_{table}_unpurged_created" in "\n".join(plan), (statement, plan)
