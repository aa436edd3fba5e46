"""What the domain code counts and times for Prometheus: nothing at all until ``enable()``.

Every function here is a no-op until the operational shell calls ``enable()``: a worker does when
an endpoint is configured (``METRICS_PORT``), after the supervisor has set prometheus-client's
multiprocess directory, so that the values land in that directory's files and the supervisor
serves the sum over every worker, dead ones included (counters survive a worker's restart). Off by
default so that the command line, the tests and the benchmarks pay nothing for it, and so that the
library neither decides where values go nor reads the environment. prometheus-client is imported
by ``enable()`` only.

Labels are bounded: folder and rule names come from the configuration; kinds, outcomes, reasons
and states are fixed sets. No address, subject or Message-ID ever becomes a label: an account is
labelled by its name, or by a stable short id when the name is an address (``account_label``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Index lag and reply latency: the alert threshold (5 s) is a bucket bound, so that the P95 of
# ``histogram_quantile`` is exact there.
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The reasons a reply is not sent (``robots.reply_suppression_reason``, ``limits.limit_reason``,
# ``engine.apply_rules``) are texts for people; the label is the kind named by their beginning.
_SUPPRESSION_KINDS = (
    ("auto-submitted", "auto_submitted"),
    ("precedence", "precedence"),
    ("mailing list", "mailing_list"),
    ("x-auto-response-suppress", "auto_response_suppress"),
    ("null return path", "null_return_path"),
    ("our own automatic reply", "own_reply"),
    ("no valid address", "no_valid_address"),
    ("own address", "own_address"),
    ("role address", "role_address"),
    ("list request address", "list_address"),
    ("list owner address", "list_address"),
    ("no-reply address", "noreply_address"),
    ("never-reply list", "never_reply_to"),
    ("already answered this sender", "once_per_sender"),
    ("sender cap", "sender_cap"),
    ("hourly cap", "hourly_cap"),
)


def suppression_kind(reason: str) -> str:
    """The bounded label of a suppression reason (``other`` for one this table does not know)."""
    lowered = reason.lower()
    for prefix, kind in _SUPPRESSION_KINDS:
        if lowered.startswith(prefix):
            return kind
    return "other"


@dataclass(frozen=True)
class _Instruments:
    messages_indexed: Any
    parse_problems: Any
    quarantined: Any
    index_lag: Any
    index_batch: Any
    folder_last_sync: Any
    imap_errors: Any
    imap_reconnects: Any
    auth_failures: Any
    replies: Any
    replies_suppressed: Any
    reply_latency: Any
    smtp_errors: Any
    outbox: Any
    llm_calls: Any
    llm_latency: Any
    llm_tokens: Any
    account_messages_indexed: Any
    account_errors: Any
    account_last_sync: Any
    account_state: Any


_instruments: _Instruments | None = None


def enable() -> None:
    """Create the instruments (idempotent). Call once per process, before the work starts."""
    global _instruments
    if _instruments is not None:
        return
    from prometheus_client import Counter, Gauge, Histogram

    # registry=None: the multiprocess collector of the serving process reads the files; nothing is
    # registered in this process's default registry (which a test may create twice).
    _instruments = _Instruments(
        messages_indexed=Counter(
            "emailops_messages_indexed",
            "Messages committed to the index, by folder.",
            ["folder"],
            registry=None,
        ),
        parse_problems=Counter(
            "emailops_parse_problems",
            "Problems the parser recorded in indexed messages, by kind (e.g. charset-unknown).",
            ["kind"],
            registry=None,
        ),
        quarantined=Counter(
            "emailops_messages_quarantined",
            "Messages set aside after a stage failed on them (left unanswered), by stage.",
            ["stage"],
            registry=None,
        ),
        index_lag=Histogram(
            "emailops_index_lag_seconds",
            "New mail: seconds from the server's INTERNALDATE to the committed index row.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        ),
        index_batch=Histogram(
            "emailops_index_batch_duration_seconds",
            "Seconds from the download of a batch of messages to its commit.",
            buckets=BATCH_BUCKETS,
            registry=None,
        ),
        folder_last_sync=Gauge(
            "emailops_folder_last_sync_timestamp_seconds",
            "UNIX time of the folder's last successful sync pass.",
            ["folder"],
            multiprocess_mode="max",
            registry=None,
        ),
        imap_errors=Counter(
            "emailops_imap_errors",
            "IMAP failures, by kind (connection, auth, folder_missing, tls, too_many_connections).",
            ["kind"],
            registry=None,
        ),
        imap_reconnects=Counter(
            "emailops_imap_reconnects",
            "IMAP connections re-opened after a failure.",
            registry=None,
        ),
        auth_failures=Counter(
            "emailops_auth_failures",
            "Sign-ins the server refused, by protocol (imap, smtp).",
            ["protocol"],
            registry=None,
        ),
        replies=Counter(
            "emailops_replies",
            "Automatic replies by rule and outcome (queued, sent, drafted, retry, failed, unknown, "
            "suppressed, dry_run).",
            ["rule", "outcome"],
            registry=None,
        ),
        replies_suppressed=Counter(
            "emailops_replies_suppressed",
            "Replies a rule wanted but did not send, by rule and reason.",
            ["rule", "reason"],
            registry=None,
        ),
        reply_latency=Histogram(
            "emailops_reply_latency_seconds",
            "Seconds from the inbound message's index commit to the reply accepted by SMTP.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        ),
        smtp_errors=Counter(
            "emailops_smtp_errors",
            "SMTP delivery failures, by kind (transient, permanent, uncertain).",
            ["kind"],
            registry=None,
        ),
        outbox=Gauge(
            "emailops_outbox_replies",
            "Replies in the outbox, by state (as last counted by a worker).",
            ["state"],
            multiprocess_mode="livemostrecent",
            registry=None,
        ),
        llm_calls=Counter(
            "emailops_llm_calls",
            "Calls to the language model, by rule and outcome (ok, retry, failed, claim_lost).",
            ["rule", "outcome"],
            registry=None,
        ),
        llm_latency=Histogram(
            "emailops_llm_call_duration_seconds",
            "Seconds a call to the language model took, whatever its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        ),
        llm_tokens=Counter(
            "emailops_llm_tokens",
            "Tokens the model reported, by direction (in: the prompt, out: the reply).",
            ["direction"],
            registry=None,
        ),
        account_messages_indexed=Counter(
            "emailops_account_messages_indexed",
            "Messages committed to the index, by account.",
            ["account"],
            registry=None,
        ),
        account_errors=Counter(
            "emailops_account_errors",
            "IMAP sign-in and connection failures, by account and kind (as emailops_imap_errors).",
            ["account", "kind"],
            registry=None,
        ),
        account_last_sync=Gauge(
            "emailops_account_last_sync_timestamp_seconds",
            "UNIX time of the account's last successful sync (as recorded in account_state).",
            ["account"],
            multiprocess_mode="max",
            registry=None,
        ),
        account_state=Gauge(
            "emailops_account_state",
            "1 for the account's current state (ok, backoff, auth_failed, disabled), 0 for the others.",
            ["account", "state"],
            multiprocess_mode="livemostrecent",
            registry=None,
        ),
    )


def enabled() -> bool:
    return _instruments is not None


# -- index ---------------------------------------------------------------------------------------


def messages_indexed(folder: str, count: int, account: str | None = None) -> None:
    if _instruments is not None and count:
        _instruments.messages_indexed.labels(folder).inc(count)
        if account is not None:
            _instruments.account_messages_indexed.labels(account_label(account)).inc(count)


def problem_kind(problem: str) -> str:
    """``charset-unknown:x-foo`` -> ``charset-unknown``: the label of a parser problem."""
    return problem.partition(":")[0]


def parse_problems(counts: Mapping[str, int]) -> None:
    """Add the problems of a batch of messages, counted by kind (``problem_kind``)."""
    if _instruments is not None:
        for kind, count in counts.items():
            _instruments.parse_problems.labels(kind).inc(count)


def message_quarantined(stage: str) -> None:
    if _instruments is not None:
        _instruments.quarantined.labels(stage).inc()


def index_lag(seconds: float) -> None:
    if _instruments is not None:
        _instruments.index_lag.observe(max(seconds, 0.0))


def index_batch(seconds: float) -> None:
    if _instruments is not None:
        _instruments.index_batch.observe(seconds)


def folder_synced(folder: str, at: float) -> None:
    if _instruments is not None:
        _instruments.folder_last_sync.labels(folder).set(at)


# -- IMAP ----------------------------------------------------------------------------------------


def imap_error(kind: str, account: str | None = None) -> None:
    if _instruments is not None:
        _instruments.imap_errors.labels(kind).inc()
        if kind == "auth":
            _instruments.auth_failures.labels("imap").inc()
        if account is not None:
            _instruments.account_errors.labels(account_label(account), kind).inc()


def imap_reconnected() -> None:
    if _instruments is not None:
        _instruments.imap_reconnects.inc()


# -- accounts ------------------------------------------------------------------------------------


def account_label(account: str) -> str:
    """The ``account`` label of an account: its name, unless the name is an address (the default
    name is the username, often one), which no label carries; then ``acct-`` and the first 12 hex
    digits of the name's SHA-256, the same on every host and at every start
    (``healthcheck --verbose`` shows it beside the name)."""
    if "@" not in account:
        return account
    return "acct-" + hashlib.sha256(account.encode()).hexdigest()[:12]


def account_state(account: str, state: str, states: Iterable[str]) -> None:
    """Set the account's state gauge: 1 for ``state``, 0 for the other ``states``."""
    if _instruments is not None:
        label = account_label(account)
        for each in states:
            _instruments.account_state.labels(label, each).set(1 if each == state else 0)


