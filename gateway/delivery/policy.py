"""How delivery waits and when it gives up: backoff with jitter, a retry horizon, a circuit
breaker and concurrency slots per destination, and the time of a daily digest.

Plain objects on an injected clock (reactor seconds), so tests drive them with
``twisted.internet.task.Clock``.

- **Backoff** is exponential with *full jitter* (the delay is drawn between
  zero and the capped exponential), so receivers that failed together do not
  all retry at the same moment.
- **The horizon**: a notification is retried until the horizon after its first
  attempt has passed (72 hours by default: a weekend outage), not for a count
  of attempts; only a permanent failure or the horizon makes it dead.
- **A circuit breaker per destination**: after ``threshold`` failures in a row
  the destination is *open* for ``cooldown`` seconds: nothing is sent to it,
  its notifications wait without spending attempts. Then one trial goes
  (*half-open*); success closes it, failure opens it again for longer.
- **Slots per destination**: at most ``per_destination`` sends to one
  destination at a time, so a stalled receiver holds its own slots only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["CircuitBreaker", "DestinationSlots", "next_digest_time", "retry_delay"]


def retry_delay(attempt: int, initial: float, maximum: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the retry after failed attempt ``attempt`` (1-based): full jitter over a capped doubling.

    Never less than a tenth of ``initial``, so a retry is never immediate.
    """
    ceiling = min(maximum, initial * (2 ** (attempt - 1)))
    return max(initial / 10, ceiling * rng())


class CircuitBreaker:
    """One destination's breaker: closed (send), open (wait), half-open (one trial)."""

    def __init__(self, seconds: Callable[[], float], threshold: int = 5, cooldown: float = 30.0, cap: float = 600.0):
        self.seconds = seconds
        self.threshold = threshold
        self.cooldown = cooldown
        self.cap = cap
        self.failures = 0
        self.opened_at: float | None = None
        self.open_for = cooldown
        self.trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.seconds() - self.opened_at >= self.open_for:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Whether a send may start now (in half-open, only the one trial)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.trial:
            self.trial = True
            return True
        return False

    def reopens_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.open_for - self.seconds())

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.open_for = self.cooldown
        self.trial = False

    def failed(self) -> None:
        if self.trial:
            # The trial failed: open again, for longer.
            self.trial = False
            self.opened_at = self.seconds()
            self.open_for = min(self.cap, self.open_for * 2)
            return
        self.failures += 1
        if self.opened_at is None and self.failures >= self.threshold:
            self.opened_at = self.seconds()
            self.open_for = self.cooldown


class DestinationSlots:
    """Concurrency slots: at most ``per_destination`` at once to one destination, ``total`` in all."""

    def __init__(self, per_destination: int = 4, total: int = 32) -> None:
        self.per_destination = per_destination
        self.total = total
        self.busy: dict[str, int] = {}

    @property
    def in_use(self) -> int:
        return sum(self.busy.values())

    def take(self, destination: str, limit: int | None = None) -> bool:
        """Take a slot for ``destination`` (at most ``limit`` at once there, default ``per_destination``)."""
        most = self.per_destination if limit is None else limit
        if self.in_use >= self.total or self.busy.get(destination, 0) >= most:
            return False
        self.busy[destination] = self.busy.get(destination, 0) + 1
        return True

    def give(self, destination: str) -> None:
        left = self.busy.get(destination, 0) - 1
        if left > 0:
            self.busy[destination] = left
        else:
            self.busy.pop(destination, None)


def next_digest_time(now: datetime, at: str, zone: str) -> datetime:
    """The next moment, after ``now`` (aware), that the wall clock in ``zone`` reads ``at`` (HH:MM), in UTC.

    Across a daylight-saving change the digest keeps its wall-clock time; a
    time that does not exist that day (02:30 when clocks skip it) is taken
    as it falls after the skip.
    """
    tz = ZoneInfo(zone)
    hour, minute = (int(p) for p in at.split(":"))
    local = now.astimezone(tz)
    day = local.date()
    for _ in range(3):
        candidate = datetime.combine(day, time(hour, minute), tz)
        # Normalise a wall time that does not exist (the skipped hour) through UTC.
        candidate = candidate.astimezone(ZoneInfo("UTC")).astimezone(tz)
        if candidate > local:
            return candidate.astimezone(ZoneInfo("UTC"))
        day += timedelta(days=1)
    raise AssertionError("unreachable: a day ahead always has the time")
