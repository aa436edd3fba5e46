"""The model-call queue's claims: a graceful stop gives the job back, an expired claim is taken
over, and the former holder's late answer cannot finish the job (fencing by attempt); a 429 waits
the server's Retry-After, and a job given up is reported."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from emailops.config import LlmConfig, ReplyConfig
from emailops.llm import jobs
from emailops.llm.client import ChatClient
from emailops.processes import ProcessIdentity
from emailops.replies.llm_stage import LlmStage
from tests.chat_server import ChatServer, Status
from tests.index_helpers import ACCOUNT, ALICE, index_engine


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    with ChatServer() as server:
        yield server


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = index_engine(db_url)
    with engine.begin() as conn:
        jobs.insert_job(
            conn,
            account=ACCOUNT,
            inbound_key="<q@example.test>",
            message_pk=None,
            rule_name="ai",
            action="draft",
            recipient="bob@example.test",
            subject="Re: q",
            prompt="hello",
            model="tiny",
            max_tokens=10,
            temperature=None,
            now=datetime.now(UTC),
        )
    yield engine
    engine.dispose()


def stage(engine: Engine, chat: ChatServer, run: str, claim_timeout: float = 60.0) -> LlmStage:
    llm = LlmConfig(base_url=chat.base_url, timeout_seconds=10, claim_timeout_seconds=claim_timeout)
    return LlmStage(
        engine,
        account=ACCOUNT,
        claimer=str(ProcessIdentity.of_this_process(1, run=run)),
        config=ReplyConfig(from_address=ALICE, llm=llm),
        client=ChatClient(chat.base_url, timeout_seconds=10),
    )


def the_job(engine: Engine) -> jobs.LlmJob:
    with engine.connect() as conn:
        [job] = jobs.list_jobs(conn, account=ACCOUNT)
    return job


def until(condition: Callable[[], bool], step: Callable[[], object] = lambda: None) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        step()
        time.sleep(0.02)


def test_a_graceful_stop_during_a_call_gives_the_job_back(engine: Engine, chat: ChatServer) -> None:
    chat.release.clear()
    worker = stage(engine, chat, "stop")
    worker.run_once()
    until(chat.started.is_set)
    assert the_job(engine).state is jobs.JobState.WORKING
    worker.close()
    chat.release.set()
    job = the_job(engine)
    assert (job.state, job.attempts, job.claimed_by) == (jobs.JobState.PENDING, 1, None)
    assert job.last_error == "the worker stopped during the call"


def test_an_expired_claim_is_taken_over_and_the_late_answer_is_refused(
    engine: Engine, chat: ChatServer
) -> None:
    chat.release.clear()
    paused = stage(engine, chat, "paused", claim_timeout=1.0)  # a live process of another run
    paused.run_once()
    until(chat.started.is_set)
    first = the_job(engine)
    assert (first.state, first.attempts) == (jobs.JobState.WORKING, 1)

    other = stage(engine, chat, "other", claim_timeout=1.0)
    until(lambda: len(chat.requests) == 2, other.run_once)  # claimed again once the claim expired
    taken = the_job(engine)
    assert (taken.state, taken.attempts, taken.claimed_by) == (jobs.JobState.WORKING, 2, other.claimer)

    chat.release.set()
    call = paused.call
    assert call is not None
    until(call.finished.is_set)  # the first answer arrives late: the job is not its own any more
    paused.next_poll = time.monotonic() + 3600  # finish only, claim nothing
    with capture_logs() as logs:
        paused.run_once()
    assert [e["outcome"] for e in logs if e["event"] == "model call"] == ["claim_lost"]
    assert the_job(engine).claimed_by == other.claimer
    until(lambda: the_job(engine).state is not jobs.JobState.WORKING, other.run_once)
    # The job has no message in this test, so the holder's finish fails it; the point is who finished.
    job = the_job(engine)
    assert (job.state, job.attempts) == (jobs.JobState.FAILED, 2)
    assert job.last_error == "the inbound message is no longer in the index"


def test_a_429_waits_the_servers_retry_after_and_a_job_given_up_is_reported(
    engine: Engine, chat: ChatServer
) -> None:
    chat.script.extend([Status(429, retry_after="3"), Status(500)])
    llm = LlmConfig(
        base_url=chat.base_url,
        timeout_seconds=10,
        max_attempts=2,
        backoff_initial_seconds=0.1,
        backoff_max_seconds=0.1,
    )
    worker = LlmStage(
        engine,
        account=ACCOUNT,
        claimer=str(ProcessIdentity.of_this_process(1, run="retry-after")),
        config=ReplyConfig(from_address=ALICE, llm=llm),
        client=ChatClient(chat.base_url, timeout_seconds=10),
    )
    with capture_logs() as logs:
        until(lambda: the_job(engine).last_error is not None, worker.run_once)
        waiting = the_job(engine)
        assert (waiting.state, waiting.attempts) == (jobs.JobState.PENDING, 1)
        # The server's 3 s, not the 0.1 s of the worker's own backoff.
        wait = (waiting.next_attempt_at - waiting.updated_at).total_seconds()
        assert 2.9 <= wait <= 3.1
        until(lambda: the_job(engine).state is jobs.JobState.FAILED, worker.run_once)
    assert len(chat.requests) == 2
    assert the_job(engine).last_error == "gave up after 2 attempts: HTTP 500: scripted 500"
    calls = [(e["log_level"], e["outcome"], e.get("status")) for e in logs if e["event"] == "model call"]
    assert calls == [("warning", "retry", 429), ("error", "failed", 500)]
    assert all(e["component"] == "llm" for e in logs if e["event"] == "model call")
