"""The rules file edited in the console: errors at their line, versions saved atomically and kept
on both index backends, live in the daemon's rules cache at once, restorable, each audited."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from emailops.audit import Actor, list_entries
from emailops.rules import RuleSetCache
from emailops.rules.text_check import validate_rules_text
from emailops.rules.versions import (
    BY_HAND,
    InvalidRulesError,
    diff_against_running,
    list_versions,
    restore_rules,
    save_rules,
    text_hash,
)
from tests.index_helpers import index_engine

ADMIN = Actor("ada", "admin", "192.0.2.9")


def rule(name: str, subject: str = "help", reply: str = '[rules.reply]\ntemplate = "Got it"\n') -> str:
    return f'[[rules]]\nname = "{name}"\n[rules.match]\nsubject = "{subject}"\n{reply}'


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('[[rules]]\nname = "a"\nsubject = \n', 3, "TOML syntax error"),
        (
            rule("a") + "\n" + rule("b").replace("subject =", "subjet ="),
            11,
            'rule "b" (#2): match.subjet: unknown key',
        ),
        (
            rule("a", subject="x") + "\n" + rule("b").replace('subject = "help"', 'subject_regex = "(oops"'),
            11,
            "match.subject_regex: invalid regular expression",
        ),
        (rule("a", reply="[rules.reply]\nsubject = 'x'\n"), 5, "reply.template: missing"),
        (rule("a") + "\n" + rule("a"), 9, "duplicate rule name"),
        (rule("a", reply='[rules.reply]\ntemplate = "Hi {nobody}"\n'), 6, "reply.template"),
        ("rules = 3\n", None, "'rules' must be an array of tables"),
    ],
)
def test_errors_are_given_at_their_line(tmp_path: Path, text: str, line: int | None, expected: str) -> None:
    (problem,) = validate_rules_text(text, path=tmp_path / "rules.toml")
    assert expected in problem.message
    assert problem.line == line, text.splitlines()


def test_a_valid_text_has_no_problem(tmp_path: Path) -> None:
    assert validate_rules_text(rule("a") + "\n" + rule("b"), path=tmp_path / "rules.toml") == []


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = index_engine(db_url)
    yield engine
    engine.dispose()


def test_a_saved_version_is_live_at_once_kept_and_restorable(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    by_hand = rule("ack")
    path.write_text(by_hand, encoding="utf-8")
    path.chmod(0o640)
    cache = RuleSetCache(path)
    assert [r.name for r in cache.get().rules] == ["ack"]

    new = rule("ack") + "\n" + rule("urgent", subject="urgent")
    assert diff_against_running(path, new).splitlines()[:2] == [
        "--- rules.toml (running)",
        "+++ rules.toml (new)",
    ]
    assert '+name = "urgent"\n' in diff_against_running(path, new)
    saved = save_rules(engine, path, new, actor=ADMIN)
    assert path.read_text(encoding="utf-8") == new
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [r.name for r in cache.get().rules] == ["ack", "urgent"]  # same second, new inode: seen
    assert diff_against_running(path, new) == ""

    with engine.connect() as conn:
        versions = list_versions(conn)
    assert [(v.author, v.text) for v in versions] == [("ada", new), (BY_HAND, by_hand)]
    assert saved == versions[0] and saved.sha256 == text_hash(new)

    restored = restore_rules(engine, path, versions[1].id, actor=ADMIN)
    assert path.read_text(encoding="utf-8") == by_hand and restored.text == by_hand
    assert [r.name for r in cache.get().rules] == ["ack"]
    with engine.connect() as conn:
        assert [v.author for v in list_versions(conn)] == ["ada", "ada", BY_HAND]  # nothing kept twice
        entries = list_entries(conn)
    assert [(e.action, e.target, e.before, e.after) for e in reversed(entries)] == [
        (
            "rules.edit",
            str(path),
            {"sha256": text_hash(by_hand)},
            {"sha256": text_hash(new), "version": saved.id},
        ),
        (
            "rules.edit",
            str(path),
            {"sha256": text_hash(new)},
            {"sha256": text_hash(by_hand), "version": restored.id, "restored_from": versions[1].id},
        ),
    ]
    with pytest.raises(LookupError):
        restore_rules(engine, path, 999_999, actor=ADMIN)


def test_an_invalid_text_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(rule("ack"), encoding="utf-8")
    with pytest.raises(InvalidRulesError) as caught:
        save_rules(engine, path, rule("ack").replace("subject =", "subjet ="), actor=ADMIN)
    assert [p.line for p in caught.value.problems] == [4]
    assert path.read_text(encoding="utf-8") == rule("ack")
    assert list(tmp_path.glob(".rules.*")) == []  # no temporary file left
    with engine.connect() as conn:
        assert list_versions(conn) == [] and list_entries(conn) == []


def test_the_first_save_creates_the_file(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    save_rules(engine, path, rule("ack"), actor=ADMIN)
    assert path.read_text(encoding="utf-8") == rule("ack")
    with engine.connect() as conn:
        assert [v.author for v in list_versions(conn)] == ["ada"]
        (entry,) = list_entries(conn)
    assert entry.before == {"sha256": None}
