"""Rules file loading, validation errors (naming rule and field) and the hot-reloading cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from emailops.rules import ReplyAction, RulesError, RuleSetCache, load_rules
from emailops.rules.model import MatchKind

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rules.toml"

ISSUE_SHAPE = '''
[[rules]]
name = "support-ack"
folders = ["INBOX"]
[rules.match]
subject = "help"
from = "*@example.org"
[rules.reply]
template = """Hello {sender_name},
we received "{subject}"."""
once_per_sender_days = 7
'''


def write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_issue_shape_loads(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, ISSUE_SHAPE))
    (rule,) = rules.rules
    assert rule.name == "support-ack"
    assert rule.folders == ("INBOX",)
    assert {(c.field, c.kind) for c in rule.conditions} == {
        ("subject", MatchKind.SUBSTRING),
        ("from", MatchKind.GLOB),
    }
    assert rule.reply is not None
    assert rule.reply.once_per_sender_days == 7
    assert rule.reply.action is ReplyAction.SEND
    assert rule.reply.body.placeholders == {"sender_name", "subject"}


def test_example_file_loads() -> None:
    rules = load_rules(EXAMPLE)
    assert [r.name for r in rules.rules] == ["support-ack", "invoices-to-accounting", "vip-draft"]
    vip = rules.rules[2]
    assert vip.reply is not None and vip.reply.action is ReplyAction.DRAFT and vip.reply.html is not None
    assert rules.rules[1].move_to == "Accounting" and rules.rules[1].stop


def test_defaults(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, '[[rules]]\nname = "all"\n[rules.reply]\ntemplate = "hi"\n'))
    (rule,) = rules.rules
    assert rule.folders == ("INBOX",) and rule.conditions == () and rule.match_all
    assert rule.reply is not None and rule.reply.once_per_sender_days == 7 and rule.reply.subject is None


def test_template_file_is_relative_to_rules_file(tmp_path: Path) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "ack.txt").write_text("Hi {sender_name}", encoding="utf-8")
    rules_dir = tmp_path / "conf"
    rules_dir.mkdir()
    path = write(rules_dir, '[[rules]]\nname = "a"\n[rules.reply]\ntemplate_file = "../tpl/ack.txt"\n')
    rules = load_rules(path)
    assert rules.rules[0].reply is not None
    assert rules.rules[0].reply.body.source == "Hi {sender_name}"
    assert (tmp_path / "tpl" / "ack.txt").resolve() in rules.sources


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "Hi {nme}"\n',
            'rule "x" (#1): reply.template: unknown placeholder {nme}',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "{sender.__class__}"\n',
            'rule "x" (#1): reply.template: placeholder {sender.__class__}: attribute and index access',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "{sender[0]}"\n',
            'rule "x" (#1): reply.template: placeholder {sender[0]}: attribute and index access',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "{sender:{subject}}"\n',
            "conversions and format specs are not allowed",
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "{sender!r}"\n',
            "conversions and format specs are not allowed",
        ),
        ('[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "{}"\n', "has no name"),
        ('[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "oops }"\n', "reply.template: malformed template"),
        (
            '[[rules]]\nname = "ok"\n[rules.reply]\ntemplate = "a"\n[[rules]]\nname = "y"\n'
            '[rules.match]\nsubject_regex = "(unclosed"\n[rules.reply]\ntemplate = "a"\n',
            'rule "y" (#2): match.subject_regex: invalid regular expression',
        ),
        (
            # RE2 runs in linear time and cannot run backreferences or look-around.
            '[[rules]]\nname = "x"\n[rules.match]\nbody_regex = "(a)\\\\1"\n[rules.reply]\ntemplate = "a"\n',
            "rule \"x\" (#1): match.body_regex: invalid regular expression '(a)\\\\1': "
            "invalid escape sequence",
        ),
        (
            '[[rules]]\nname = "x"\n[rules.match.headers_regex]\n"X-Tag" = "a(?=b)"\n'
            '[rules.reply]\ntemplate = "a"\n',
            "rule \"x\" (#1): match.headers_regex.X-Tag: invalid regular expression 'a(?=b)': "
            "invalid perl operator",
        ),
        (
            '[[rules]]\nname = "x"\n[rules.match]\nsubjet = "a"\n[rules.reply]\ntemplate = "a"\n',
            'rule "x" (#1): match.subjet: unknown key',
        ),
        ('[[rules]]\n[rules.reply]\ntemplate = "a"\n', "rule #1: name: missing"),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "a"\n[[rules]]\nname = "x"\n'
            '[rules.reply]\ntemplate = "b"\n',
            'rule "x" (#2): name: duplicate rule name (also rule #1)',
        ),
        ('[[rules]]\nname = "x"\n', 'rule "x" (#1): reply: the rule does nothing'),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\nonce_per_sender_days = 3\n',
            'rule "x" (#1): reply.template: missing',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "a"\nonce_per_sender_days = -1\n',
            'rule "x" (#1): reply.once_per_sender_days: must be a whole number',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "a"\ntemplate_file = "b"\n',
            "give either template or template_file",
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate_file = "missing.txt"\n',
            'rule "x" (#1): reply.template_file: cannot read',
        ),
        ('[[rules]]\nname = "x"\nfolders = []\n[rules.reply]\ntemplate = "a"\n', 'rule "x" (#1): folders:'),
        (
            '[[rules]]\nname = "x"\n[rules.match]\nmode = "some"\n[rules.reply]\ntemplate = "a"\n',
            'rule "x" (#1): match.mode: must be "all" or "any"',
        ),
        ('[[rules]]\nname = "x"\n[rules.actions]\nmove = ""\n', 'rule "x" (#1): actions.move'),
        (
            '[[rules]]\nname = "x"\n[rules.actions]\nflag = "yes"\n',
            'rule "x" (#1): actions.flag: must be true',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.match]\nfrom = 3\n[rules.actions]\nflag = true\n',
            'rule "x" (#1): match.from: must be a string or a non-empty list',
        ),
        (
            '[[rules]]\nname = "x"\n[rules.reply]\ntemplate = "a"\nsubject = "About {x}"\n',
            'rule "x" (#1): reply.subject: unknown placeholder {x}',
        ),
        ("rule = 1\n", "unknown top-level key(s) rule"),
        ('[[rules]\nname = "x"\n', "TOML syntax error"),
    ],
)
def test_validation_errors_name_rule_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_placeholder_in_template_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "ack.txt").write_text("Hi {whoever}", encoding="utf-8")
    path = write(tmp_path, '[[rules]]\nname = "x"\n[rules.reply]\ntemplate_file = "ack.txt"\n')
    with pytest.raises(RulesError, match=r'rule "x" \(#1\): reply.template_file \(.*ack.txt\): unknown'):
        load_rules(path)


def test_missing_file_is_an_error_for_load_rules(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "nope.toml")


def _touch_later(path: Path) -> None:
    # Filesystems with coarse timestamps: make the change visible to an mtime comparison.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_cache_no_file_means_no_rules(tmp_path: Path) -> None:
    assert len(RuleSetCache(None).get()) == 0
    assert len(RuleSetCache(tmp_path / "absent.toml").get()) == 0


def test_cache_reloads_on_change_and_keeps_good_rules_on_error(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_SHAPE)
    cache = RuleSetCache(path)
    first = cache.get()
    assert [r.name for r in first.rules] == ["support-ack"]
    assert cache.get() is first  # unchanged file: no reload

    path.write_text(ISSUE_SHAPE.replace("support-ack", "renamed"), encoding="utf-8")
    _touch_later(path)
    assert [r.name for r in cache.get().rules] == ["renamed"]

    path.write_text(ISSUE_SHAPE.replace("{subject}", "{nope}"), encoding="utf-8")
    _touch_later(path)
    with capture_logs() as logs:
        kept = cache.get()
    assert [r.name for r in kept.rules] == ["renamed"]
    assert cache.last_error is not None and "unknown placeholder {nope}" in cache.last_error
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and errors[0]["component"] == "rules" and "{nope}" in errors[0]["error"]
    with capture_logs() as logs:
        assert [r.name for r in cache.get().rules] == ["renamed"]
    assert logs == []  # the same broken file is not reloaded and re-logged on every call

    path.write_text(ISSUE_SHAPE.replace("support-ack", "fixed"), encoding="utf-8")
    _touch_later(path)
    assert [r.name for r in cache.get().rules] == ["fixed"]
    assert cache.last_error is None

    path.unlink()
    assert len(cache.get()) == 0


def test_cache_reloads_when_a_template_file_changes(tmp_path: Path) -> None:
    tpl = tmp_path / "ack.txt"
    tpl.write_text("first {sender}", encoding="utf-8")
    path = write(tmp_path, '[[rules]]\nname = "x"\n[rules.reply]\ntemplate_file = "ack.txt"\n')
    cache = RuleSetCache(path)
    assert cache.get().rules[0].reply.body.source == "first {sender}"  # type: ignore[union-attr]
    tpl.write_text("second {sender}", encoding="utf-8")
    _touch_later(tpl)
    assert cache.get().rules[0].reply.body.source == "second {sender}"  # type: ignore[union-attr]


def test_move_takes_a_folder_or_a_table_with_create(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            '[[rules]]\nname = "a"\n[rules.actions]\nmove = "Archive"\n'
            '[[rules]]\nname = "b"\n[rules.actions]\nmove = { folder = "Accounting", create = true }\n'
            '[[rules]]\nname = "c"\n[rules.actions]\nmove = { folder = "Later" }\n',
        )
    )
    assert [(r.move_to, r.create_move_folder) for r in rules.rules] == [
        ("Archive", False),
        ("Accounting", True),
        ("Later", False),
    ]
    example = load_rules(EXAMPLE).rules[1]
    assert (example.move_to, example.create_move_folder) == ("Accounting", True)


@pytest.mark.parametrize(
    ("move", "expected"),
    [
        ('{ folder = "A", create = "yes" }', 'rule "x" (#1): actions.move.create: '),
        (
            '{ folder = "A", make = true }',
            'rule "x" (#1): actions.move.make: unknown key; known keys here: create, folder',
        ),
        ("{ create = true }", 'rule "x" (#1): actions.move.folder: must be a folder name'),
        ('{ folder = " " }', 'rule "x" (#1): actions.move.folder: must be a folder name'),
        ("3", 'rule "x" (#1): actions.move: must be a folder name, or { folder = "...", create = true }'),
    ],
)
def test_a_bad_move_names_the_rule_and_key(tmp_path: Path, move: str, expected: str) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(write(tmp_path, f'[[rules]]\nname = "x"\n[rules.actions]\nmove = {move}\n'))
    assert expected in str(info.value)
