"""The redactor's secrets that change (OAuth2 tokens): held per source, the current value and the
one it replaced for a grace window, so its size depends on the sources, not on the changes."""

from __future__ import annotations

import base64

from prod.redaction import MASK, Redactor, secret_variants

GRACE = 900.0


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def masked(redactor: Redactor, secret: str) -> bool:
    return redactor.redact_known_values(f"a {secret} b") == f"a {MASK} b"


def token(n: int) -> str:
    return f"eo-at-{n:08d}-c0ffee"


def test_a_source_holds_its_current_secret_and_the_one_it_replaced() -> None:
    clock = MonotonicClock()
    redactor = Redactor(grace_seconds=GRACE, clock=clock)
    redactor.replace_secrets("access token of alice", (token(1),))
    assert masked(redactor, token(1))
    assert masked(redactor, base64.b64encode(token(1).encode()).decode())

    clock.now += 10
    redactor.replace_secrets("access token of alice", (token(2),))
    # Just replaced: a sign-in or an error under way may still carry it.
    assert masked(redactor, token(1)) and masked(redactor, token(2))

    clock.now += 10
    redactor.replace_secrets("access token of alice", (token(3),))
    # Replaced twice: nothing in the process holds it any more.
    assert not masked(redactor, token(1))
    assert masked(redactor, token(2)) and masked(redactor, token(3))

    # The grace window ends without another change: the next line is masked without it.
    clock.now += GRACE
    assert not masked(redactor, token(2))
    assert masked(redactor, token(3))
    assert redactor.size == len(secret_variants(token(3)))


def test_size_depends_on_the_sources_not_on_the_changes() -> None:
    clock = MonotonicClock()
    redactor = Redactor(grace_seconds=GRACE, clock=clock)
    redactor.register("the-imap-password", username="alice@example.test")
    sizes = []
    for n in range(1, 3001):
        clock.now += 3600
        for account in ("alice", "bob"):
            redactor.replace_secrets(f"access token of {account}", (f"{token(n)}-{account}",))
            redactor.replace_secrets(f"refresh token of {account}", (f"eo-rt-{n:08d}-{account}",))
        if n in (2, 3000):
            sizes.append(redactor.size)
    assert sizes[0] == sizes[1] > 0
    # The fixed secret stays, both accounts' current and just-replaced secrets are masked.
    assert masked(redactor, "the-imap-password")
    for account in ("alice", "bob"):
        assert masked(redactor, f"{token(3000)}-{account}") and masked(redactor, f"{token(2999)}-{account}")
        assert not masked(redactor, f"{token(2998)}-{account}")


def test_announcing_the_current_secret_again_keeps_the_replaced_one() -> None:
    """A token source announces a token it reads back from the database: not a change."""
    clock = MonotonicClock()
    redactor = Redactor(grace_seconds=GRACE, clock=clock)
    redactor.replace_secrets("access token of alice", (token(1),))
    redactor.replace_secrets("access token of alice", (token(2),))
    redactor.replace_secrets("access token of alice", (token(2),))
    assert masked(redactor, token(1)) and masked(redactor, token(2))


def test_a_group_is_replaced_whole_and_sources_are_independent() -> None:
    clock = MonotonicClock()
    redactor = Redactor(grace_seconds=GRACE, clock=clock)
    sasl = f"user=alice\1auth=Bearer {token(1)}\1\1"
    redactor.replace_secrets("access token of alice", (token(1), sasl))
    redactor.replace_secrets("access token of bob", (token(7),))
    assert masked(redactor, base64.b64encode(sasl.encode()).decode())
    redactor.replace_secrets("access token of alice", (token(2),))
    redactor.replace_secrets("access token of alice", (token(3),))
    assert not masked(redactor, base64.b64encode(sasl.encode()).decode())
    assert masked(redactor, token(7))  # bob's token is not alice's to replace


def test_longest_first_across_fixed_and_changing_secrets() -> None:
    redactor = Redactor()
    redactor.register("c0ffee-key")
    redactor.replace_secrets("access token of alice", ("xx-c0ffee-key-yy",))
    assert redactor.redact_known_values("a xx-c0ffee-key-yy b c0ffee-key") == f"a {MASK} b {MASK}"


def test_empty_secrets_and_clear() -> None:
    redactor = Redactor()
    redactor.replace_secrets("client secret of alice", ("",))
    assert redactor.size == 0
    redactor.register("the-imap-password")
    redactor.replace_secrets("access token of alice", (token(1),))
    redactor.clear()
    assert redactor.size == 0 and not masked(redactor, token(1))
