"""The device authorization grant (RFC 8628): show a URL and a code, wait for the person to
sign in elsewhere, store the tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

from emailops.auth.errors import OAuth2RefusedError, OAuth2UnavailableError
from emailops.auth.token_endpoint import DeviceAuthorization, DevicePending, TokenEndpoint
from emailops.auth.token_source import TokenSource

# RFC 8628 section 3.5: after slow_down, poll 5 seconds less often.
SLOW_DOWN_SECONDS = 5


def device_login(
    source: TokenSource,
    *,
    show: Callable[[DeviceAuthorization], None],
    endpoint: TokenEndpoint | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run the whole login; returns once the tokens are stored. Raises ``OAuth2RefusedError``
    when the person declines or the code expires, ``OAuth2UnavailableError`` when the endpoint
    cannot be reached to start."""
    endpoint = endpoint or source.endpoint
    authorization = endpoint.start_device_authorization()
    show(authorization)
    interval = max(1, authorization.interval)
    deadline = monotonic() + authorization.expires_in
    while True:
        sleep(interval)
        if monotonic() > deadline:
            raise OAuth2RefusedError("the code expired before the sign-in was completed: run it again")
        try:
            response = endpoint.poll_device(authorization.device_code)
        except DevicePending as pending:
            if pending.slow_down:
                interval += SLOW_DOWN_SECONDS
            continue
        except OAuth2UnavailableError:
            continue  # the person may still complete the sign-in; keep polling until the deadline
        source.store_login(response)
        return
