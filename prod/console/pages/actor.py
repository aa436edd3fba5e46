"""Who a console request acts as, for the audit log: the signed-in user, their role, their address."""

from __future__ import annotations

from emailops.audit import Actor
from prod.console.calls import Call


def actor_of(call: Call) -> Actor:
    assert call.identity is not None  # the route's permission admitted a signed-in user
    return Actor(name=call.identity.name, role=call.identity.role.value, source=call.source)
