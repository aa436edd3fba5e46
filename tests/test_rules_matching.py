"""Rule matching: fields, globs, regexes, headers, all/any, folders and stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailops.mime.model import Address
from emailops.rules import load_rules, matching_rules, rule_matches
from emailops.rules.model import Rule, RuleSet
from tests.reply_factories import parsed_message


def one_rule(tmp_path: Path, match: str, extra: str = "") -> Rule:
    path = tmp_path / "rules.toml"
    path.write_text(
        f'[[rules]]\nname = "r"\n{extra}\n[rules.match]\n{match}\n[rules.actions]\nflag = true\n',
        encoding="utf-8",
    )
    return load_rules(path).rules[0]


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ('subject = "HELP"', True),
        ('subject = "refund"', False),
        ('subject = ["refund", "order"]', True),
        ('from = "*@example.org"', True),
        ('from = "*@EXAMPLE.ORG"', True),
        ('from = "*@example.com"', False),
        ('from = "alice@*"', True),
        ('to = "me@example.net"', True),
        ('to = "*@other.net"', False),
        ('cc = "boss@example.net"', True),
        ('body = "ORDER 42"', True),
        ('body = "invoice"', False),
        ('subject_regex = "^need\\\\s+help"', True),
        ('subject_regex = "^help"', False),
        ('from_regex = "^ali(ce|x)@"', True),
        ('body_regex = "order \\\\d+"', True),
        ('headers = { "X-Ticket" = "T-1" }', True),
        ('headers = { "x-ticket" = "t-2" }', False),
        ('headers = { "X-Ticket" = "" }', True),
        ('headers = { "X-Missing" = "" }', False),
        ('headers_regex = { "X-Ticket" = "^t-\\\\d$" }', True),
        ('subject = "help"\nfrom = "*@example.com"', False),
        ('mode = "any"\nsubject = "help"\nfrom = "*@example.com"', True),
        ('mode = "any"\nsubject = "refund"\nfrom = "*@example.com"', False),
    ],
)
def test_conditions(tmp_path: Path, match: str, expected: bool) -> None:
    parsed = parsed_message(cc=(Address("Boss", "Boss@Example.net"),), headers={"X-Ticket": ["T-1"]})
    assert rule_matches(one_rule(tmp_path, match), parsed, "INBOX") is expected


def test_no_conditions_match_everything_in_the_rules_folders(tmp_path: Path) -> None:
    rule = one_rule(tmp_path, "", extra='folders = ["INBOX", "Support"]')
    assert rule_matches(rule, parsed_message(), "inbox")  # INBOX is case-insensitive
    assert rule_matches(rule, parsed_message(), "Support")
    assert not rule_matches(rule, parsed_message(), "support")
    assert not rule_matches(rule, parsed_message(), "Archive")


def test_stop_ends_the_list(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        "\n".join(
            f'[[rules]]\nname = "{name}"\n[rules.match]\nsubject = "{subject}"\n'
            f"[rules.actions]\nflag = true\nstop = {stop}\n"
            for name, subject, stop in (
                ("a", "help", "false"),
                ("b", "nomatch", "true"),
                ("c", "order", "true"),
                ("d", "help", "false"),
            )
        ),
        encoding="utf-8",
    )
    rules = load_rules(path)
    assert [r.name for r in matching_rules(rules, parsed_message(), "INBOX")] == ["a", "c"]
    assert matching_rules(RuleSet(), parsed_message(), "INBOX") == []


def test_a_pattern_that_backtracks_exponentially_in_re_runs_in_linear_time(tmp_path: Path) -> None:
    # With Python's re, '(a+)+$' against forty a's and a '!' takes longer than the age of the
    # universe; RE2 answers at once. The bound is generous: it only has to tell the two apart.
    import time

    rule = one_rule(tmp_path, "subject_regex = '(a+)+$'")
    started = time.monotonic()
    assert not rule_matches(rule, parsed_message(subject="a" * 40 + "!"), "INBOX")
    assert rule_matches(rule, parsed_message(subject="a" * 40), "INBOX")
    assert time.monotonic() - started < 5
