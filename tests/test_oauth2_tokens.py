"""The token source against a real OAuth2 server on loopback, on SQLite and PostgreSQL: refresh
before expiry, rotation, serialised refresh across processes, revoked and unreachable endpoints,
the client credentials flow, encryption at rest."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from emailops.auth.device_login import device_login
from emailops.auth.errors import OAuth2KeyError, OAuth2RefusedError, OAuth2UnavailableError
from emailops.auth.sasl import OAUTHBEARER, XOAUTH2, NoOAuth2Mechanism, choose_mechanism, oauthbearer, xoauth2
from emailops.auth.token_endpoint import DeviceAuthorization
from emailops.auth.token_source import TokenSource
from emailops.config import OAuth2Flow
from emailops.store import account_state
from emailops.store.account_state import Event, State
from emailops.store.schema import oauth2_tokens
from localmail.oauth2_server import LocalOAuth2Server
from prod.logging_setup import JsonLineFormatter
from prod.oauth2_tokens import token_source
from prod.redaction import MASK, REDACTOR, Redactor
from tests.index_helpers import ALICE, index_engine
from tests.oauth2_helpers import APP_CLIENT_ID, CLIENT_ID, Clock, auth_server, oauth2_config, oauth2_settings

__all__ = ["auth_server"]

BOB = "bob@example.test"


def source(
    url: str, server: LocalOAuth2Server, clock: Clock | None = None, **overrides: object
) -> TokenSource:
    engine = index_engine(url)
    return TokenSource(engine, oauth2_config(server, **overrides), clock=clock or Clock())


def stored_row(tokens: TokenSource) -> object:
    with tokens.engine.connect() as conn:
        return conn.execute(select(oauth2_tokens)).one()


def test_sasl_strings_and_mechanism_choice() -> None:
    assert xoauth2("a@b", "T") == "user=a@b\1auth=Bearer T\1\1"
    assert oauthbearer("a,=b", "T") == "n,a=a=2C=3Db,\1auth=Bearer T\1\1"
    assert choose_mechanism(["PLAIN", "XOAUTH2", "OAUTHBEARER"]) == OAUTHBEARER
    assert choose_mechanism(["xoauth2"]) == XOAUTH2
    assert choose_mechanism([]) == XOAUTH2
    with pytest.raises(NoOAuth2Mechanism, match=r"AUTH LOGIN PLAIN"):
        choose_mechanism(["PLAIN", "LOGIN"])


def test_refresh_before_expiry_rotation_and_restart(db_url: str, auth_server: LocalOAuth2Server) -> None:
    auth_server.access_token_seconds = 600
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    clock = Clock()
    tokens = source(db_url, auth_server, clock, initial_refresh_token=seed)

    first = tokens.access_token()
    assert auth_server.introspect(first)["active"] is True
    assert auth_server.count("token:refresh_token") == 1
    # Rotated: the seed is refused from now on; the new refresh token is stored, encrypted.
    assert not auth_server.refresh_token_valid(seed)
    row = stored_row(tokens)
    rotated = tokens.cipher.decrypt(row.refresh_token)
    assert rotated != seed and auth_server.refresh_token_valid(rotated)
    assert first.encode() not in row.access_token and rotated.encode() not in row.refresh_token

    # Not due yet: answered from memory, no request.
    clock.advance(400)
    assert tokens.access_token() == first
    assert auth_server.count("token") == 1
    # Due (within the margin before expiry, still valid): refreshed before it fails.
    clock.advance(110)
    second = tokens.access_token()
    assert second != first and auth_server.count("token:refresh_token") == 2
    assert auth_server.introspect(first)["active"] is True  # it had not expired: refreshed early

    # A restarted process (a new source, same database and seed setting) uses the stored token.
    restarted = source(db_url, auth_server, clock, initial_refresh_token=seed)
    assert restarted.access_token() == second
    clock.advance(600)
    third = restarted.access_token()
    assert third not in (first, second) and auth_server.count("token:refresh_token") == 3


def test_rejected_token_is_replaced_once_unless_fresh(db_url: str, auth_server: LocalOAuth2Server) -> None:
    clock = Clock()
    tokens = source(
        db_url, auth_server, clock, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    )
    first = tokens.access_token()
    # Refused by the mail server right after it was issued: not the token's age, no new request.
    assert tokens.access_token(rejected=first) == first
    assert auth_server.count("token") == 1
    clock.advance(120)
    renewed = tokens.access_token(rejected=first)
    assert renewed != first and auth_server.count("token") == 2


def refresh_in_process(url: str, token_url: str, seed: str, start_at: float, out: str) -> None:
    """One of several processes due for a refresh at the same moment (each a worker starting)."""
    endpoints = SimpleNamespace(token_url=token_url, device_url=None)
    tokens = TokenSource(index_engine(url), oauth2_config(endpoints, initial_refresh_token=seed))  # type: ignore[arg-type]
    time.sleep(max(0.0, start_at - time.time()))
    Path(out).write_text(tokens.access_token())


@pytest.mark.parametrize("processes", [4])
def test_processes_due_together_make_one_refresh_request(
    db_url: str, auth_server: LocalOAuth2Server, tmp_path: Path, processes: int
) -> None:
    """Workers of one container (SQLite) or of several containers sharing PostgreSQL."""
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    # The account's row exists with an access token that is due when the processes start.
    auth_server.access_token_seconds = 2
    TokenSource(index_engine(db_url), oauth2_config(auth_server, initial_refresh_token=seed)).access_token()
    auth_server.access_token_seconds = 3600
    auth_server.token_delay_seconds = 0.5  # a slow endpoint: the others arrive while it works
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 4.0
    outs = [tmp_path / f"token-{n}" for n in range(processes)]
    workers = [
        context.Process(
            target=refresh_in_process,
            args=(db_url, auth_server.token_url, seed, start_at, str(out)),
        )
        for out in outs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    answers = {out.read_text() for out in outs}
    assert len(answers) == 1
    assert auth_server.count("token:refresh_token") == 2  # the one before, and one for all of them
    assert auth_server.introspect(answers.pop())["active"] is True


def test_revoked_refresh_token_one_request_per_backoff_period(
    db_url: str, auth_server: LocalOAuth2Server
) -> None:
    clock = Clock()
    tokens = source(
        db_url, auth_server, clock, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    )
    auth_server.revoke_refresh_tokens()
    with pytest.raises(OAuth2RefusedError, match=r"invalid_grant.*run `emailops auth login`"):
        tokens.access_token()
    # A minute of callers asking every second (all workers' reconnects): no further request.
    for _ in range(59):
        clock.advance(1)
        with pytest.raises(OAuth2RefusedError, match="run `emailops auth login`"):
            tokens.access_token()
    assert auth_server.count("token") == 1
    # After the backoff, one more attempt; then twice as long.
    clock.advance(2)
    with pytest.raises(OAuth2RefusedError):
        tokens.access_token()
    assert auth_server.count("token") == 2
    for _ in range(110):
        clock.advance(1)
        with pytest.raises(OAuth2RefusedError):
            tokens.access_token()
    assert auth_server.count("token") == 2
    status = tokens.status()
    assert status is not None and status.failures == 2 and status.last_error_kind == "refused"
    assert not status.signed_in  # the stored sign-in is refused: a new login is needed
    assert "invalid_grant" in (status.last_error or "")

    # A new refresh token given in the environment replaces the revoked one at once.
    fresh = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    replaced = source(db_url, auth_server, clock, initial_refresh_token=fresh)
    assert auth_server.introspect(replaced.access_token())["active"] is True


def test_unreachable_endpoint_is_unavailable_not_refused(db_url: str, auth_server: LocalOAuth2Server) -> None:
    clock = Clock()
    tokens = source(
        db_url, auth_server, clock, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    )
    auth_server.outage_status = 503
    with pytest.raises(OAuth2UnavailableError, match="HTTP 503"):
        tokens.access_token()
    auth_server.outage_status = None
    with pytest.raises(OAuth2UnavailableError):
        tokens.access_token()  # within the short backoff: no request
    assert auth_server.count("token") == 1
    clock.advance(6)
    assert auth_server.introspect(tokens.access_token())["active"] is True

    dead = source(
        db_url,
        auth_server,
        clock,
        token_url="http://127.0.0.1:9/token",
        account="other@x",
        initial_refresh_token="x" * 20,
    )
    with pytest.raises(OAuth2UnavailableError, match="cannot connect"):
        dead.access_token()


def test_client_credentials_flow(db_url: str, auth_server: LocalOAuth2Server) -> None:
    clock = Clock()
    tokens = source(db_url, auth_server, clock, flow=OAuth2Flow.CLIENT_CREDENTIALS, client_id=APP_CLIENT_ID)
    token = tokens.access_token()
    answer = auth_server.introspect(token)
    assert answer["active"] is True and answer["username"] == ALICE
    assert auth_server.count("token:client_credentials") == 1
    clock.advance(3600)
    assert tokens.access_token() != token
    assert auth_server.count("token:client_credentials") == 2
    assert stored_row(tokens).refresh_token is None


def test_no_sign_in_and_wrong_key_name_the_fix(db_url: str, auth_server: LocalOAuth2Server) -> None:
    tokens = source(db_url, auth_server)
    with pytest.raises(OAuth2RefusedError, match=r"no OAuth2 sign-in stored .*run `emailops auth login`"):
        tokens.access_token()
    assert auth_server.count("token") == 0

    seeded = source(
        db_url, auth_server, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    )
    seeded.access_token()
    other_key = Fernet.generate_key().decode()
    wrong = source(db_url, auth_server, token_keys=(other_key,))
    with pytest.raises(OAuth2KeyError, match="EMAIL_OAUTH2_TOKEN_KEY"):
        wrong.access_token()
    # Key rotation: the new key first, the old one still reads.
    rotated = source(db_url, auth_server, token_keys=(other_key, seeded.config.token_keys[0]))
    assert auth_server.introspect(rotated.access_token())["active"] is True

    assert seeded.logout() is True
    status = seeded.status()
    assert status is not None and not status.signed_in


def test_a_changed_flow_gets_its_own_token_once(db_url: str, auth_server: LocalOAuth2Server) -> None:
    clock = Clock()
    delegated = source(
        db_url, auth_server, clock, initial_refresh_token=auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    )
    delegated.access_token()
    app = source(db_url, auth_server, clock, flow=OAuth2Flow.CLIENT_CREDENTIALS, client_id=APP_CLIENT_ID)
    token = app.access_token()
    again = source(db_url, auth_server, clock, flow=OAuth2Flow.CLIENT_CREDENTIALS, client_id=APP_CLIENT_ID)
    assert again.access_token() == token
    assert auth_server.count("token:client_credentials") == 1


def test_every_token_and_sasl_string_is_announced_for_masking(
    db_url: str, auth_server: LocalOAuth2Server
) -> None:
    redactor = Redactor()
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    tokens = TokenSource(
        index_engine(db_url),
        oauth2_config(auth_server, initial_refresh_token=seed),
        on_secret=redactor.replace_secrets,
    )
    access = tokens.access_token()
    rotated = tokens.cipher.decrypt(stored_row(tokens).refresh_token)
    for secret in (
        seed,
        access,
        rotated,
        tokens.config.client_secret or "",
        xoauth2(ALICE, access),
        oauthbearer(ALICE, access),
    ):
        for shown in (secret, base64.b64encode(secret.encode()).decode()):
            assert redactor.redact_known_values(f"x {shown} y") == f"x {MASK} y"


def test_masking_stays_bounded_over_many_refreshes(tmp_path: Path, auth_server: LocalOAuth2Server) -> None:
    """A worker's token source as the daemon builds it, refreshed 2,000 times (83 days at one an
    hour): the process masks as many values after as after the second, the current and the
    just-replaced token in a real log line included, and no longer the ones before."""
    seed = auth_server.issue_refresh_token(ALICE, CLIENT_ID)
    settings = oauth2_settings(auth_server.token_url, seed, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    tokens = token_source(settings, index_engine(settings.index_db_url))
    assert tokens is not None
    clock = Clock()
    tokens.clock = clock
    issued = [tokens.access_token()]
    for refresh in range(1, 2001):
        clock.advance(3600)
        issued.append(tokens.access_token())
        if refresh == 2:
            after_two = REDACTOR.size
    assert auth_server.count("token:refresh_token") == 2001 and len(set(issued)) == 2001
    assert REDACTOR.size == after_two

    def logged(token: str) -> str:
        record = logging.LogRecord("emailops.imap", logging.WARNING, "", 0, "sign-in: %s", (token,), None)
        return str(json.loads(JsonLineFormatter().format(record))["message"])

    current, replaced, older = issued[-1], issued[-2], issued[-3]
    assert logged(current) == f"sign-in: {MASK}"
    assert logged(xoauth2(ALICE, current)) == f"sign-in: {MASK}"
    assert logged(replaced) == f"sign-in: {MASK}"  # may still be in flight
    assert logged(older) == f"sign-in: {older}"  # held by nothing any more


def test_two_accounts_refreshing_each_on_its_own_keep_the_masking_bounded(
    db_url: str, auth_server: LocalOAuth2Server
) -> None:
    """Two accounts on one index and one redactor, each refreshing on its own clock (alice every
    hour, bob every 100 minutes, their refreshes interleaved): after both have replaced their tokens
    twice the redactor masks as many values as at the end, each account's current and just-replaced
    token and none older; bob's refreshes never drop alice's tokens."""
    redactor = Redactor()
    sources: dict[str, tuple[TokenSource, Clock, float]] = {}
    for username, every_minutes in ((ALICE, 60), (BOB, 100)):
        seed = auth_server.issue_refresh_token(username, CLIENT_ID)
        clock = Clock()
        config = oauth2_config(
            auth_server, account=f"{username}@127.0.0.1", username=username, initial_refresh_token=seed
        )
        sources[username] = (
            TokenSource(index_engine(db_url), config, clock=clock, on_secret=redactor.replace_secrets),
            clock,
            every_minutes,
        )
    issued: dict[str, list[str]] = {
        username: [tokens.access_token()] for username, (tokens, _, _) in sources.items()
    }
    # Minute by minute over 60 hours: each account refreshes when its own period has passed.
    size_after_two: int | None = None
    for minute in range(1, 60 * 60 + 1):
        for username, (tokens, clock, every_minutes) in sources.items():
            if minute % every_minutes == 0:
                clock.advance(every_minutes * 60)
                issued[username].append(tokens.access_token())
        if size_after_two is None and all(len(tokens) >= 3 for tokens in issued.values()):
            size_after_two = redactor.size
    assert len(set(issued[ALICE])) == 61 and len(set(issued[BOB])) == 37
    assert auth_server.count("token:refresh_token") == 61 + 37  # the first from each seed
    assert size_after_two is not None and redactor.size == size_after_two
    for tokens in issued.values():
        current, replaced, older = tokens[-1], tokens[-2], tokens[-3]
        assert redactor.redact_known_values(f"x {current} y") == f"x {MASK} y"
        assert redactor.redact_known_values(f"x {replaced} y") == f"x {MASK} y"
        assert redactor.redact_known_values(f"x {older} y") == f"x {older} y"


def test_public_client_device_login_and_refresh(db_url: str) -> None:
    """Microsoft's delegated set-up: a public client (no secret) signs in with the device code."""
    with LocalOAuth2Server({"public-client": None}) as server:
        tokens = source(db_url, server, client_id="public-client", client_secret=None)
        shown: list[DeviceAuthorization] = []

        def show(authorization: DeviceAuthorization) -> None:
            shown.append(authorization)
            server.approve(authorization.user_code, ALICE)

        device_login(tokens, show=show, sleep=lambda _seconds: None)
        assert shown and shown[0].verification_uri.startswith(server.base_url)
        first = tokens.access_token()
        assert server.introspect(first)["active"] is True
        assert server.count("token:refresh_token") == 0
        tokens.clock.advance(3600)  # type: ignore[attr-defined]
        assert server.introspect(tokens.access_token())["active"] is True
        assert server.count("token:refresh_token") == 1


