"""The permission table: every action for every role, against a matrix written out here."""

from __future__ import annotations

import itertools

import pytest

from emailops.users.permissions import PERMISSIONS, Action, Role, allowed

# The least role that may do each action, as the README's "Users and audit log" says it.
LEAST_ROLE = {
    "overview.view": "viewer",
    "messages.view": "viewer",
    "outbox.view": "viewer",
    "quarantine.view": "viewer",
    "drafts.view": "viewer",
    "rules.view": "viewer",
    "accounts.view": "viewer",
    "settings.view": "viewer",
    "outbox.resolve": "operator",
    "quarantine.retry": "operator",
    "quarantine.release": "operator",
    "drafts.retry": "operator",
    "drafts.cancel": "operator",
    "messages.rerun_rules": "operator",
    "accounts.fetch_now": "operator",
    "rules.test": "operator",
    "rules.edit": "admin",
    "accounts.manage": "admin",
    "users.view": "admin",
    "users.manage": "admin",
    "sign_ins.manage": "admin",
    "audit.view": "admin",
}
RANK = {"viewer": 0, "operator": 1, "admin": 2}


def test_the_matrix_names_every_action_and_every_role() -> None:
    assert set(LEAST_ROLE) == {action.value for action in Action}
    assert set(RANK) == {role.value for role in Role} == set(PERMISSIONS)


@pytest.mark.parametrize(("role", "action"), list(itertools.product(RANK, LEAST_ROLE)))
def test_each_role_may_do_exactly_what_the_matrix_says(role: str, action: str) -> None:
    assert allowed(role, action) is (RANK[role] >= RANK[LEAST_ROLE[action]])
    assert allowed(Role(role), Action(action)) is allowed(role, action)


@pytest.mark.parametrize(
    ("role", "action"),
    [
        ("root", "overview.view"),
        ("", "overview.view"),
        ("Admin", "users.manage"),
        ("admin", "users.delete_everything"),
        ("admin", ""),
        ("viewer", "OVERVIEW.VIEW"),
    ],
)
def test_an_unknown_role_or_action_is_refused(role: str, action: str) -> None:
    assert allowed(role, action) is False
