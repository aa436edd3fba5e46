"""The decision's side of a model's reply: record the job, in the rules' transaction.

The decision (``replies.decisions.apply_rules``) has already run the robot checks and the limits and
composed the reply once without text, which fixed its recipient and subject from the inbound
headers; the model is never called inside it. What the job keeps is all the call needs: the
rendered prompt (the message text in it bounded), the model and its parameters.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from emailops.config import ReplyConfig
from emailops.llm import jobs
from emailops.llm.prompt import render_prompt
from emailops.mime.model import ParsedMessage
from emailops.rules.model import Rule
from emailops.store import answer_queues


def find(conn: Connection, account: str, inbound_key: str, rule_name: str) -> int | None:
    return answer_queues.find_for_inbound(
        conn, jobs.QUEUE.table, account=account, inbound_key=inbound_key, rule_name=rule_name
    )


def unavailable_reason(config: ReplyConfig) -> str | None:
    """Why no model reply can be recorded (no model configured), or None."""
    if config.llm is None:
        return "the rule asks a model (llm_prompt) but LLM_BASE_URL is not set"
    return None


def record(
    conn: Connection,
    *,
    account: str,
    inbound_key: str,
    message_pk: int | None,
    rule: Rule,
    parsed: ParsedMessage,
    folder: str,
    recipient: str,
    subject: str,
    config: ReplyConfig,
    now: datetime,
) -> tuple[int, bool]:
    """Record the pending job for ``rule``'s reply to ``recipient`` under ``subject`` (as the
    decision composed them); ``(job id, created)``."""
    assert rule.reply is not None and rule.reply.llm is not None and config.llm is not None
    spec = rule.reply.llm
    prompt = render_prompt(
        spec.prompt,
        parsed,
        folder=folder,
        rule=rule.name,
        my_address=config.from_address,
        max_input_chars=config.llm.max_input_chars,
    )
    return jobs.insert_job(
        conn,
        account=account,
        inbound_key=inbound_key,
        message_pk=message_pk,
        rule_name=rule.name,
        action=rule.reply.action.value,
        recipient=recipient,
        subject=subject,
        prompt=prompt,
        model=spec.model or config.llm.model,
        max_tokens=spec.max_tokens or config.llm.max_tokens,
        temperature=spec.temperature,
        now=now,
    )