def test_a_new_login_makes_an_account_whose_grant_was_refused_due_at_once(
    db_url: str, auth_server: LocalOAuth2Server
) -> None:
    """`emailops auth login` is stored with the account's next sign-in set to now: the workers do
    not wait for the slow retry of an auth_failed account, which a new grant ends (NEW_GRANT)."""
    tokens = source(db_url, auth_server)
    with tokens.engine.begin() as conn:
        refused = account_state.record(
            conn, tokens.config.account, Event.REFUSED, error_kind="auth", error="invalid_grant"
        )
        assert refused.state is State.AUTH_FAILED
        assert (account_state.seconds_until_due(conn, tokens.config.account) or 0) > 600
    device_login(
        tokens,
        show=lambda authorization: auth_server.approve(authorization.user_code, ALICE),
        sleep=lambda _s: None,
    )
    with tokens.engine.connect() as conn:
        assert account_state.seconds_until_due(conn, tokens.config.account) == 0.0
        assert account_state.read_state(conn, tokens.config.account).state is State.OK  # type: ignore[union-attr]


def test_declined_device_login_is_refused(db_url: str, auth_server: LocalOAuth2Server) -> None:
    tokens = source(db_url, auth_server)
    with pytest.raises(OAuth2RefusedError, match="access_denied"):
        device_login(
            tokens,
            show=lambda authorization: auth_server.deny(authorization.user_code),
            sleep=lambda _s: None,
        )
    status = tokens.status()
    assert status is None or not status.signed_in
