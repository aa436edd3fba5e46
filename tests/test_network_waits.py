"""The record of network waits (emailops.network_waits) as a state machine, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from emailops.network_waits import NetworkWaits, Silence


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_call_is_in_flight_within_its_bound_only() -> None:
    clock = Clock()
    waits = NetworkWaits(monotonic=clock, wall_clock=clock)
    me = threading.get_ident()
    assert waits.in_flight(me) is None
    with waits.waiting("imap", "mail:143", 5.0):
        clock.now += 4.9
        wait = waits.in_flight(me)
        assert wait is not None and (wait.endpoint, wait.since) == ("mail:143", 1000.0)
        clock.now += 0.2
        assert waits.in_flight(me) is None  # past its bound: no sign of life
    assert waits.in_flight(me) is None


def test_timeouts_mark_the_server_silent_from_the_first_until_an_answer() -> None:
    clock = Clock()
    waits = NetworkWaits(monotonic=clock, wall_clock=clock)
    for _ in range(2):
        with pytest.raises(TimeoutError), waits.waiting("imap", "mail:143", 5.0):
            clock.now += 3
            raise TimeoutError("timed out")
    assert waits.silences() == [Silence("imap", "mail:143", 1000.0)]
    with pytest.raises(ConnectionResetError), waits.waiting("imap", "mail:143", 5.0):
        raise ConnectionResetError  # not an answer, not a timeout: the silence stays
    with waits.waiting("smtp", "mail:25", 5.0):
        pass  # another server's answer says nothing of this one
    assert waits.silences() == [Silence("imap", "mail:143", 1000.0)]
    with waits.waiting("imap", "mail:143", 5.0):
        pass
    assert waits.silences() == []


def test_a_nested_call_gives_back_the_outer_one() -> None:
    clock = Clock()
    waits = NetworkWaits(monotonic=clock, wall_clock=clock)
    me = threading.get_ident()
    with waits.waiting("imap", "mail:143", 15.0):
        clock.now += 1
        with waits.waiting("imap", "mail:143", 5.0):
            assert waits.in_flight(me).since == 1001.0  # type: ignore[union-attr]
        assert waits.in_flight(me).since == 1000.0  # type: ignore[union-attr]
    assert waits.in_flight(me) is None