def account_synced(account: str, at: float) -> None:
    if _instruments is not None:
        _instruments.account_last_sync.labels(account_label(account)).set(at)


# -- replies -------------------------------------------------------------------------------------


def reply_outcome(rule: str, outcome: str) -> None:
    if _instruments is not None:
        _instruments.replies.labels(rule, outcome).inc()


def reply_suppressed(rule: str, reason: str) -> None:
    if _instruments is not None:
        _instruments.replies.labels(rule, "suppressed").inc()
        _instruments.replies_suppressed.labels(rule, suppression_kind(reason)).inc()


def reply_latency(seconds: float) -> None:
    if _instruments is not None:
        _instruments.reply_latency.observe(max(seconds, 0.0))


def smtp_error(kind: str, *, auth: bool = False) -> None:
    if _instruments is not None:
        _instruments.smtp_errors.labels(kind).inc()
        if auth:
            _instruments.auth_failures.labels("smtp").inc()


def outbox_depth(counts: Mapping[str, int], states: Iterable[str]) -> None:
    """Set the outbox gauge for every state in ``states`` (0 for those absent from ``counts``)."""
    if _instruments is not None:
        for state in states:
            _instruments.outbox.labels(state).set(counts.get(state, 0))


# -- language model ------------------------------------------------------------------------------


def llm_call(rule: str, outcome: str, seconds: float, tokens_in: int | None, tokens_out: int | None) -> None:
    if _instruments is not None:
        _instruments.llm_calls.labels(rule, outcome).inc()
        _instruments.llm_latency.observe(max(seconds, 0.0))
        for direction, count in (("in", tokens_in), ("out", tokens_out)):
            if count:
                _instruments.llm_tokens.labels(direction).inc(count)
