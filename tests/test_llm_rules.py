"""Rules with llm_prompt: loading and validation, the prompt sent, and what of the answer is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailops.llm.prompt import SYSTEM_PROMPT, EmptyReplyError, chat_messages, render_prompt, reply_text
from emailops.mime.parse import parse_message
from emailops.rules import ReplyAction, RulesError, load_rules

HEAD = '[[rules]]\nname = "ai"\n[rules.match]\nsubject = "help"\n[rules.reply]\n'


def load(tmp_path: Path, reply: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "rules.toml"
    path.write_text(HEAD + reply, encoding="utf-8")
    return load_rules(path)


def test_llm_prompt_makes_a_draft_by_default_with_optional_model_settings(tmp_path: Path) -> None:
    (rule,) = load(
        tmp_path,
        'llm_prompt = "Answer {sender_name}: {body}"\nllm_model = "gpt-x"\n'
        'llm_max_tokens = 300\nllm_temperature = 0.3\nsubject = "Re: {subject} [draft]"\n',
    ).rules
    assert rule.reply is not None and rule.reply.llm is not None
    assert rule.reply.action is ReplyAction.DRAFT
    assert rule.reply.body is None
    assert rule.reply.llm.prompt.placeholders == {"sender_name", "body"}
    assert (rule.reply.llm.model, rule.reply.llm.max_tokens, rule.reply.llm.temperature) == (
        "gpt-x",
        300,
        0.3,
    )
    assert rule.reply.subject is not None


def test_draft_false_is_an_explicit_opt_in_to_sending(tmp_path: Path) -> None:
    (rule,) = load(tmp_path, 'llm_prompt = "Answer {body}"\ndraft = false\n').rules
    assert rule.reply is not None and rule.reply.action is ReplyAction.SEND
    assert rule.reply.llm is not None and rule.reply.llm.model is None


def test_the_prompt_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_text("Be kind to {sender}.\n{body}", encoding="utf-8")
    rules = load(tmp_path, 'llm_prompt_file = "prompt.txt"\n')
    assert rules.rules[0].reply.llm.prompt.placeholders == {"sender", "body"}  # type: ignore[union-attr]
    assert (tmp_path / "prompt.txt").resolve() in rules.sources


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('template = "Hi {body}"\n', "reply.template: unknown placeholder {body}"),
        ('llm_prompt = "Hi {nobody}"\n', "reply.llm_prompt: unknown placeholder {nobody}"),
        ('llm_prompt = "Hi"\ntemplate = "Hi"\n', "reply.llm_prompt: a reply is written either by a template"),
        ('llm_model = "x"\ntemplate = "Hi"\n', "reply.llm_model: only for a model's reply: give llm_prompt"),
        ('llm_prompt = "Hi"\nllm_model = ""\n', "reply.llm_model: must be a model name"),
        ('llm_prompt = "Hi"\nllm_max_tokens = 0\n', "reply.llm_max_tokens: must be a whole number from 1"),
        ('llm_prompt = "Hi"\nllm_max_tokens = 99999\n', "reply.llm_max_tokens: must be a whole number"),
        ('llm_prompt = "Hi"\nllm_max_tokens = true\n', "reply.llm_max_tokens"),
        ('llm_prompt = "Hi"\nllm_temperature = 3\n', "reply.llm_temperature: must be a number from 0 to 2"),
        ('llm_prompt = "Hi"\nllm_temperature = "hot"\n', "reply.llm_temperature"),
        ('llm_prompt = ""\n', "reply.llm_prompt: must be non-empty text"),
        ('llm_prompt = "Hi"\ndraft = "yes"\n', "reply.draft: must be true or false"),
        ("once_per_sender_days = 3\n", "reply.template: missing: give template, template_file or llm_prompt"),
    ],
)
def test_validation_names_rule_and_field(tmp_path: Path, reply: str, expected: str) -> None:
    with pytest.raises(RulesError) as caught:
        load(tmp_path, reply)
    assert 'rule "ai" (#1)' in str(caught.value)
    assert expected in str(caught.value)


def test_rules_check_validates_the_new_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "rules.toml"
    path.write_text(HEAD + 'llm_prompt = "Hi"\nllm_temperature = 9\n', encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "emailops", "rules", "check", str(path)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "reply.llm_temperature: must be a number from 0 to 2" in result.stderr


RAW = (
    b"From: Bob Example <bob@example.test>\r\nTo: alice@example.test\r\nSubject: help\r\n"
    b"Message-ID: <a@example.test>\r\n\r\n" + b"x" * 300 + b"END-OF-TEXT\r\n"
)


def test_the_message_text_sent_is_cut_to_the_input_bound(tmp_path: Path) -> None:
    (rule,) = load(tmp_path, 'llm_prompt = "From {sender_name} <{sender}>:\\n{body}"\n').rules
    parsed = parse_message(RAW)
    assert rule.reply is not None and rule.reply.llm is not None
    prompt = render_prompt(
        rule.reply.llm.prompt,
        parsed,
        folder="INBOX",
        rule="ai",
        my_address="alice@example.test",
        max_input_chars=100,
    )
    assert prompt == "From Bob Example <bob@example.test>:\n" + "x" * 100 + "\n[... cut]"
    whole = render_prompt(
        rule.reply.llm.prompt, parsed, folder="INBOX", rule="ai", my_address="a@b.c", max_input_chars=10_000
    )
    assert "END-OF-TEXT" in whole
    assert chat_messages(prompt) == (
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": prompt},
    )


def test_the_answer_becomes_plain_bounded_text() -> None:
    assert reply_text("  Hi\r\nthere\rBob\x00\x07\x1b[0m\u2028!\n\n") == "Hi\nthere\nBob[0m!"
    assert reply_text("a\tb") == "a\tb"
    assert reply_text("y" * 50, max_chars=10) == "y" * 10
    with pytest.raises(EmptyReplyError):
        reply_text(" \r\n\x00 ")
