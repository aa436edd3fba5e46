"""Never answer a robot: RFC 3834 (automatic responses) and RFC 5230 section 4.6 (Sieve vacation).

``reply_suppression_reason(parsed, config)`` returns a short reason (it is logged) or ``None`` when
a reply may be sent. The checks, cheapest first:

- ``Auto-Submitted`` present with any value other than ``no`` (RFC 3834 section 5);
- ``Precedence: bulk | list | junk`` (de-facto standard RFC 3834 section 2 mentions);
- any ``List-*`` header (RFC 2369 / RFC 2919): mailing-list traffic;
- ``X-Auto-Response-Suppress`` naming ``All``, ``AutoReply`` or ``OOF`` (Microsoft's convention);
- an empty Return-Path ``<>``: bounces and other automatic messages (RFC 3834 section 2, RFC 5321);
- a sender, reply target or Return-Path whose local part is a role or robot address: MAILER-DAEMON,
  postmaster, LISTSERV, majordomo, ``*-request``, ``owner-*`` (RFC 5230 section 4.6) and the
  noreply / no-reply / do-not-reply family;
- the account's own addresses and our own replies (Message-ID we generated), a loop with ourselves;
- the operator's never-reply list: shell globs on the address, case-insensitive;
- no single valid address to answer.
"""

from __future__ import annotations

import re
from email.headerregistry import Address as HeaderAddress
from fnmatch import fnmatchcase

from emailops.config import ReplyConfig
from emailops.mime.model import ParsedMessage
from emailops.replies.compose import MESSAGE_ID_PREFIX, AddressError, choose_recipient, parse_from_address

_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
_SUPPRESS_TOKENS = frozenset({"all", "autoreply", "oof"})
_ROLE_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster", "listserv", "majordomo"})
# noreply, no-reply, no_reply, no.reply, donotreply, do-not-reply, ... optionally followed by +tag
# or -suffix (noreply-billing@, no-reply+abc@).
_NOREPLY = re.compile(r"^(?:no|do[-_.]?not)[-_.]?reply(?:[-_.+].*)?$")


def robot_local_part_reason(address: str) -> str | None:
    """Why an address is a robot or role address, judged on its local part, or ``None``."""
    local = address.rpartition("@")[0].lower() or address.lower()
    # A +tag (subaddress, RFC 5233) does not change what the mailbox is.
    base = local.split("+", 1)[0]
    if base in _ROLE_LOCAL_PARTS:
        return f"role address {base}"
    if base.endswith("-request"):
        return "list request address (*-request)"
    if base.startswith("owner-"):
        return "list owner address (owner-*)"
    if _NOREPLY.match(local):
        return "no-reply address"
    return None


def _auto_submitted_reason(parsed: ParsedMessage) -> str | None:
    values = list(parsed.headers.get("auto-submitted", ()))
    if parsed.auto_submitted:
        values.append(parsed.auto_submitted)
    for value in values:
        keyword = value.split(";", 1)[0].strip().lower()
        if keyword != "no":
            return f"auto-submitted: {keyword or 'empty'}"
    return None


def _header_reasons(parsed: ParsedMessage) -> str | None:
    for value in parsed.headers.get("precedence", ()):
        if value.strip().lower() in _BULK_PRECEDENCE:
            return f"precedence: {value.strip().lower()}"
    list_headers = sorted(name for name in parsed.headers if name.startswith("list-"))
    if list_headers:
        return f"mailing list ({list_headers[0]})"
    if parsed.list_id:
        return "mailing list (list-id)"
    for value in parsed.headers.get("x-auto-response-suppress", ()):
        tokens = {t.strip().lower() for t in value.split(",")}
        hit = sorted(tokens & _SUPPRESS_TOKENS)
        if hit:
            return f"x-auto-response-suppress: {hit[0]}"
    return None


def _is_own_reply(parsed: ParsedMessage, own_domain: str | None) -> bool:
    mid = (parsed.message_id or "").strip().strip("<>").lower()
    if not mid.startswith(MESSAGE_ID_PREFIX):
        return False
    return own_domain is None or mid.endswith("@" + own_domain)


def reply_suppression_reason(parsed: ParsedMessage, config: ReplyConfig) -> str | None:
    """Why no automatic reply may answer ``parsed``, or ``None`` when one may."""
    reason = _auto_submitted_reason(parsed) or _header_reasons(parsed)
    if reason:
        return reason
    if parsed.return_path == "":
        return "null return path (<>)"

    try:
        own_sender: HeaderAddress | None = parse_from_address(config.from_address)
    except AddressError:
        own_sender = None
    if _is_own_reply(parsed, own_sender.domain.lower() if own_sender else None):
        return "our own automatic reply"

    try:
        recipient = choose_recipient(parsed).email.lower()
    except AddressError as exc:
        return f"no valid address to reply to ({exc})"
    checked = [recipient]
    checked += [a.email.lower() for a in parsed.from_[:1] if a.email.lower() != recipient]
    if parsed.return_path:
        checked.append(parsed.return_path.strip().strip("<>").lower())

    own = {a.lower() for a in config.own_addresses}
    if own_sender is not None:
        own.add(own_sender.addr_spec.lower())
    for address in checked:
        if address in own:
            return "own address"
    for address in checked:
        role = robot_local_part_reason(address)
        if role:
            return role
    for pattern in config.never_reply_to:
        for address in checked[:2]:
            if fnmatchcase(address, pattern.strip().lower()):
                return f"never-reply list ({pattern.strip()})"
    return None
