"""Throttle (shared per host) and retrying: token bucket, shared pauses, backoff."""

from __future__ import annotations

import threading
import time

import pytest

from connectors._http import Throttle, retry_budget, retry_time_left, retrying
from connectors.base import MAX_RETRY_SECONDS, ConnectorUnavailable, PermanentError, TransientError


class FakeTime:
    """A clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_for_host_is_shared_per_host() -> None:
    first = Throttle.for_host("https://Shared-Host.example:8443/api")
    assert Throttle.for_host("shared-host.example:8443") is first
    assert Throttle.for_host("other-host.example") is not first


def test_token_bucket_spaces_requests() -> None:
    fake = FakeTime()
    throttle = Throttle(rate=2, burst=2, clock=fake.clock, sleep=fake.sleep)
    waits = [throttle.acquire() for _ in range(4)]
    assert waits[:2] == [0.0, 0.0]  # the burst
    assert waits[2:] == pytest.approx([0.5, 0.5])


def test_unlimited_rate_never_waits() -> None:
    fake = FakeTime()
    throttle = Throttle(clock=fake.clock, sleep=fake.sleep)
    assert sum(throttle.acquire() for _ in range(100)) == 0.0


def test_pause_extends_but_never_shortens() -> None:
    fake = FakeTime()
    throttle = Throttle(clock=fake.clock, sleep=fake.sleep)
    throttle.pause(10)
    throttle.pause(3)
    assert throttle.paused_for == 10
    assert throttle.acquire() == pytest.approx(10)


def test_a_pause_makes_a_second_caller_wait() -> None:
    # Given one caller got a 429 with Retry-After: 0.4 on a shared throttle
    throttle = Throttle.for_host("pause-test.example")
    throttle.pause(0.4)
    waited: list[float] = []
    # When another thread wants to send a request
    other = threading.Thread(target=lambda: waited.append(throttle.acquire()))
    started = time.monotonic()
    other.start()
    other.join()
    # Then it waited for the pause too
    assert waited[0] >= 0.35 and time.monotonic() - started >= 0.35


def test_backoff_grows_only_once_per_pause_and_resets_on_success() -> None:
    fake = FakeTime()
    throttle = Throttle(base_delay=1, max_delay=8, clock=fake.clock, sleep=fake.sleep)
    first = throttle.backoff()
    assert 0.5 <= first <= 1
    assert throttle.backoff() == first  # a second caller failing meanwhile adds nothing
    fake.now += first
    assert 1 <= throttle.backoff() <= 2
    fake.now += 2
    assert 2 <= throttle.backoff() <= 4
    fake.now += 4
    throttle.success()
    assert throttle.backoff() <= 1


def test_backoff_is_capped() -> None:
    fake = FakeTime()
    throttle = Throttle(base_delay=1, max_delay=5, clock=fake.clock, sleep=fake.sleep)
    for _ in range(10):
        fake.now += throttle.backoff()
    assert throttle.backoff() <= 5


def test_retrying_honours_retry_after_through_the_throttle() -> None:
    fake = FakeTime()
    throttle = Throttle(clock=fake.clock, sleep=fake.sleep)
    calls: list[float] = []

    def flaky() -> str:
        calls.append(fake.now)
        if len(calls) < 3:
            raise TransientError("429", retry_after=7, status=429)
        return "done"

    assert retrying(flaky, attempts=3, throttle=throttle) == "done"
    assert [b - a for a, b in zip(calls, calls[1:], strict=False)] == [7, 7]


def test_retrying_without_retry_after_backs_off() -> None:
    fake = FakeTime()
    throttle = Throttle(base_delay=2, clock=fake.clock, sleep=fake.sleep)
    results: list[Exception | str] = [TransientError("busy"), "ok"]

    def once() -> str:
        item = results.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    assert retrying(once, throttle=throttle) == "ok"
    assert 1 <= sum(fake.slept) <= 2


def test_retrying_raises_long_retry_after_at_once_but_pauses_others() -> None:
    fake = FakeTime()
    throttle = Throttle(clock=fake.clock, sleep=fake.sleep)
    calls = []

    def slow_down() -> None:
        calls.append(1)
        raise TransientError("429", retry_after=600)

    with pytest.raises(TransientError):
        retrying(slow_down, attempts=5, throttle=throttle, max_wait=60)
    assert len(calls) == 1 and throttle.paused_for == 600


def test_retrying_never_retries_permanent_errors() -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise PermanentError("400")

    with pytest.raises(PermanentError):
        retrying(bad, attempts=5, sleep=lambda _: None)
    assert calls == [1]


def test_retrying_without_throttle_sleeps_locally() -> None:
    slept: list[float] = []
    outcomes: list[Exception | str] = [TransientError("a", retry_after=3), TransientError("b"),
                                       "ok"]

    def op() -> str:
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    assert retrying(op, attempts=3, sleep=slept.append) == "ok"
    assert slept[0] == 3 and 0 <= slept[1] <= 4


def test_retrying_gives_up_within_the_budget_and_hands_the_wait_to_the_bus() -> None:
    # Given a host that is down and a throttle whose backoff grows to a minute
    fake = FakeTime()
    throttle = Throttle(base_delay=2, max_delay=60, clock=fake.clock, sleep=fake.sleep)
    calls: list[float] = []

    def down() -> None:
        calls.append(fake.now)
        raise ConnectorUnavailable("cannot reach https://crm.example: connection refused")

    # When a call retries with many attempts allowed
    with pytest.raises(ConnectorUnavailable) as raised:
        retrying(down, attempts=20, throttle=throttle)
    # Then it stopped inside MAX_RETRY_SECONDS, and the error says how long the bus should wait
    assert fake.now - calls[0] <= MAX_RETRY_SECONDS
    assert len(calls) >= 3
    assert raised.value.retry_after is not None
    assert raised.value.retry_after == pytest.approx(throttle.paused_for)
    assert fake.now - calls[0] + raised.value.retry_after > MAX_RETRY_SECONDS


def test_a_call_meeting_a_long_shared_pause_fails_at_once_naming_the_cause() -> None:
    # Given another caller's failure paused the host for 45 s
    fake = FakeTime()
    throttle = Throttle(clock=fake.clock, sleep=fake.sleep)
    throttle.name = "crm.example"
    throttle.pause(45, reason="503 Service Unavailable")
    calls = []
    # When a new call starts, it does not wait 45 s in-process
    with pytest.raises(TransientError) as raised:
        retrying(lambda: calls.append(1), throttle=throttle)
    assert calls == [] and fake.slept == []
    assert raised.value.retry_after == pytest.approx(45)
    assert "crm.example: 503 Service Unavailable" in raised.value.message
    # Outside a retry budget (a one-off tool) the pause is simply waited for
    assert throttle.acquire() == pytest.approx(45)


def test_nested_budgets_share_the_outermost_deadline() -> None:
    fake = FakeTime()
    with retry_budget(10, clock=fake.clock):
        fake.now += 4
        with retry_budget(30, clock=fake.clock):
            assert retry_time_left() == pytest.approx(6)
    assert retry_time_left() == float("inf")
