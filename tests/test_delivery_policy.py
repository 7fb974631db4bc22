"""Delivery's waiting rules: jittered backoff, the per-destination breaker and slots, the digest's time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from twisted.internet.task import Clock

from gateway.delivery.policy import CircuitBreaker, DestinationSlots, next_digest_time, retry_delay


def test_backoff_is_jittered_within_a_capped_doubling():
    assert retry_delay(1, 2.0, 600.0, rng=lambda: 1.0) == 2.0
    assert retry_delay(4, 2.0, 600.0, rng=lambda: 1.0) == 16.0
    assert retry_delay(20, 2.0, 600.0, rng=lambda: 1.0) == 600.0
    assert retry_delay(4, 2.0, 600.0, rng=lambda: 0.5) == 8.0
    assert retry_delay(4, 2.0, 600.0, rng=lambda: 0.0) == pytest.approx(0.2)  # never immediate


def test_failures_together_do_not_retry_together():
    import random

    rng = random.Random(7)
    delays = {round(retry_delay(6, 2.0, 600.0, rng=rng.random), 3) for _ in range(100)}
    assert len(delays) > 90
    assert min(delays) < 16 < max(delays) <= 64


def test_breaker_opens_after_failures_in_a_row_then_lets_one_trial_through():
    clock = Clock()
    breaker = CircuitBreaker(clock.seconds, threshold=3, cooldown=30)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.reopens_in() == 30
    clock.advance(30)
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow(), "only one trial while half-open"
    breaker.failed()
    assert breaker.state == "open" and breaker.reopens_in() == 60, "a failed trial opens it for longer"
    clock.advance(60)
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()


def test_a_success_resets_the_count_of_failures():
    breaker = CircuitBreaker(Clock().seconds, threshold=3)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    breaker.failed()
    assert breaker.state == "closed"


def test_slots_keep_a_stalled_destination_from_taking_the_others():
    slots = DestinationSlots(per_destination=2, total=5)
    assert slots.take("stalled") and slots.take("stalled")
    assert not slots.take("stalled")
    assert all(slots.take(d) for d in ("pcp", "team", "hie"))
    assert not slots.take("another"), "the total is a cap too"
    slots.give("pcp")
    assert slots.take("another")


@pytest.mark.parametrize(
    ("now", "at", "zone", "expected"),
    [
        (
            datetime(2026, 3, 2, 11, 0, tzinfo=UTC),
            "07:30",
            "America/New_York",
            datetime(2026, 3, 2, 12, 30, tzinfo=UTC),
        ),
        (
            datetime(2026, 3, 2, 13, 0, tzinfo=UTC),
            "07:30",
            "America/New_York",
            datetime(2026, 3, 3, 12, 30, tzinfo=UTC),
        ),
        # The spring change (8 March 2026 in the US): 07:30 EDT is 11:30 UTC.
        (
            datetime(2026, 3, 7, 13, 0, tzinfo=UTC),
            "07:30",
            "America/New_York",
            datetime(2026, 3, 8, 11, 30, tzinfo=UTC),
        ),
        # 02:30 does not exist that day: taken as it falls after the skip (03:30 EDT = 07:30 UTC).
        (datetime(2026, 3, 8, 5, 0, tzinfo=UTC), "02:30", "America/New_York", datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
    ],
)
def test_the_digest_goes_at_the_recipients_wall_clock_time(now, at, zone, expected):
    assert next_digest_time(now, at, zone) == expected
