"""The one backoff policy: a tenacity wait strategy, asked for the delay after ``failures``
consecutive failures.

The product's retry loops (reconnects, the outbox, OAuth2 refreshes, model calls, worker restarts)
do not run inside tenacity's ``Retrying``: their failure count lives in a database row or in a
supervisor's slot and outlives the call, and often the process. So they keep the count themselves
and ask the strategy here, with a retry state that carries only that count (tenacity's wait
strategies read nothing else from it).
"""

from __future__ import annotations

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base


def delay_seconds(strategy: wait_base, failures: int) -> float:
    """The wait before the next try after ``failures`` failed tries (the first failure counts as 1;
    0 is taken as 1)."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failures)
    return strategy(state)
