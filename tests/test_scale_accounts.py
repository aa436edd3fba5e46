"""Many accounts, several daemons, one PostgreSQL: the small version of ``bench.bench_scale``.

Twelve accounts on one Dovecot (a user each), two daemons (``prod.run``, WORKERS=2, a STATE_DIR
each, as two containers) serving them all from the index. Mail delivered to random accounts is
indexed exactly once and answered exactly once; the daemon holding the most folders is SIGKILLed
with its workers (once every reply due is sent), its folders are taken over within 60 s and the
mail delivered meanwhile is
neither lost nor doubled; ``doveadm who``, every second, never counts more IMAP connections of an
account than its budget allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_scale import TAKEOVER_LIMIT_SECONDS, Options, run

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]


def test_twelve_accounts_two_daemons_one_killed(pg_url: str, tmp_path: Path) -> None:
    options = Options(
        accounts=12, daemons=2, workers=2, backlog=0, broken=False, deliveries=10, drain_before_kill=True
    )
    outcome = run(options, pg_url, tmp_path)
    figures = outcome.figures
    assert figures["delivered"] > 2 * options.deliveries
    assert (figures["lost"], figures["duplicated"]) == ([], [])
    assert (figures["replies_missing"], figures["replies_unknown"], figures["replies_twice"]) == ([], [], [])
    assert figures["replies"] == figures["delivered"]
    assert figures["outbox_not_sent"] == 0
    assert sum(figures["folders_per_daemon"]) == options.accounts
    assert 0 < figures["takeover_s"] <= TAKEOVER_LIMIT_SECONDS
    assert figures["connection_samples"] > 10 and figures["connections_most"] >= 1
    # The watchers' connections and the workers' sessions for the replies' changes (flags, Sent
    # copies) together keep to IMAP_MAX_CONNECTIONS.
    assert figures["connections_most"] <= options.max_connections, figures["over_budget"]
