"""sidecar.core.breaker: closed, open for a cool-down after a failure, one trial, closed again."""

from __future__ import annotations

from sidecar.core.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def test_closed_breaker_lets_every_call_through() -> None:
    breaker = Breaker(cooldown=5.0)
    assert [breaker.allow(t) for t in (0.0, 0.1, 100.0)] == [True, True, True]
    assert breaker.state == CLOSED and breaker.retry_in(0.0) == 0.0


def test_one_failure_opens_it_for_the_cooldown() -> None:
    breaker = Breaker(cooldown=5.0)
    breaker.failed(10.0)
    assert breaker.state == OPEN
    assert [breaker.allow(t) for t in (10.0, 12.0, 14.99)] == [False, False, False]
    assert breaker.retry_in(12.0) == 3.0


def test_after_the_cooldown_exactly_one_trial_goes_ahead() -> None:
    breaker = Breaker(cooldown=5.0)
    breaker.failed(10.0)
    assert breaker.allow(15.0) is True
    assert breaker.state == HALF_OPEN
    assert [breaker.allow(15.0), breaker.allow(16.0), breaker.allow(60.0)] == [False, False, False]


def test_a_successful_trial_closes_it_and_reports_what_was_refused() -> None:
    breaker = Breaker(cooldown=5.0)
    breaker.failed(10.0)
    for t in (11.0, 12.0, 13.0):
        breaker.allow(t)
    assert breaker.allow(15.0) is True
    assert breaker.succeeded() == 3
    assert breaker.state == CLOSED
    assert breaker.allow(15.1) is True


def test_a_failed_trial_opens_it_for_another_cooldown_and_keeps_counting() -> None:
    breaker = Breaker(cooldown=5.0)
    breaker.failed(10.0)
    breaker.allow(11.0)
    assert breaker.allow(15.0) is True
    breaker.failed(15.25)
    assert breaker.state == OPEN
    assert breaker.allow(20.0) is False and breaker.retry_in(20.0) == 0.25
    assert breaker.allow(20.25) is True
    assert breaker.succeeded() == 2  # refused at 11.0 and 20.0


def test_success_while_closed_changes_nothing() -> None:
    breaker = Breaker(cooldown=5.0)
    assert breaker.succeeded() == 0
    assert breaker.state == CLOSED
