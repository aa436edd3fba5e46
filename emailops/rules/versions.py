"""Versions of the rules file edited in the console: checked, saved, kept, compared, restored.

The file stays what the daemon reads: a saved version replaces it atomically (``atomic_file``),
and every worker's ``RuleSetCache`` sees the new file at its next message (the replaced file is a
new inode) and loads it, no restart. Each version saved is kept in ``rules_versions``, with the
text the file held before when it is not kept yet (an edit by hand), so any of them can be
restored. A save or restore is audited (``rules.edit``) with the hashes before and after.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select

from emailops import audit
from emailops.atomic_file import write_atomically
from emailops.audit import Actor
from emailops.rules.text_check import RulesProblem, validate_rules_text
from emailops.store.db_clock import db_now
from emailops.store.schema import rules_versions
from emailops.users.permissions import Action

# The author of a version found in the file but never saved from the console.
BY_HAND = "(edited in the file)"


@dataclass(frozen=True)
class RulesVersion:
    id: int
    sha256: str
    author: str
    saved_at: datetime
    text: str


class InvalidRulesError(ValueError):
    """The text was not saved: it has ``problems`` (each at its line)."""

    def __init__(self, problems: list[RulesProblem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def running_text(path: Path) -> str:
    """The rules file's text as the daemon reads it ("" when there is no file: no rules)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def diff_against_running(path: Path, text: str) -> str:
    """A unified diff from the running file to ``text`` ("" when they are the same)."""
    return "".join(
        difflib.unified_diff(
            running_text(path).splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=f"{path.name} (running)",
            tofile=f"{path.name} (new)",
        )
    )


def save_rules(engine: Engine, path: Path, text: str, *, actor: Actor) -> RulesVersion:
    """Check ``text`` (``InvalidRulesError`` when it has problems: nothing changes), keep it as a
    version, replace the file with it, audited as ``rules.edit``."""
    return _save(engine, path, text, actor, restored_from=None)


def restore_rules(engine: Engine, path: Path, version_id: int, *, actor: Actor) -> RulesVersion:
    """Save kept version ``version_id`` again as the running rules (checked again: a template file it
    names may be gone); ``LookupError`` when there is no such version."""
    with engine.connect() as conn:
        kept = get_version(conn, version_id)
    if kept is None:
        raise LookupError(f"no rules version {version_id}")
    return _save(engine, path, kept.text, actor, restored_from=version_id)


def list_versions(conn: Connection, *, limit: int = 50) -> list[RulesVersion]:
    """The versions kept, newest first."""
    query = select(rules_versions).order_by(rules_versions.c.id.desc()).limit(limit)
    return [_version(row) for row in conn.execute(query)]


def get_version(conn: Connection, version_id: int) -> RulesVersion | None:
    row = conn.execute(select(rules_versions).where(rules_versions.c.id == version_id)).first()
    return _version(row) if row is not None else None


def _save(engine: Engine, path: Path, text: str, actor: Actor, *, restored_from: int | None) -> RulesVersion:
    problems = validate_rules_text(text, path=path)
    if problems:
        raise InvalidRulesError(problems)
    with engine.begin() as conn:
        running = running_text(path)
        if running and _newest_hash(conn) != text_hash(running):
            _keep(conn, running, BY_HAND)
        version = _keep(conn, text, actor.name)
        after: dict[str, Any] = {"sha256": version.sha256, "version": version.id}
        if restored_from is not None:
            after["restored_from"] = restored_from
        before = {"sha256": text_hash(running) if running else None}
        audit.record(conn, actor, Action.EDIT_RULES.value, str(path), before=before, after=after)
        # Last, inside the transaction: a failed write leaves no version and no audit entry.
        write_atomically(path, text)
    return version


def _newest_hash(conn: Connection) -> str | None:
    query = select(rules_versions.c.sha256).order_by(rules_versions.c.id.desc()).limit(1)
    return conn.execute(query).scalar_one_or_none()


def _keep(conn: Connection, text: str, author: str) -> RulesVersion:
    row = conn.execute(
        rules_versions.insert()
        .values(text=text, sha256=text_hash(text), author=author, saved_at=db_now(conn))
        .returning(rules_versions)
    ).one()
    return _version(row)


def _version(row: Any) -> RulesVersion:
    return RulesVersion(id=row.id, sha256=row.sha256, author=row.author, saved_at=row.saved_at, text=row.text)
