"""The rules an operator writes, as loaded and validated from the rules file (see ``loader``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from emailops.rules.patterns import Pattern
from emailops.rules.templates import Template


class RulesError(ValueError):
    """The rules file is invalid. The message names the file, the rule (name and #index) and the field;
    ``rule_index`` (from 1) and ``field`` (``match.subject_regex``) say it to a program, when known."""

    def __init__(self, message: str, *, rule_index: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.rule_index = rule_index
        self.field = field


class MatchKind(StrEnum):
    # Case-insensitive substring (subject, body, headers).
    SUBSTRING = "substring"
    # Case-insensitive shell glob on a whole address (from, to, cc).
    GLOB = "glob"
    # Case-insensitive search with RE2 (linear time; see ``rules.patterns``).
    REGEX = "regex"


class ReplyAction(StrEnum):
    """What becomes of a rule's reply: sent by SMTP, or saved in the Drafts folder for a human."""

    SEND = "send"
    DRAFT = "draft"


@dataclass(frozen=True)
class Condition:
    """One test on one field; it holds when any pattern matches any value of the field.

    ``field`` is ``subject``, ``from``, ``to``, ``cc``, ``body`` or ``header:<lower-cased name>``.
    """

    field: str
    kind: MatchKind
    patterns: tuple[str, ...]
    regexes: tuple[Pattern, ...] = ()


@dataclass(frozen=True)
class LlmSpec:
    """A reply written by a language model: the prompt (may use ``{body}``) and per-rule overrides
    of the model settings (``None``: the settings' defaults)."""

    prompt: Template
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class ReplySpec:
    # The reply's text: a template, or (``llm`` set) None, the text then comes from the model.
    body: Template | None
    html: Template | None = None
    # None: "Re: " plus the inbound subject.
    subject: Template | None = None
    # 0 turns the per-rule limit off (the global caps of ReplyConfig still apply).
    once_per_sender_days: int = 7
    action: ReplyAction = ReplyAction.SEND
    llm: LlmSpec | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    index: int
    folders: tuple[str, ...] = ("INBOX",)
    # True: every condition must hold ("all"); False: at least one ("any"). No condition: every message.
    match_all: bool = True
    conditions: tuple[Condition, ...] = ()
    # The accounts (by name) the rule applies to; empty: every account.
    accounts: tuple[str, ...] = ()
    reply: ReplySpec | None = None
    flag: bool = False
    mark_seen: bool = False
    move_to: str | None = None
    # The folder ``move_to`` is created when the server does not have it (``move = { create = true }``).
    create_move_folder: bool = False
    # Stop evaluating later rules when this one matched.
    stop: bool = False

    def applies_to_folder(self, folder: str) -> bool:
        # INBOX is case-insensitive in IMAP (RFC 3501 section 5.1); other names are not.
        return any(f == folder or (f.upper() == "INBOX" and folder.upper() == "INBOX") for f in self.folders)


@dataclass(frozen=True)
class RuleSet:
    """The rules in file order, and every file they were read from (for change detection)."""

    rules: tuple[Rule, ...] = ()
    sources: tuple[Path, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.rules)
