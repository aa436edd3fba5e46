"""What each role may do, as data: one table, asked through ``allowed``.

A **viewer** reads everything but secrets; an **operator** also acts on mail (outbox, quarantine,
drafts, fetch now, test rules); an **admin** also manages accounts, rules, users and sign-ins.
Anything not in the table (an unknown role or action) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class Action(StrEnum):
    # Reading (never a secret: passwords, tokens and keys are masked wherever they are shown).
    VIEW_OVERVIEW = "overview.view"
    VIEW_MESSAGES = "messages.view"
    VIEW_OUTBOX = "outbox.view"
    VIEW_QUARANTINE = "quarantine.view"
    VIEW_DRAFTS = "drafts.view"
    VIEW_RULES = "rules.view"
    VIEW_ACCOUNTS = "accounts.view"
    VIEW_SETTINGS = "settings.view"
    # Acting on mail.
    RESOLVE_OUTBOX = "outbox.resolve"
    RETRY_QUARANTINE = "quarantine.retry"
    RELEASE_QUARANTINE = "quarantine.release"
    RETRY_DRAFT = "drafts.retry"
    CANCEL_DRAFT = "drafts.cancel"
    RERUN_RULES = "messages.rerun_rules"
    FETCH_NOW = "accounts.fetch_now"
    TEST_RULES = "rules.test"
    # Managing.
    EDIT_RULES = "rules.edit"
    MANAGE_ACCOUNTS = "accounts.manage"
    VIEW_USERS = "users.view"
    MANAGE_USERS = "users.manage"
    MANAGE_SIGN_INS = "sign_ins.manage"
    VIEW_AUDIT = "audit.view"


_READ = frozenset(
    {
        Action.VIEW_OVERVIEW,
        Action.VIEW_MESSAGES,
        Action.VIEW_OUTBOX,
        Action.VIEW_QUARANTINE,
        Action.VIEW_DRAFTS,
        Action.VIEW_RULES,
        Action.VIEW_ACCOUNTS,
        Action.VIEW_SETTINGS,
    }
)
_ACT_ON_MAIL = frozenset(
    {
        Action.RESOLVE_OUTBOX,
        Action.RETRY_QUARANTINE,
        Action.RELEASE_QUARANTINE,
        Action.RETRY_DRAFT,
        Action.CANCEL_DRAFT,
        Action.RERUN_RULES,
        Action.FETCH_NOW,
        Action.TEST_RULES,
    }
)
_MANAGE = frozenset(
    {
        Action.EDIT_RULES,
        Action.MANAGE_ACCOUNTS,
        Action.VIEW_USERS,
        Action.MANAGE_USERS,
        Action.MANAGE_SIGN_INS,
        Action.VIEW_AUDIT,
    }
)

PERMISSIONS: Mapping[Role, frozenset[Action]] = {
    Role.VIEWER: _READ,
    Role.OPERATOR: _READ | _ACT_ON_MAIL,
    Role.ADMIN: _READ | _ACT_ON_MAIL | _MANAGE,
}


def allowed(role: str, action: str) -> bool:
    """Whether ``role`` may do ``action`` (both by value, e.g. ``"operator"``, ``"outbox.resolve"``)."""
    try:
        return Action(action) in PERMISSIONS[Role(role)]
    except ValueError:  # not a role or not an action
        return False
