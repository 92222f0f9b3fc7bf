"""Unit tests for the test helpers in tests/support.py."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import (
    WaitTimeout,
    in_ci,
    pick_free_port,
    port_is_open,
    skip_or_fail_in_ci,
    wait_for,
)


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = iter([None, 0, "ready"])
    assert wait_for(lambda: next(calls), timeout=2, interval=0.001) == "ready"


def test_wait_for_times_out_with_message_and_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waiting for the moon \(last value: False\)"):
        wait_for(lambda: False, timeout=0.2, interval=0.05, message="the moon")
    assert 0.2 <= time.monotonic() - started < 2


def test_wait_for_ignores_listed_exceptions_and_chains_the_last_one() -> None:
    def flaky() -> bool:
        raise ConnectionRefusedError("not yet")

    with pytest.raises(WaitTimeout, match="ConnectionRefusedError") as excinfo:
        wait_for(flaky, timeout=0.1, interval=0.01, ignore=ConnectionRefusedError)
    assert isinstance(excinfo.value.__cause__, ConnectionRefusedError)


def test_wait_for_propagates_other_exceptions() -> None:
    def broken() -> bool:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_for(broken, timeout=1, ignore=ConnectionError)


def test_wait_for_message_can_be_lazy() -> None:
    state = {"n": 0}

    def predicate() -> bool:
        state["n"] += 1
        return False

    with pytest.raises(WaitTimeout, match=r"counter at \d+"):
        wait_for(predicate, timeout=0.05, interval=0.01, message=lambda: f"counter at {state['n']}")


def test_pick_free_port_gives_a_bindable_port_outside_the_ephemeral_range() -> None:
    port = pick_free_port(avoid={25672})
    assert 20000 <= port < 32000
    assert not port_is_open("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert port_is_open("127.0.0.1", port)


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("yes", True),
                                           ("", False), ("0", False), ("false", False)])
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_a_missing_tool_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator: apt-get install frob"):
        skip_or_fail_in_ci("no frobnicator: apt-get install frob")


def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator: apt-get install frob"):
        skip_or_fail_in_ci("no frobnicator: apt-get install frob")
