"""The folders the rules move mail to, checked against the server when the rules load.

A ``move`` to a folder the server does not have fails for every message the rule matches (the
server answers ``[TRYCREATE]``). Checked once per load of the rules instead, such a folder is one
WARNING naming it and its rules before any mail arrives, or is created where a rule says
``move = { folder = "...", create = true }``. ``emailops rules check --server`` lists the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from emailops.imap.errors import CONNECTION_ERRORS, ImapError
from emailops.replies.mailbox import MailboxSession
from emailops.rules.model import RuleSet

log = structlog.get_logger(component="rules")


@dataclass(frozen=True)
class MoveFolder:
    """A folder rules move mail to; ``create``: one of them says to create it when missing."""

    folder: str
    rules: tuple[str, ...]
    create: bool


def move_folders(ruleset: RuleSet) -> list[MoveFolder]:
    """Each folder the rules move mail to, with the rules that do, in file order."""
    by_folder: dict[str, list[tuple[str, bool]]] = {}
    for rule in ruleset.rules:
        if rule.move_to:
            by_folder.setdefault(rule.move_to, []).append((rule.name, rule.create_move_folder))
    return [
        MoveFolder(folder, tuple(name for name, _ in rules), any(create for _, create in rules))
        for folder, rules in by_folder.items()
    ]


def missing_move_folders(client: IMAPClient, ruleset: RuleSet) -> list[MoveFolder]:
    """The rules' move folders that the server does not list (one LIST)."""
    wanted = move_folders(ruleset)
    if not wanted:
        return []
    existing = {_folder_key(name) for _flags, _delimiter, name in client.list_folders()}
    return [target for target in wanted if _folder_key(target.folder) not in existing]


def _folder_key(name: str) -> str:
    # INBOX is case-insensitive in IMAP (RFC 3501 section 5.1); other names are not.
    return "INBOX" if name.upper() == "INBOX" else name


class MoveFolderCheck:
    """Checks the move folders of each rule set the cache loads, once (``RulesStage``): logs a
    WARNING per missing folder, or creates it where a rule asks (not in a dry run). When the server
    cannot be asked, the check is tried again after ``RETRY_SECONDS``."""

    RETRY_SECONDS = 60.0

    def __init__(
        self, mailbox: MailboxSession, *, create: bool, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.mailbox = mailbox
        self.create = create
        self.monotonic = monotonic
        self._checked: RuleSet | None = None
        self._next_try = 0.0

    def __call__(self, ruleset: RuleSet) -> None:
        if ruleset is self._checked or self.monotonic() < self._next_try:
            return
        if not any(rule.move_to for rule in ruleset.rules):
            self._checked = ruleset
            return
        try:
            client = self.mailbox.client()
            for target in missing_move_folders(client, ruleset):
                self._report_or_create(client, target)
        except (ImapError, *CONNECTION_ERRORS) as exc:
            self.mailbox.drop()
            self._next_try = self.monotonic() + self.RETRY_SECONDS
            log.warning(
                "could not check the rules' move folders on the server; trying again",
                error=str(exc),
                retry_in_seconds=self.RETRY_SECONDS,
            )
            return
        self._checked = ruleset

    def _report_or_create(self, client: IMAPClient, target: MoveFolder) -> None:
        if target.create and self.create:
            try:
                client.create_folder(target.folder)
            except IMAPClientAbortError:
                raise
            except IMAPClientError as exc:
                log.warning(
                    "the server refused to create a folder the rules move mail to; those moves will fail",
                    folder=target.folder,
                    rules=list(target.rules),
                    error=str(exc),
                )
                return
            log.info(
                "created the folder the rules move mail to", folder=target.folder, rules=list(target.rules)
            )
            return
        log.warning(
            "the rules move mail to a folder the server does not have; those moves will fail "
            '(create the folder, or write move = { folder = "...", create = true })',
            folder=target.folder,
            rules=list(target.rules),
        )
